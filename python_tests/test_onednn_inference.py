"""fuse_for_inference's oneDNN layers (conv + bias + ReLU as one call on a pre-reordered weight,
the residual added in place where that is safe) against the same model with plain F.conv2d
calls and against the eager model."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sficonv_ext import models
from sficonv_ext.cpu_allocator import large_block_cache
from sficonv_ext.ops import _extension
from sficonv_ext.models.onednn_inference import (OneDNNConvNorm, OneDNNPlainBottleneck,
                                                 drop_packed_weights, onednn_fusion_available,
                                                 residuals_may_be_overwritten)

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
    # ResNet-26: 20 SFIConv layers over an SFIConv2d in the SFI bottlenecks (the first
    # block's FirstSFIConv is not one) plus 4 downsamples, and 1 plain bottleneck in layer4.
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


def _assert_fused_matches_plain(onednn, plain, x):
    """The oneDNN model ran its fused op on ``x`` and gave the plain folded model's output."""
    got, ran = _ops_run(onednn, x)
    assert FUSED_OP in ran
    assert rel_err(got, plain(x)) < 1e-5


def test_no_grad_mode_and_non_contiguous_input(trio):
    _, onednn, plain = trio
    x = torch.randn(2, 3, 80, 130)[..., ::2]  # strided view
    with torch.no_grad():
        _assert_fused_matches_plain(onednn, plain, x)


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


def test_a_weight_replaced_twice_between_calls_is_not_mistaken_for_the_first(trio):
    # The second replacement may land at the first one's freed address with the same version:
    # the cache must hold on to the tensor it was built from.
    _, onednn, plain = trio
    onednn, plain = copy.deepcopy(onednn), copy.deepcopy(plain)
    x = torch.randn(1, 3, 64, 64)
    for trial in range(6):
        with torch.inference_mode():
            assert rel_err(onednn(x), plain(x)) < 1e-5, trial
        with torch.no_grad():
            scale = torch.rand(()) + 0.5
            for model in (onednn, plain):
                layer = model.network.layer1[1].SFIC2.conv
                for _ in range(2):
                    layer.weight = torch.nn.Parameter(layer.weight * scale, requires_grad=False)


def test_writes_behind_autograds_back_need_drop_packed_weights(trio):
    _, onednn, plain = trio
    onednn, plain = copy.deepcopy(onednn), copy.deepcopy(plain)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        onednn(x)
    for model in (onednn, plain):
        model.network.layer4[1].conv3.weight.data.mul_(-1.0)  # no version bump
    drop_packed_weights(onednn)
    with torch.inference_mode():
        assert rel_err(onednn(x), plain(x)) < 1e-5


