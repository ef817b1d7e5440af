"""The Winograd F(4x4, 3x3) convolution (``conv3x3(..., backend="winograd")``,
csrc/winograd_cpu.cpp) against PyTorch's convolution: float64 to 1e-10 over odd sizes, channel
counts across the kernels' 64-channel chunks, every input and weight layout; float32 within its
tolerance; gradcheck and gradgradcheck; opcheck; empty inputs; NaN; bad input; where "auto"
takes it. The fast model on it against the published reference in float64: test_model_parity."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sficonv_ext import models
from sficonv_ext.ops import _extension, conv3x3

from conftest import OpCounter, conv_weight, fresh_leaf, laid_out, make_pair, rel_err

pytestmark = pytest.mark.skipif(not _extension.has_cpp_kernels(),
                                reason="the C++ extension is not built")
FORWARD = torch.ops.sficonv_ext.winograd_conv3x3_forward
BACKWARD = torch.ops.sficonv_ext.winograd_conv3x3_backward
# float32: the transforms scale values by up to 8 (and the kernel's by 1/24), so results sit a
# few float32 units in the sixth digit from a direct convolution's (measured up to 1.1e-5
# relative to the largest value on the weight gradient of [3, 8, 65, 13]).
TOLERANCES = {torch.float64: 1e-10, torch.float32: 5e-5}
SHAPES = [  # (N, C, K, H, W)
    (2, 5, 7, 9, 11),    # odd sizes: partial tiles on both sides
    (1, 3, 4, 1, 1),     # one pixel: one tile, almost all padding
    (3, 8, 6, 4, 8),     # whole tiles only
    (2, 70, 66, 6, 5),   # channels across the 64-channel chunks, in and out
    (1, 2, 3, 65, 17),   # many tile rows
]


def _weight(k, c, dtype, kind):
    return conv_weight(k, c, 3, dtype, kind)


def _run(x, w, grad, backend):
    """(y, grad_x, grad_w) of one forward and backward."""
    x, w = fresh_leaf(x), fresh_leaf(w)
    y = conv3x3(x, w, backend=backend)
    y.backward(grad)
    return y, x.grad, w.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("x_kind", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("w_kind", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_winograd_matches_conv2d(shape, x_kind, w_kind, dtype):
    n, c, k, h, w_ = shape
    x = laid_out(torch.randn(n, c, h, w_, dtype=torch.float64).to(dtype), x_kind)
    w = _weight(k, c, dtype, w_kind)
    g = laid_out(torch.randn(n, k, h, w_, dtype=torch.float64).to(dtype), x_kind)
    got = _run(x, w, g, "winograd")
    want = _run(x.double(), w.double(), g.double(), "torch")
    for a, e in zip(got, want):
        assert a.dtype == dtype
        assert rel_err(a.double(), e) < TOLERANCES[dtype]
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    # The weight's gradient comes back in the weight's own layout (no copy in AccumulateGrad).
    assert got[2].stride() == w.stride() or w_kind == "strided"


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck])
@pytest.mark.parametrize("kind", ["nchw", "channels_last", "strided"])
def test_winograd_gradcheck(check, kind):
    x = laid_out(torch.randn(2, 3, 5, 6, dtype=torch.float64), kind)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    args = [fresh_leaf(x), fresh_leaf(w)]
    assert check(lambda a, b: conv3x3(a, b, backend="winograd"), args)


@pytest.mark.parametrize("kind", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("w_kind", ["contiguous", "channels_last", "strided"])
def test_winograd_opcheck(kind, w_kind):
    # The fake kernels must lay out what the C++ ops return: the weight's gradient comes back in
    # the weight's own layout (channels_last in the fast models).
    x = laid_out(torch.randn(2, 5, 6, 7), kind)
    w = _weight(3, 5, torch.float32, w_kind)
    g = laid_out(torch.randn(2, 3, 6, 7), kind)
    torch.library.opcheck(FORWARD.default, (x.requires_grad_(), w.requires_grad_()))
    for need_x, need_w in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(BACKWARD.default, (g, x.detach(), w.detach(), need_x, need_w))


def test_winograd_compiles_without_graph_breaks():
    x = torch.randn(2, 6, 9, 10).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 6, 3, 3, requires_grad=True)

    def step(x):
        return conv3x3(x, w, backend="winograd").square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    want = step(x)
    (grad_want,) = torch.autograd.grad(want, w)
    got = compiled(x)
    (grad_got,) = torch.autograd.grad(got, w)
    assert torch.allclose(got, want, rtol=1e-6)
    assert torch.allclose(grad_got, grad_want, rtol=1e-6)


def test_a_bottleneck_training_step_compiles_with_inductor():
    # Inductor checks each custom op's real output against its fake kernel's: a wrong stride
    # (the channels_last weight's gradient) failed here while aot_eager passed.
    torch.manual_seed(0)
    block = models.PlainBottleneck(64, 16).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(block)
    x = torch.randn(2, 64, 9, 10).contiguous(memory_format=torch.channels_last)

    def step(module, x):
        with OpCounter() as counter:
            module(x).square().sum().backward()
        return counter.count["sficonv_ext.winograd_conv3x3_forward"]

    assert step(twin, x) == 1
    torch.compile(lambda inp: block(inp).square().sum())(x).backward()
    for (name, p), (_, q) in zip(block.named_parameters(), twin.named_parameters()):
        assert rel_err(p.grad, q.grad) < 1e-4, name


def test_winograd_counts_the_flops_of_the_direct_convolution():
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    counts = []
    for backend in ("winograd", "torch"):
        with FlopCounterMode(display=False) as flops:
            conv3x3(x, w, backend=backend).sum().backward()
        counts.append(flops.get_total_flops())
    assert counts[0] == counts[1] == 3 * 2 * 2 * 5 * 4 * 8 * 8 * 9


def test_winograd_empty_batch_matches_conv2d():
    x = torch.randn(0, 3, 5, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    g = torch.randn(0, 4, 5, 6, dtype=torch.float64)
    got, want = _run(x, w, g, "winograd"), _run(x, w, g, "torch")
    for a, e in zip(got, want):
        assert a.shape == e.shape and torch.equal(a, e)


@pytest.mark.parametrize("hw", [(0, 6), (5, 0)])
def test_winograd_empty_map_gives_an_empty_output(hw):
    # F.conv2d refuses a map of 0 rows or columns (its padded size 2 is under the kernel's 3);
    # the convolution of an empty map with padding 1 is an empty map, with zero weight gradient.
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    y, grad_x, grad_w = _run(x, torch.randn(4, 3, 3, 3, dtype=torch.float64),
                             torch.randn(2, 4, *hw, dtype=torch.float64), "winograd")
    assert y.shape == (2, 4, *hw) and grad_x.shape == x.shape
    assert torch.equal(grad_w, torch.zeros(4, 3, 3, 3, dtype=torch.float64))


def test_winograd_without_channels_gives_the_empty_sum():
    # No input channels: every output is an empty sum, 0, in K channels (F.conv2d returns a
    # tensor of 0 channels here); no output channels: an empty output (F.conv2d refuses).
    x = torch.randn(2, 0, 5, 6, dtype=torch.float64)
    y, grad_x, grad_w = _run(x, torch.randn(4, 0, 3, 3, dtype=torch.float64),
                             torch.randn(2, 4, 5, 6, dtype=torch.float64), "winograd")
    assert torch.equal(y, torch.zeros(2, 4, 5, 6, dtype=torch.float64))
    assert grad_x.shape == (2, 0, 5, 6) and grad_w.shape == (4, 0, 3, 3)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    y, grad_x, grad_w = _run(x, torch.randn(0, 3, 3, 3, dtype=torch.float64),
                             torch.randn(2, 0, 5, 6, dtype=torch.float64), "winograd")
    assert y.shape == (2, 0, 5, 6)
    assert torch.equal(grad_x, torch.zeros_like(x)) and grad_w.shape == (0, 3, 3, 3)


def test_a_nan_reaches_every_output_a_direct_convolution_gives_nan():
    # Winograd mixes a whole 6x6 input tile into each of its 16 outputs, so a NaN may reach
    # more outputs than a direct convolution's 3x3 neighbourhood, never fewer.
    x = torch.randn(1, 4, 13, 11)
    x[0, 2, 6, 5] = float("nan")
    x[0, 1, 0, 10] = float("inf")
    w = torch.randn(3, 4, 3, 3)
    got, want = conv3x3(x, w, backend="winograd"), F.conv2d(x, w, padding=1)
    assert torch.isnan(got)[torch.isnan(want)].all()
    assert (~torch.isfinite(got))[~torch.isfinite(want)].all()


def test_winograd_rejects_bad_input():
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        conv3x3(x, w, backend="fft")
    for bad_x, bad_w in ((x, torch.randn(4, 2, 3, 3)),             # channel mismatch
                         (x, torch.randn(4, 3, 5, 5)),             # not 3x3
                         (x.double(), w),                          # dtypes differ
                         (x.half(), w.half()),                     # not float32/float64
                         (x[0], w),                                # rank 3
                         (x.to("meta"), w.to("meta"))):            # not CPU
        with pytest.raises(ValueError, match="needs CPU tensors of one dtype"):
            conv3x3(bad_x, bad_w, backend="winograd")
    # The op itself checks too (its callers may be other code than conv3x3).
    with pytest.raises(RuntimeError, match="channels"):
        FORWARD(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(RuntimeError, match="grad_y must be"):
        BACKWARD(torch.randn(2, 4, 5, 4), x, w, True, True)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        FORWARD(x.long(), w.long())


def test_winograd_refuses_a_bias_pytorch_would_refuse():
    x, w = torch.randn(2, 3, 6, 7), torch.randn(4, 3, 3, 3)
    for bias in (torch.randn(4, dtype=torch.float64), torch.randn(5), torch.randn(1, 4)):
        with pytest.raises(ValueError, match="bias must be"):
            conv3x3(x, w, bias, backend="winograd")


def test_winograd_with_a_bias_adds_it():
    x, w, b = torch.randn(2, 3, 6, 7, dtype=torch.float64), torch.randn(4, 3, 3, 3,
                                                                        dtype=torch.float64), \
        torch.randn(4, dtype=torch.float64)
    assert rel_err(conv3x3(x, w, b, backend="winograd"), F.conv2d(x, w, b, padding=1)) < 1e-12


def _auto_ran_winograd(x, w, bias=None):
    with OpCounter() as counter:
        conv3x3(x, w, bias)
    return counter.count["sficonv_ext.winograd_conv3x3_forward"] > 0


def test_auto_takes_winograd_for_float32_channels_last_cpu_maps():
    x = torch.randn(2, 8, 8, 9).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 8, 3, 3)
    assert _auto_ran_winograd(x, w)
    assert _auto_ran_winograd(x.requires_grad_(), w.requires_grad_())
    # Where it does not: a map under 8 pixels a side, float64 (the exact-parity dtype), NCHW
    # (not measured), a bias (the folded inference layers), under bfloat16 autocast (oneDNN's
    # AMX convolutions are faster), under forward-mode AD and torch.func.
    x = x.detach()
    w = w.detach()
    assert not _auto_ran_winograd(x[:, :, :7], w)
    assert not _auto_ran_winograd(x.double(), w.double())
    assert not _auto_ran_winograd(x.contiguous(), w)
    assert not _auto_ran_winograd(x, w, torch.randn(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _auto_ran_winograd(x, w)
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level():
        dual = fwad.make_dual(x, torch.randn_like(x))
        assert not _auto_ran_winograd(dual, w)
        tangent = fwad.unpack_dual(conv3x3(dual, w)).tangent
        assert rel_err(tangent, F.conv2d(fwad.unpack_dual(dual).tangent, w, padding=1)) < 1e-5
        with pytest.raises(ValueError, match="forward-mode"):
            conv3x3(dual, w, backend="winograd")
    got = torch.func.vmap(lambda t: conv3x3(t, w))(x.unsqueeze(0))
    assert rel_err(got[0], F.conv2d(x, w, padding=1)) < 1e-5


def test_fast_model_float32_training_on_auto_stays_close_to_pytorchs_convolutions():
    _, fast = make_pair(26, dtype=torch.float32)
    fast.train()
    torch_conv = models.set_conv_backend(copy.deepcopy(fast), "torch")
    x = torch.randn(2, 3, 64, 64)
    with OpCounter() as counter:
        out = fast(x)
    assert counter.count["sficonv_ext.winograd_conv3x3_forward"] > 0
    assert rel_err(out, torch_conv(x)) < 1e-4


# Inference: fuse_for_inference's 3x3 layers run on weight tiles transformed once, with the
# folded bias and the ReLU in the output pass.
TILES = torch.ops.sficonv_ext.winograd_weight_tiles
INFERENCE = torch.ops.sficonv_ext.winograd_conv3x3_inference


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_op_matches_conv2d_with_bias_and_relu(shape, relu, dtype):
    n, c, k, h, w_ = shape
    x = laid_out(torch.randn(n, c, h, w_, dtype=torch.float64).to(dtype), "channels_last")
    w = _weight(k, c, dtype, "channels_last")
    b = torch.randn(k, dtype=dtype)
    got = INFERENCE(x, TILES(w), b, relu)
    want = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    want = F.relu(want) if relu else want
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got.double(), want) < TOLERANCES[dtype]


def test_inference_relu_keeps_nan():
    x = torch.randn(1, 3, 9, 9)
    x[0, 1, 4, 4] = float("nan")
    w, b = torch.randn(2, 3, 3, 3), torch.randn(2)
    got = INFERENCE(x, TILES(w), b, True)
    assert torch.isnan(got)[torch.isnan(F.conv2d(x, w, b, padding=1))].all()


def test_inference_ops_refuse_a_gradient():
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    w = torch.randn(2, 3, 3, 3)
    y = INFERENCE(x, TILES(w), torch.randn(2), True)
    with pytest.raises(RuntimeError, match="has no backward"):
        y.sum().backward()


def test_inference_ops_opcheck():
    x = laid_out(torch.randn(2, 5, 6, 7), "channels_last")
    w = torch.randn(3, 5, 3, 3)
    torch.library.opcheck(TILES.default, (w,))
    for relu in (True, False):
        torch.library.opcheck(INFERENCE.default, (x, TILES(w), torch.randn(3), relu))


def test_inference_op_rejects_bad_input():
    x, w, b = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4)
    tiles = TILES(w)
    with pytest.raises(RuntimeError, match=r"weight_tiles must be \[36, K, C\]"):
        INFERENCE(x, w, b, True)
    with pytest.raises(RuntimeError, match="x must be"):
        INFERENCE(torch.randn(2, 4, 5, 5), tiles, b, True)
    with pytest.raises(RuntimeError, match="bias must be"):
        INFERENCE(x, tiles, torch.randn(3), True)
    with pytest.raises(RuntimeError, match="float32 or all float64"):
        INFERENCE(x.double(), tiles, b, True)
    with pytest.raises(RuntimeError, match=r"weight must be \[K, C, 3, 3\]"):
        TILES(torch.randn(4, 3, 5, 5))


def test_fused_inference_runs_3x3_layers_on_winograd_and_matches_onednn():
    torch.manual_seed(0)
    model = models.sfi_resnet26().eval()
    fused = models.fuse_for_inference(model)
    onednn = models.fuse_for_inference(model, winograd=False)
    x = torch.randn(2, 3, 64, 70)
    with torch.no_grad(), OpCounter() as counter:
        got = fused(x)
    # layer1's and layer2's maps (16x18, 8x9) take it; layer3's and layer4's (4x5, 2x3) are
    # under 8 a side and stay on oneDNN
    assert counter.count["sficonv_ext.winograd_conv3x3_inference"] == 4
    with torch.no_grad():
        want, plain = onednn(x), model(x)
    assert rel_err(got, plain) < 1e-4 and rel_err(want, plain) < 1e-4
    with torch.no_grad(), OpCounter() as counter:
        onednn(x)
    assert counter.count["sficonv_ext.winograd_conv3x3_inference"] == 0


def test_fused_inference_rebuilds_the_tiles_when_a_weight_changes():
    torch.manual_seed(0)
    fused = models.fuse_for_inference(models.sfi_resnet26())
    x = torch.randn(1, 3, 64, 64)
    conv = fused.network.layer1[0].SFIC2.conv
    with torch.no_grad():
        before = fused(x)
        conv.weight.mul_(2)  # seen by the version counter: new tiles on the next call
        after = fused(x)
        conv.weight.div_(2)
        again = fused(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(before, again, rtol=1e-5, atol=1e-6)
    # A copy keeps working without the cached tiles (they stay behind, rebuilt on use).
    twin = copy.deepcopy(fused)
    with torch.no_grad():
        assert torch.allclose(twin(x), before, rtol=1e-5, atol=1e-6)


def test_set_conv_backend_reaches_every_3x3_layer_and_refuses_unknown_names():
    model = models.sfi_resnet26()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), OpCounter() as counter:
        model(x)
    # layer1's and layer2's 3x3 maps (16x16, 8x8) take Winograd; the smaller ones do not
    assert counter.count["sficonv_ext.winograd_conv3x3_forward"] == 4
    models.set_conv_backend(model, "torch")
    with torch.no_grad(), OpCounter() as counter:
        model(x)
    assert counter.count["sficonv_ext.winograd_conv3x3_forward"] == 0
    models.set_conv_backend(model, "winograd")  # forced: every 3x3 layer, whatever its size
    with torch.no_grad(), OpCounter() as counter:
        model(x)
    assert counter.count["sficonv_ext.winograd_conv3x3_forward"] == 8
    with pytest.raises(ValueError, match="backend must be one of"):
        models.set_conv_backend(model, "fft")
    # An NCHW model keeps PyTorch's convolutions ("auto" takes Winograd on channels_last only).
    nchw = models.sfi_resnet26(channels_last=False)
    with torch.no_grad(), OpCounter() as counter:
        nchw(x)
    assert counter.count["sficonv_ext.winograd_conv3x3_forward"] == 0


def test_winograd_is_deterministic_across_thread_counts():
    # The transforms split work by tile and never sum across threads; the sums are inside MKL's
    # batched products, which gave bitwise equal results with 1 and 2 threads here.
    x = laid_out(torch.randn(4, 70, 13, 11), "channels_last")
    w = torch.randn(66, 70, 3, 3)
    g = laid_out(torch.randn(4, 66, 13, 11), "channels_last")
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            results.append((FORWARD(x, w), *BACKWARD(g, x, w, True, True)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _check_large_call(seed):
    # Temporaries of 1 MiB and more come from the scratch pool (csrc/cpu_scratch.cpp): the
    # weight tiles [36, 128, 96] and the input tiles and products [36, 2 * 10 * 10, C] in
    # float64. Fresh values each call, so a block handed out twice or reused dirty shows.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 96, 40, 40, dtype=torch.float64, generator=gen)
    w = torch.randn(128, 96, 3, 3, dtype=torch.float64, generator=gen)
    g = torch.randn(2, 128, 40, 40, dtype=torch.float64, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    got, want = _run(x, w, g, "winograd"), _run(x, w, g, "torch")
    for a, b in zip(got, want):
        assert rel_err(a, b) < TOLERANCES[torch.float64]


def test_scratch_pool_reuses_its_blocks_and_results_stay_exact():
    from sficonv_ext import cpu_allocator
    cpu_allocator.trim_kernel_pool()  # whatever earlier tests left
    _check_large_call(0)  # fills the pool with this call's sizes
    before = cpu_allocator.kernel_pool_stats()
    assert before["cached_bytes"] > 0 and before["in_use_bytes"] == 0
    for seed in (1, 2):
        _check_large_call(seed)
    after = cpu_allocator.kernel_pool_stats()
    assert after["misses"] == before["misses"]  # every large temporary came from the pool
    assert after["hits"] > before["hits"]
    assert after["in_use_bytes"] == 0 and after["cached_bytes"] <= 256 << 20
    assert cpu_allocator.trim_kernel_pool() == after["cached_bytes"]
    assert cpu_allocator.kernel_pool_stats()["cached_bytes"] == 0
    _check_large_call(3)  # works after a trim


def test_scratch_pool_under_concurrent_calls():
    # Calls from several threads at once (the ops release the GIL) must each get blocks of
    # their own.
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as workers:
        list(workers.map(_check_large_call, range(10, 16)))
    from sficonv_ext import cpu_allocator
    assert cpu_allocator.kernel_pool_stats()["in_use_bytes"] == 0


def test_scratch_block_reused_for_an_empty_map_gives_a_zero_weight_gradient():
    # The tile-domain weight gradient [36, 128, 96] float64 (3.5 MB) is a pooled block that
    # the previous call left full of values; with no tiles it must come out zero (bmm_out
    # over an empty sum), as F.conv2d's weight gradient of an empty batch is.
    _check_large_call(20)
    x = torch.randn(0, 96, 40, 40, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(128, 96, 3, 3, dtype=torch.float64)
    _, grad_x, grad_w = _run(x, w, torch.zeros(0, 128, 40, 40, dtype=torch.float64),
                             "winograd")
    assert grad_x.shape == x.shape and torch.equal(grad_w, torch.zeros_like(grad_w))


def test_scratch_pool_frees_its_longest_waiting_blocks_to_stay_within_its_cap():
    # Weight tiles [36, K, C] in float64 of four sizes, 64-76 MB each: together over the pool's
    # 256 MiB (its cap after a trim, while twice the most in use at once stays below that), so
    # the oldest must be freed to make room, and results stay exact.
    from sficonv_ext import cpu_allocator
    cpu_allocator.trim_kernel_pool()
    before = cpu_allocator.kernel_pool_stats()
    for k, c in ((512, 512), (512, 496), (496, 480), (480, 464)):
        x = torch.randn(1, c, 8, 8, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last)
        w = torch.randn(k, c, 3, 3, dtype=torch.float64)
        assert rel_err(FORWARD(x, w), F.conv2d(x, w, padding=1)) < TOLERANCES[torch.float64]
    after = cpu_allocator.kernel_pool_stats()
    assert after["evictions"] > before["evictions"]
    assert 0 < after["cached_bytes"] <= 256 << 20 and after["in_use_bytes"] == 0
    cpu_allocator.trim_kernel_pool()


def test_outputs_of_31_mib_or_more_come_from_the_kernel_pool():
    # [2, 256, 128, 128] float32 is 32 MiB, a block glibc would map afresh on every call: the
    # output and the input gradient come from the pool, and a second call reuses them.
    from sficonv_ext import cpu_allocator
    cpu_allocator.trim_kernel_pool()
    start = cpu_allocator.kernel_pool_stats()["in_use_bytes"]  # what earlier tests still hold
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 256, 128, 128, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, generator=gen) * 0.05
    g = torch.randn(2, 256, 128, 128, generator=gen).contiguous(memory_format=torch.channels_last)
    y = FORWARD(x, w)
    assert cpu_allocator.kernel_pool_stats()["in_use_bytes"] - start == 32 << 20
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, F.conv2d(x, w, padding=1)) < TOLERANCES[torch.float32]
    grad_x, _ = BACKWARD(g, x, w, True, False)
    want = torch.nn.grad.conv2d_input(x.shape, w, g, padding=1)
    assert rel_err(grad_x, want) < TOLERANCES[torch.float32]
    first = (y.clone(), grad_x.clone())
    del y, grad_x
    before = cpu_allocator.kernel_pool_stats()
    assert before["in_use_bytes"] == start
    again = FORWARD(x, w), BACKWARD(g, x, w, True, False)[0]
    after = cpu_allocator.kernel_pool_stats()
    assert after["misses"] == before["misses"]
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    del again
    cpu_allocator.trim_kernel_pool()


_POOL_FORKS = textwrap.dedent("""
    import os, signal, threading
    import torch
    import sficonv_ext  # noqa: F401  (registers the ops)
    torch.set_num_threads(1)
    conv = torch.ops.sficonv_ext.winograd_conv3x3_forward
    x = torch.randn(1, 96, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(96, 96, 3, 3)  # weight tiles of 1.3 MB: pooled temporaries
    big = torch.randn(2, 256, 128, 128).contiguous(memory_format=torch.channels_last)
    held = torch.ops.sficonv_ext.batch_norm_act_forward(  # a pooled 32 MiB output
        big, torch.ones(256), torch.zeros(256), None, True, 1e-5)[0]
    stop = False
    def churn():  # takes and gives back pool blocks, holding its lock now and then
        while not stop:
            conv(x, w)
    thread = threading.Thread(target=churn); thread.start()
    hung = 0
    for _ in range(60):
        pid = os.fork()
        if pid == 0:
            code = 2  # an exception: never run on as a second parent
            try:
                signal.alarm(60)  # a deadlock never ends; a starved child on a loaded machine does
                del held  # the inherited block goes back to the child's pool
                again = torch.ops.sficonv_ext.batch_norm_act_forward(  # and one comes from it
                    big, torch.ones(256), torch.zeros(256), None, True, 1e-5)[0]
                code = 0 if again.shape == big.shape else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0:
            hung += 1
            print("child", "signal" if os.WIFSIGNALED(status) else "exit status",
                  os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    stop = True; thread.join()
    print(hung)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_uses_and_frees_pooled_blocks_without_hanging():
    # A DataLoader worker is a fork, and it may free pooled tensors it inherited: the child
    # must be able to give them back and use the pool. The pool takes its lock around fork()
    # so that the child's copy is never locked; the race this guards against (another thread
    # inside the lock at the fork) is rare here: the test passed twice with the guard removed.
    # The child takes its block through the epilogue, not a convolution: with a child that ran
    # the Winograd convolution, one child of 60 failed in one full run on a loaded machine
    # (2026-11-28; how, unrecorded then: the failures are printed now) and none in 9 runs of
    # the script alone. The suspect, unconfirmed, is MKL's matrix products, which the parent's
    # thread was inside at the fork and which have no fork handlers.
    done = subprocess.run([sys.executable, "-c", _POOL_FORKS], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "0", done.stdout[-2000:]
