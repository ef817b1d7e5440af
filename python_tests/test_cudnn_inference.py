"""fuse_for_inference's cuDNN layers (``cudnn=True``), checked on the CPU: which calls take the
fused cuDNN op, with which arguments, and that the model then computes what the plain folded
model computes. The two cuDNN ops are replaced by a stand-in that binds each call to the op's
real schema (so a wrong argument order fails here) and computes the op's documented result with
``F.conv2d``. The real ops are checked against the plain path on a GPU in
test_gpu_cudnn_inference.py."""
import copy

import pytest
import torch
import torch.nn.functional as F

from sficonv_ext import models
from sficonv_ext.models import cudnn_inference
from sficonv_ext.models.cudnn_inference import (CudnnConvNorm, CudnnPlainBottleneck,
                                                use_cudnn_layers)
from sficonv_ext.models.folded_layers import drop_cached_weights

from conftest import make_pair, rel_err


def _bind(op_name, args):
    schema = getattr(torch.ops.aten, op_name).default._schema
    names = [a.name for a in schema.arguments]
    assert len(args) == len(names), (op_name, len(args), names)
    return dict(zip(names, args))


class FakeCudnn:
    """Stands in for torch.cudnn_convolution_relu / _add_relu and records every call."""

    def __init__(self):
        self.calls = []

    def _conv(self, a):
        assert a["weight"].dtype == a["self"].dtype == a["bias"].dtype
        return F.conv2d(a["self"], a["weight"], None, a["stride"], a["padding"], a["dilation"],
                        a["groups"])

    def relu(self, *args):
        a = _bind("cudnn_convolution_relu", args)
        self.calls.append(("relu", a))
        return torch.relu(self._conv(a) + a["bias"].view(1, -1, 1, 1))

    def add_relu(self, *args):
        a = _bind("cudnn_convolution_add_relu", args)
        self.calls.append(("add_relu", a))
        assert a["z"].dtype == a["self"].dtype
        return torch.relu(self._conv(a) + a["alpha"] * a["z"] + a["bias"].view(1, -1, 1, 1))


