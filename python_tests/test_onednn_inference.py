"""fuse_for_inference's oneDNN layers (conv + bias + add + ReLU as one call on a pre-reordered
weight) against the same model with plain F.conv2d calls and against the eager model."""
import copy
import io

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sficonv_ext import models
from sficonv_ext.models.onednn_inference import (OneDNNConvNorm, OneDNNPlainBottleneck,
                                                 onednn_fusion_available)

from conftest import make_pair, rel_err

pytestmark = pytest.mark.skipif(not onednn_fusion_available(),
                                reason="this torch build has no oneDNN post-op convolution")

FUSED_OP = "mkldnn::_convolution_pointwise"


@pytest.fixture(scope="module")
def trio():
    """The eager model (random BatchNorm statistics) and its two fused copies."""
    torch.manual_seed(0)
    _, fast = make_pair(26, dtype=torch.float32)
    fast.eval()
    return (fast, models.fuse_for_inference(fast),
            models.fuse_for_inference(fast, onednn=False))


def _ops_run(model, x, **kwargs):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model(x, **kwargs) if kwargs else model(x)
    return out, {e.key for e in prof.key_averages()}


def test_every_folded_layer_is_swapped_and_keys_are_kept(trio):
    fast, onednn, plain = trio
    kinds = [type(m) for m in onednn.modules()]
    # 16 SFIConv layers over an SFIConv2d in the SFI bottlenecks (+ 4 downsamples), 1 plain
    # bottleneck in layer4 of ResNet-26.
    assert kinds.count(OneDNNConvNorm) == 24
    assert kinds.count(OneDNNPlainBottleneck) == 1
    assert list(onednn.state_dict()) == list(plain.state_dict())
    for (k, a), (_, b) in zip(onednn.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("shape", [(2, 3, 65, 97), (1, 3, 64, 64), (3, 3, 97, 71)])
def test_matches_plain_fused_and_eager_model(trio, shape):
    fast, onednn, plain = trio
    x = torch.randn(shape)
    with torch.inference_mode():
        got, ran = _ops_run(onednn, x)
        expect = plain(x)
        eager = fast(x)
    assert FUSED_OP in ran
    assert rel_err(got, expect) < 1e-5
    assert rel_err(got, eager) < 1e-4


def test_no_grad_mode_and_non_contiguous_input(trio):
    _, onednn, plain = trio
    x = torch.randn(2, 3, 80, 130)[..., ::2]  # strided view
    with torch.no_grad():
        got, ran = _ops_run(onednn, x)
        assert FUSED_OP in ran
        assert rel_err(got, plain(x)) < 1e-5


def test_input_that_wants_a_gradient_takes_the_plain_path(trio):
    _, onednn, plain = trio
    x = torch.randn(1, 3, 64, 64)
    grads = []
    for model in (onednn, plain):
        xi = x.clone().requires_grad_()
        out, ran = _ops_run(model, xi)
        out.sum().backward()
        grads.append(xi.grad)
    assert FUSED_OP not in ran
    assert grads[0] is not None and rel_err(grads[0], grads[1]) < 1e-5


def test_float64_and_autocast_take_the_plain_path(trio):
    fast, onednn, plain = trio
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, ran = _ops_run(onednn, x)
        expect = plain(x)
    assert FUSED_OP not in ran
    assert got.dtype == expect.dtype and torch.equal(got, expect)
    fast64 = copy.deepcopy(fast).double()
    onednn64 = models.fuse_for_inference(fast64)
    with torch.inference_mode():
        got, ran = _ops_run(onednn64, x.double())
        assert FUSED_OP not in ran
        assert rel_err(got, fast64(x.double())) < 1e-10


def test_a_changed_weight_is_never_served_from_the_stale_reordered_copy(trio):
    _, onednn, plain = trio
    onednn, plain = copy.deepcopy(onednn), copy.deepcopy(plain)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        onednn(x)  # fills the reordered-weight caches
    with torch.no_grad():
        for model in (onednn, plain):
            model.network.layer4[1].conv2.weight.mul_(-2.0)       # in place
            layer = model.network.layer2[0].SFIC2.conv
            layer.weight = torch.nn.Parameter(layer.weight * 0.5, requires_grad=False)  # new
    with torch.inference_mode():
        assert rel_err(onednn(x), plain(x)) < 1e-5


def test_copies_and_pickles_work_after_a_forward(trio):
    _, onednn, plain = trio
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expect = onednn(x)
    buffer = io.BytesIO()
    torch.save(onednn, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.inference_mode():
        assert torch.equal(copy.deepcopy(onednn)(x), expect)
        assert torch.equal(loaded(x), expect)
        assert torch.equal(onednn(x), expect)  # the original still works after being copied


def test_compiled_model_matches(trio):
    _, onednn, plain = trio
    compiled = torch.compile(onednn, backend="eager", fullgraph=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert rel_err(compiled(x), plain(x)) < 1e-5


def test_onednn_false_and_cuda_models_keep_plain_layers():
    fused = models.fuse_for_inference(models.sfi_resnet26().eval(), onednn=False)
    assert not any(isinstance(m, (OneDNNConvNorm, OneDNNPlainBottleneck))
                   for m in fused.modules())


def test_weights_made_in_inference_mode_are_reordered_every_call(trio):
    _, onednn, plain = trio
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        onednn, plain = copy.deepcopy(onednn), copy.deepcopy(plain)  # inference tensors
        onednn(x)
        for model in (onednn, plain):
            model.network.layer4[1].conv2.weight.mul_(-2.0)  # no version counter to see this
        assert rel_err(onednn(x), plain(x)) < 1e-5