def test_copies_and_pickles_work_after_a_forward(trio):
    _, onednn, plain = trio
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expect = onednn(x)
    # A 1x1 layer caches oneDNN's reordered weight; a 3x3 one its Winograd tiles.
    layer, winograd = onednn.network.layer1[1].SFIC1, onednn.network.layer1[1].SFIC2
    assert layer._fused._cache is not None and winograd._fused._tiles_cache is not None
    buffer = io.BytesIO()
    torch.save(onednn, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(onednn)
    # copying leaves the original's caches alone, and the copies start without them
    assert layer._fused._cache is not None and winograd._fused._tiles_cache is not None
    assert copied.network.layer1[1].SFIC1._fused._cache is None
    assert copied.network.layer1[1].SFIC2._fused._tiles_cache is None
    with torch.inference_mode():
        assert torch.equal(copied(x), expect)
        assert torch.equal(loaded(x), expect)
        assert torch.equal(onednn(x), expect)


def test_hooks_on_a_convolution_still_fire(trio):
    _, onednn, plain = trio
    onednn = copy.deepcopy(onednn)
    seen = []
    handles = [onednn.network.layer1[1].SFIC2.conv.register_forward_hook(
                   lambda m, i, o: seen.append(o.shape)),
               onednn.network.layer4[1].conv2.register_forward_hook(
                   lambda m, i, o: seen.append(o.shape))]
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        got = onednn(x)
        assert rel_err(got, plain(x)) < 1e-5
    assert len(seen) == 2
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("which", ["onednn", "plain"])
def test_a_hooked_convolution_output_is_not_written_over(trio, which):
    # After folding, BatchNorm is an nn.Identity: the epilogue's in-place add and ReLU would
    # land on the very tensor a forward hook on the convolution was handed.
    fused = copy.deepcopy(trio[1] if which == "onednn" else trio[2])
    held = {}

    def keep(name):
        def hook(module, inputs, output):
            held[name] = (output, output.clone())
        return hook

    net = fused.network
    for name, conv in [("SFIC3", net.layer1[1].SFIC3.conv), ("SFIC2", net.layer1[1].SFIC2.conv),
                       ("plain conv2", net.layer4[1].conv2),
                       ("plain conv3", net.layer4[1].conv3)]:
        conv.register_forward_hook(keep(name))
    with torch.inference_mode():
        fused(torch.randn(1, 3, 64, 64))
    assert len(held) == 4
    for name, (output, copy_at_hook) in held.items():
        assert (copy_at_hook < 0).any(), name  # a ReLU in place would have changed it
        assert torch.equal(output, copy_at_hook), name


@pytest.mark.parametrize("onednn", [True, False])
def test_hooks_on_layers_and_blocks_survive_fusion(onednn):
    # fuse_for_inference deep-copies the model (hooks included) and then swaps its layers for
    # folded ones: the hooks must move with them, and their handles still remove them.
    _, fast = make_pair(26, dtype=torch.float32)
    fast.eval()
    fired = []
    layer = fast.layer1[1].SFIC2
    handles = [layer.register_forward_hook(lambda *_: fired.append("layer")),
               fast.layer4[1].register_forward_pre_hook(lambda *_: fired.append("block"))]
    fused = models.fuse_for_inference(fast, onednn=onednn)
    for handle in handles:
        handle.remove()  # removes the original's hooks only
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        fused(x)
    assert fired == ["layer", "block"]
    fired.clear()
    fused_handle = fused.network.layer1[1].SFIC2.register_forward_hook(
        lambda *_: fired.append("new"))
    with torch.inference_mode():
        fused(x)
    assert fired == ["layer", "new", "block"]
    fused_handle.remove()


def test_traced_and_onednn_disabled_take_the_plain_path(trio):
    _, onednn, plain = trio
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expect = plain(x)
        traced = torch.jit.trace(onednn, x, check_trace=False)
        assert rel_err(traced(x), expect) < 1e-5
        with torch.backends.mkldnn.flags(enabled=False):
            got, ran = _ops_run(onednn, x)
    assert FUSED_OP not in ran
    assert rel_err(got, expect) < 1e-5


def test_a_residual_of_the_wrong_shape_is_still_an_error(trio):
    _, onednn, _ = trio
    layer = onednn.network.layer1[1].SFIC3
    x = torch.randn(1, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), pytest.raises(ValueError, match="residual shape"):
        layer(x, residual=torch.randn(1, 1, 1).expand(1, 1, 1))


def test_fusing_under_inference_mode_still_caches(trio):
    fast, _, plain = trio
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        fused = models.fuse_for_inference(fast)
        got = fused(x)
    layer, winograd = fused.network.layer1[1].SFIC1, fused.network.layer1[1].SFIC2
    assert not layer.conv.weight.is_inference()
    assert layer._fused._cache is not None and winograd._fused._tiles_cache is not None
    with torch.inference_mode():
        assert rel_err(got, plain(x)) < 1e-5


def test_compiled_model_matches(trio):
    _, onednn, plain = trio
    compiled = torch.compile(onednn, backend="eager", fullgraph=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert rel_err(compiled(x), plain(x)) < 1e-5


def test_onednn_false_keeps_plain_layers():
    fused = models.fuse_for_inference(models.sfi_resnet26().eval(), onednn=False)
    assert not any(isinstance(m, (OneDNNConvNorm, OneDNNPlainBottleneck))
                   for m in fused.modules())


def test_weights_made_in_inference_mode_are_reordered_every_call(trio):
    _, onednn, plain = trio
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        onednn, plain = copy.deepcopy(onednn), copy.deepcopy(plain)  # inference tensors
        assert onednn.network.layer4[1].conv2.weight.is_inference()
        onednn(x)
        for model in (onednn, plain):
            model.network.layer4[1].conv2.weight.mul_(-2.0)  # no version counter to see this
        assert rel_err(onednn(x), plain(x)) < 1e-5


def _residual_layers(network):
    """(layer, its input, its residual): SFIC3 of an identity block and a plain bottleneck."""
    torch.manual_seed(1)
    cl = torch.channels_last
    sfi = (network.layer1[1].SFIC3, torch.randn(1, 64, 9, 11).contiguous(memory_format=cl),
           torch.randn(1, 256, 9, 11).contiguous(memory_format=cl))
    plain = (network.layer4[1], None, torch.randn(1, 2048, 3, 5).contiguous(memory_format=cl))
    return [sfi, plain]


def _run(layer, x, residual):
    return layer(residual) if x is None else layer(x, residual=residual, relu=True)


def test_a_residual_is_overwritten_only_where_the_fused_forward_allows(trio):
    _, onednn, plain = trio
    for (layer, x, residual), (plain_layer, _, _) in zip(_residual_layers(onednn.network),
                                                         _residual_layers(plain.network)):
        kept = residual.clone()
        with torch.inference_mode():
            expect = _run(plain_layer, x, residual)
            outside = _run(layer, x, residual)
            assert torch.equal(residual, kept)  # a caller's tensor stays as it was
            with residuals_may_be_overwritten(onednn.network):
                inside = _run(layer, x, residual)
        assert rel_err(outside, expect) < 1e-5 and torch.equal(inside, outside)
        # Inside, the sum was written over the residual (the point of the in-place path).
        assert inside.data_ptr() == residual.data_ptr()


def test_a_hook_anywhere_keeps_every_activation_intact(trio):
    # A hook keeping a block's output would see it overwritten by the next block's in-place
    # residual add: with any hook in the network nothing is written in place.
    _, onednn, plain = trio
    onednn = copy.deepcopy(onednn)
    kept = []
    handle = onednn.network.layer1[0].register_forward_hook(
        lambda m, i, o: kept.append((o, o.clone())))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        got, ran = _ops_run(onednn, x)
        expect = plain(x)
    handle.remove()
    assert FUSED_OP in ran and FUSED_OP + "_" not in ran
    held, snapshot = kept[0]
    assert torch.equal(held, snapshot)
    assert rel_err(got, expect) < 1e-5
    with torch.inference_mode():
        _, ran = _ops_run(onednn, x)  # hook gone: the in-place path runs again
    assert FUSED_OP + "_" in ran


def test_forward_mode_ad_takes_the_plain_path_and_keeps_its_tangent(trio):
    # oneDNN's op has no forward-AD formula: it used to run anyway and drop the tangent.
    import torch.autograd.forward_ad as fwad
    _, onednn, plain = trio
    x, t = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with fwad.dual_level():
        got, ran = _ops_run(onednn, fwad.make_dual(x, t))
        got = fwad.unpack_dual(got)
        want = fwad.unpack_dual(plain(fwad.make_dual(x, t)))
    assert FUSED_OP not in ran
    assert got.tangent is not None and rel_err(got.tangent, want.tangent) < 1e-5


def test_a_weight_converted_by_module_to_is_reordered_again(trio):
    # Module.to() swaps a parameter's storage and keeps its version counter. (Whether the new
    # storage lands at the old address depends on the allocator; the next test forces it.)
    _, onednn, plain = trio
    onednn, plain = copy.deepcopy(onednn), copy.deepcopy(plain)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        onednn(x)  # fills the reordered-weight caches
    for model in (onednn, plain):
        model.double()
        model.network.layer2[0].SFIC2.conv.weight.data.mul_(2.0)  # no version bump
        model.float()
    with torch.inference_mode():
        _assert_fused_matches_plain(onednn, plain, x)


def test_a_new_storage_at_the_old_address_is_not_mistaken_for_the_old_weight():
    # The block cache hands a freed block straight back to the next request of its size: a
    # weight converted away and back (.double().float()) would land where it was, with its
    # version counter kept, and the cached reorder of the old values would pass the check.
    if not _extension.has_cpp_kernels():
        pytest.skip("the block cache needs the compiled extension")
    from sficonv_ext.models.onednn_inference import PackedConv
    conv = torch.nn.Conv2d(3, 7, 5, padding=2).requires_grad_(False)  # a size of its own
    x = torch.randn(1, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    with large_block_cache(min_bytes=0), torch.inference_mode(False):
        conv.weight.data = conv.weight.data.clone().contiguous(memory_format=torch.channels_last)
        fused = PackedConv(conv, 2)
        fused(x)  # caches the reordered weight
        conv.weight.data = conv.weight.data.double()
        conv.weight.data.mul_(2.0)  # no version bump
        conv.weight.data = conv.weight.data.float().contiguous(memory_format=torch.channels_last)
        got = fused(x)
    assert rel_err(got, F.conv2d(x, conv.weight, conv.bias, padding=2)) < 1e-5


def test_nan_and_inf_reach_the_output_as_on_the_plain_path(trio):
    # oneDNN's ReLU post-op maps NaN to 0: one NaN pixel then gave normal-looking logits. The
    # fused layers must keep every NaN the plain path keeps, through the residual "sum" post-op
    # too, and for a NaN weight.
    fast, onednn, plain = trio
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(2, 3, 64, 64)
        x[1, 0, 10, 10] = bad
        with torch.inference_mode():
            got, ran = _ops_run(onednn, x)
            want = plain(x)
        assert FUSED_OP in ran
        assert torch.isnan(want[1]).all() and torch.isfinite(want[0]).all()
        assert torch.equal(torch.isnan(got), torch.isnan(want)), bad
    layer, layer_plain = onednn.network.layer1[1].SFIC3, plain.network.layer1[1].SFIC3
    x = torch.randn(1, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(1, 256, 16, 16).contiguous(memory_format=torch.channels_last)
    residual[0, 3, 4, 5] = float("nan")  # NaN only through the residual
    with torch.inference_mode(), residuals_may_be_overwritten(onednn.network):
        want = layer_plain(x, residual=residual.clone(), relu=True)
        got = layer(x, residual=residual.clone(), relu=True)
    assert torch.isnan(want).sum() == 1 and torch.equal(torch.isnan(got), torch.isnan(want))
    broken = copy.deepcopy(onednn)
    with torch.no_grad():
        broken.network.layer2[0].SFIC2.conv.weight[0, 0, 0, 0] = float("nan")
    with torch.inference_mode():
        assert torch.isnan(broken(torch.randn(1, 3, 64, 64))).all()