@pytest.fixture
def fake(monkeypatch):
    stand_in = FakeCudnn()
    monkeypatch.setattr(torch, "cudnn_convolution_relu", stand_in.relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", stand_in.add_relu)
    # Let CPU tensors pass the layers' "a CUDA tensor in channels_last" test.
    monkeypatch.setattr(cudnn_inference, "_channels_last_cuda",
                        lambda t: t.dim() == 4
                        and t.is_contiguous(memory_format=torch.channels_last))
    return stand_in


@pytest.fixture(scope="module")
def pair():
    """The plain folded model and a copy with the cuDNN layers swapped in."""
    torch.manual_seed(0)
    _, fast = make_pair(26, dtype=torch.float32)
    plain = models.fuse_for_inference(fast.eval(), onednn=False)
    layered = copy.deepcopy(plain)
    assert use_cudnn_layers(layered.network) == 25
    return plain, layered


def test_layers_swapped_and_state_dict_kept(pair):
    plain, layered = pair
    kinds = [type(m) for m in layered.modules()]
    # ResNet-26: 20 SFIConv layers over an SFIConv2d plus 4 downsamples; 1 plain bottleneck.
    assert kinds.count(CudnnConvNorm) == 24 and kinds.count(CudnnPlainBottleneck) == 1
    assert list(layered.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("shape", [(2, 3, 65, 97), (1, 3, 64, 64)])
def test_every_convolution_with_a_relu_takes_one_fused_call(pair, fake, shape):
    plain, layered = pair
    x = torch.randn(shape)
    with torch.inference_mode():
        got = layered(x)
        expect = plain(x)
    assert rel_err(got, expect) < 1e-5
    kinds = [kind for kind, _ in fake.calls]
    # Per SFI bottleneck: SFIC1 and SFIC2 (ReLU) and SFIC3 (residual + ReLU); the first
    # block's SFIC1 is a FirstSFIConv and the 4 downsamples have no ReLU: plain calls.
    # ResNet-26 has 7 SFI bottlenecks and 1 plain bottleneck (2 ReLU + 1 add-ReLU).
    assert kinds.count("add_relu") == 7 + 1
    assert kinds.count("relu") == 7 * 2 - 1 + 2
    for _, a in fake.calls:
        assert list(a["stride"]) == [1, 1] and list(a["dilation"]) == [1, 1]
        assert a["groups"] == 1
        k = a["weight"].shape[-1]
        assert list(a["padding"]) == [k // 2, k // 2]
        assert a["self"].is_contiguous(memory_format=torch.channels_last)


def test_cast_weights_are_cached_and_refreshed_on_change(pair, fake):
    plain, layered = pair
    plain, layered = copy.deepcopy(plain), copy.deepcopy(layered)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        layered(x)
    layer = layered.network.layer2[0].SFIC2
    cache = layer._fused._cache
    assert cache is not None
    with torch.inference_mode():
        layered(x)
    assert layer._fused._cache is cache  # nothing changed: the same cast weights
    with torch.no_grad():
        for model in (layered, plain):
            model.network.layer2[0].SFIC2.conv.weight.mul_(1.5)
    with torch.inference_mode():
        assert rel_err(layered(x), plain(x)) < 1e-5  # an in-place change is seen
    for model in (layered, plain):
        model.network.layer2[0].SFIC2.conv.weight.data.mul_(0.5)  # behind autograd's back
    drop_cached_weights(layered)
    assert layer._fused._cache is None
    with torch.inference_mode():
        assert rel_err(layered(x), plain(x)) < 1e-5
    copied = copy.deepcopy(layered)
    assert copied.network.layer2[0].SFIC2._fused._cache is None


def test_calls_the_fused_op_cannot_serve_take_the_plain_path(pair, fake):
    plain, layered = pair
    x = torch.randn(1, 3, 64, 64)
    # A gradient wanted, float64, and a hooked convolution: plain calls, same results.
    xi = x.clone().requires_grad_()
    got = layered(xi)
    got.sum().backward()
    assert fake.calls == [] and xi.grad is not None
    layered64, plain64 = copy.deepcopy(layered).double(), copy.deepcopy(plain).double()
    with torch.inference_mode():
        assert rel_err(layered64(x.double()), plain64(x.double())) < 1e-12
    assert fake.calls == []
    hooked = copy.deepcopy(layered)
    seen = []
    hooked.network.layer1[1].SFIC2.conv.register_forward_hook(lambda *_: seen.append(1))
    with torch.inference_mode():
        assert rel_err(hooked(x), plain(x)) < 1e-5
    assert seen == [1]
    # cuDNN turned off: every call plain.
    fake.calls.clear()
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=False):
        layered(x)
    assert fake.calls == []


def test_a_residual_of_the_wrong_shape_is_still_an_error(pair, fake):
    _, layered = pair
    layer = layered.network.layer1[1].SFIC3
    x = torch.randn(1, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), pytest.raises(ValueError, match="residual shape"):
        layer(x, residual=torch.randn(1, 256, 8, 8), relu=True)


def test_fuse_for_inference_refuses_cudnn_off_cuda():
    _, fast = make_pair(26, dtype=torch.float32)
    with pytest.raises(ValueError, match="cudnn=True needs the model on a CUDA device"):
        models.fuse_for_inference(fast, cudnn=True)
    # The default (cudnn=None) chooses by device: no cuDNN layers for a CPU model, no error.
    fused = models.fuse_for_inference(fast)
    assert not any(isinstance(m, (CudnnConvNorm, CudnnPlainBottleneck)) for m in fused.modules())


def test_a_moved_or_converted_weight_is_recast(pair, fake):
    # Module.to() swaps a parameter's storage and keeps its version counter: a cache keyed on
    # the version alone would serve the weight as it was before.
    plain, layered = pair
    plain, layered = copy.deepcopy(plain), copy.deepcopy(layered)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        layered(x)  # fills the caches
    for model in (layered, plain):
        model.double()
        model.network.layer2[0].SFIC2.conv.weight.data.mul_(2.0)  # no version bump
        model.float()
    with torch.inference_mode():
        assert rel_err(layered(x), plain(x)) < 1e-5


def test_deterministic_mode_and_wrong_channels_take_the_plain_path(pair, fake):
    plain, layered = pair
    x = torch.randn(1, 3, 64, 64)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.inference_mode():
            assert rel_err(layered(x), plain(x)) < 1e-5
    finally:
        torch.use_deterministic_algorithms(False)
    assert fake.calls == []
    layer = layered.network.layer1[1].SFIC2
    wrong = torch.randn(1, 32, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="channels"):
        layer(wrong)  # conv2d's own message
    assert fake.calls == []


def test_no_fused_engine_falls_back_once_and_other_errors_surface(pair, fake, monkeypatch):
    plain, layered = pair
    layered = copy.deepcopy(layered)
    x = torch.randn(1, 3, 64, 64)
    tried = []

    def no_engine(*args):
        tried.append(1)
        raise RuntimeError("GET was unable to find an engine to execute this computation")
    monkeypatch.setattr(torch, "cudnn_convolution_relu", no_engine)
    with torch.inference_mode():
        assert rel_err(layered(x), plain(x)) < 1e-5
        first = len(tried)
        assert first > 0
        layered(x)
    assert len(tried) == first  # remembered per input signature: not tried again

    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", broken)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="illegal memory access"):
        layered(x)


def test_forward_mode_ad_keeps_its_tangent(pair, fake):
    import torch.autograd.forward_ad as fwad
    plain, layered = pair
    x, t = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with fwad.dual_level():
        got = fwad.unpack_dual(layered(fwad.make_dual(x, t)))
        want = fwad.unpack_dual(plain(fwad.make_dual(x, t)))
    assert got.tangent is not None and rel_err(got.tangent, want.tangent) < 1e-5
    assert fake.calls == []


def test_casts_made_during_cuda_graph_capture_are_not_cached(pair, fake, monkeypatch):
    # A captured graph must hold the cast itself, so that its replays see later in-place
    # changes of the weight (and never read a cached copy that was since freed).
    _, layered = pair
    layered = copy.deepcopy(layered)
    monkeypatch.setattr(cudnn_inference, "_capturing", lambda device: True)
    with torch.inference_mode():
        layered(torch.randn(1, 3, 64, 64))
    assert fake.calls
    assert all(m._fused._cache is None for m in layered.modules()
               if isinstance(m, CudnnConvNorm))


def test_models_pickled_before_the_attribute_rename_still_load(pair):
    _, layered = pair
    layer = copy.deepcopy(layered.network.layer1[1].SFIC2)
    state = dict(layer.__dict__)
    state["_packed"] = state.pop("_fused")  # the name until this change
    fresh = CudnnConvNorm.__new__(CudnnConvNorm)
    fresh.__setstate__(state)
    assert fresh._fused is layer._fused and not hasattr(fresh, "_packed")
