"""The 1x1 convolution as one matrix product (``conv1x1(..., backend="gemm")``,
sficonv_ext/ops/conv1x1.py; on the CPU the C++ op sficonv_ext::conv1x1_rows_forward/backward,
csrc/conv1x1_cpu.cpp, and PyTorch's ``mm`` without it) against PyTorch's convolution: float64
to 1e-12 and float32 within its tolerance over odd sizes, every input and weight layout, a
bias; gradcheck and gradgradcheck; opcheck of the C++ ops; forward-mode AD, vmap and
torch.compile; empty inputs; NaN; bad input; outputs from the kernel pool; where "auto" takes
it; the fast model on it (the published reference in float64: test_model_parity)."""
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from sficonv_ext import cpu_allocator, models
from sficonv_ext.nn import SFIConv2d
from sficonv_ext.ops import _extension, conv1x1
from sficonv_ext.ops.conv1x1 import (GEMM_MAX_ROWS, GEMM_POOLED_MIN_BYTES, GEMM_WIDE_MAX_ROWS,
                                     GEMM_WIDE_MIN_CHANNELS)

from conftest import OpCounter, conv_weight, fresh_leaf, laid_out, make_pair, rel_err

# The module (sficonv_ext.ops.conv1x1 as an attribute is the function of that name).
conv1x1_module = importlib.import_module("sficonv_ext.ops.conv1x1")
needs_cpp = pytest.mark.skipif(not _extension.has_cpp_kernels(),
                               reason="needs the compiled extension")
# The matrix product's forward as the ops inside a dispatch mode see it: the C++ op where the
# extension is built, PyTorch's mm (addmm with a bias) where not.
PRODUCT_OPS = ("aten.mm", "aten.addmm", "sficonv_ext.conv1x1_rows_forward")


def _products(counter):
    return sum(counter.count[name] for name in PRODUCT_OPS)


@pytest.fixture(params=["cpp", "torch-mm"])
def product_path(request, monkeypatch):
    """Runs a test on the C++ op (where built) and on the pure-PyTorch product."""
    if request.param == "cpp" and not _extension.has_cpp_kernels():
        pytest.skip("needs the compiled extension")
    if request.param == "torch-mm":
        monkeypatch.setattr(conv1x1_module, "_rows_op_runs", lambda x, bias: False)
    return request.param

# float32: sums over C of up to 70 products in another order than oneDNN's.
TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5}
SHAPES = [  # (N, C, K, H, W)
    (2, 5, 7, 9, 11),   # odd sizes
    (1, 3, 4, 1, 1),    # one pixel
    (3, 70, 66, 4, 8),  # more channels
    (1, 1, 1, 17, 3),   # one channel in and out
]


def _weight(k, c, dtype, kind):
    return conv_weight(k, c, 1, dtype, kind)


def _run(x, w, b, grad, backend):
    """(y, grad_x, grad_w, grad_b) of one forward and backward."""
    x, w = fresh_leaf(x), fresh_leaf(w)
    b = None if b is None else fresh_leaf(b)
    y = conv1x1(x, w, b, backend=backend)
    y.backward(grad)
    return y, x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("x_kind", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("w_kind", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_matches_conv2d(shape, x_kind, w_kind, dtype, with_bias, product_path):
    n, c, k, h, w_ = shape
    x = laid_out(torch.randn(n, c, h, w_, dtype=torch.float64).to(dtype), x_kind)
    w = _weight(k, c, dtype, w_kind)
    b = torch.randn(k, dtype=dtype) if with_bias else None
    grad = torch.randn(n, k, h, w_, dtype=dtype)
    got = _run(x, w, b, grad, "gemm")
    want = _run(x, w, b, grad, "torch")
    for g, r in zip(got, want):
        if r is not None:
            assert g.dtype == r.dtype and g.shape == r.shape
            assert rel_err(g.double(), r.double()) < TOLERANCES[dtype]
    # The output keeps a channels_last input's layout (no silent flip for the next layer).
    if x_kind == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_gemm_gradcheck_and_gradgradcheck(kind, product_path):
    x = laid_out(torch.randn(2, 3, 5, 4, dtype=torch.float64), kind).requires_grad_()
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return conv1x1(x, w, b, backend="gemm")

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    # Without a bias (the C++ op's case on channels_last inputs).
    assert torch.autograd.gradcheck(lambda x, w: f(x, w, None), (x, w))
    assert torch.autograd.gradgradcheck(lambda x, w: f(x, w, None), (x, w))


def test_gemm_under_forward_ad_vmap_and_compile():
    import torch.autograd.forward_ad as fwad
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 6, 1, 1)
    tangent = torch.randn_like(x)
    with fwad.dual_level():
        out = conv1x1(fwad.make_dual(x, tangent), w, backend="gemm")
        got = fwad.unpack_dual(out).tangent
    assert rel_err(got, F.conv2d(tangent, w)) < 1e-5
    batched = torch.func.vmap(lambda t: conv1x1(t, w, backend="gemm"))(x.unsqueeze(0))
    assert rel_err(batched[0], F.conv2d(x, w)) < 1e-5
    compiled = torch.compile(lambda t, v: conv1x1(t, v, backend="gemm"), fullgraph=True,
                             backend="aot_eager")
    assert rel_err(compiled(x, w), F.conv2d(x, w)) < 1e-5


@pytest.mark.parametrize("shape", [(0, 3, 4, 5, 6), (2, 3, 4, 0, 6), (2, 0, 4, 5, 6)])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_gemm_empty_inputs_match_conv2d(shape, kind, product_path):
    n, c, k, h, w_ = shape
    x = laid_out(torch.randn(n, c, h, w_), kind)
    w = torch.randn(k, c, 1, 1)
    grad = torch.randn(n, k, h, w_)
    got = _run(x, w, None, grad, "gemm")
    if h == 0 or c == 0:
        # F.conv2d refuses a map of 0 rows, and without input channels returns 0 output
        # channels; the product gives the empty output and the empty sum's zeros.
        assert [t.shape for t in got[:3]] == [(n, k, h, w_), x.shape, w.shape]
        assert not got[0].any() and not got[2].any()
        return
    want = _run(x, w, None, grad, "torch")
    for g, r in zip(got[:3], want[:3]):
        assert g.shape == r.shape and torch.equal(g, r)  # empty, or the empty sum's zeros


def test_a_nan_reaches_exactly_its_own_pixel(product_path):
    x = torch.randn(2, 4, 6, 5).contiguous(memory_format=torch.channels_last)
    x[1, 2, 3, 4] = float("nan")
    y = conv1x1(x, torch.randn(3, 4, 1, 1), backend="gemm")
    nan = torch.isnan(y)
    assert nan[1, :, 3, 4].all() and nan.sum() == 3


@pytest.mark.parametrize("backend", ["auto", "torch", "gemm"])
def test_every_path_rejects_a_weight_of_another_shape(backend):
    # F.conv2d would take a 3x3 weight (an unpadded 3x3 convolution): no path does.
    x = torch.randn(2, 3, 6, 7).contiguous(memory_format=torch.channels_last)
    cases = [
        ((x, torch.randn(4, 3, 3, 3)), "weight \\[K, C, 1, 1\\]"),
        ((x[0], torch.randn(4, 3, 1, 1)), "x \\[N, C, H, W\\]"),
        ((x, torch.randn(4, 5, 1, 1)), "expects 5 input channels"),
        ((x, torch.randn(4, 3, 1, 1), torch.randn(5)), "bias must be \\[4\\]"),
        ((x, torch.randn(4, 3, 1, 1), torch.randn(1, 4)), "bias must be \\[4\\]"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            conv1x1(*args, backend=backend)


def test_gemm_rejects_mixed_or_integer_types():
    x, w = torch.randn(2, 3, 6, 7), torch.randn(4, 3, 1, 1)
    for args in ((x, w.double()), (x.long(), w.long()), (x, w, torch.randn(4).double())):
        with pytest.raises(ValueError, match="one floating dtype on one device"):
            conv1x1(*args, backend="gemm")
    with pytest.raises(ValueError, match="backend must be one of"):
        conv1x1(x, w, backend="mm")


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_gemm_under_bfloat16_autocast_matches_conv2d_under_it(kind):
    x = laid_out(torch.randn(2, 8, 5, 6), kind)
    w, b = torch.randn(4, 8, 1, 1), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv1x1(x, w, b, backend="gemm")
        want = F.conv2d(x, w, b)
    assert got.dtype == want.dtype == torch.bfloat16
    assert rel_err(got.float(), want.float()) < 2e-2


def _auto_ran_gemm(x, w, bias=None):
    with OpCounter() as counter:
        conv1x1(x, w, bias)
    return _products(counter) > 0


def test_auto_takes_gemm_for_few_rows_of_float32_channels_last_cpu_inputs():
    def cl(*shape):
        return torch.randn(*shape).contiguous(memory_format=torch.channels_last)
    x, w = cl(4, 8, 16, 16), torch.randn(4, 8, 1, 1)  # 1024 rows
    assert x.shape[0] * 16 * 16 == GEMM_MAX_ROWS
    assert _auto_ran_gemm(x, w)
    assert _auto_ran_gemm(x.detach().requires_grad_(), w.detach().requires_grad_())
    # More rows only where both channel counts are wide.
    c = GEMM_WIDE_MIN_CHANNELS
    assert not _auto_ran_gemm(cl(2, 8, 16, 33), w)
    assert _auto_ran_gemm(cl(GEMM_WIDE_MAX_ROWS // 64, c, 8, 8), torch.randn(c, c, 1, 1))
    assert not _auto_ran_gemm(cl(GEMM_WIDE_MAX_ROWS // 64 + 1, c, 8, 8), torch.randn(c, c, 1, 1))
    assert not _auto_ran_gemm(cl(32, c, 8, 8), torch.randn(c - 1, c, 1, 1))
    # Where it does not: float64, NCHW (and an NCHW input with one channel, which also passes
    # as channels_last), a bias, bfloat16 autocast, forward-mode AD, an empty batch.
    assert not _auto_ran_gemm(x.double(), w.double())
    assert not _auto_ran_gemm(x.contiguous(), w)
    assert not _auto_ran_gemm(torch.randn(2, 1, 4, 4), torch.randn(3, 1, 1, 1))
    assert not _auto_ran_gemm(x, w, torch.randn(4))
    assert not _auto_ran_gemm(x[:0], w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _auto_ran_gemm(x, w)
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level():
        assert not _auto_ran_gemm(fwad.make_dual(x, torch.randn_like(x)), w)


def test_auto_forward_and_backward_compile_with_inductor():
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 16, 1, 1)

    def loss(x, w):
        y = conv1x1(x, w)
        return (y * y).sum()
    leaves = (x.requires_grad_(), w.requires_grad_())
    with OpCounter() as counter:
        want = torch.autograd.grad(loss(*leaves), leaves)
    # "auto" took the product: forward and two gradients (one C++ op for both where built).
    if _extension.has_cpp_kernels():
        assert counter.count["sficonv_ext.conv1x1_rows_forward"] == 1
        assert counter.count["sficonv_ext.conv1x1_rows_backward"] == 1
    else:
        assert counter.count["aten.mm"] == 3
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(*leaves), leaves)
    for g, r in zip(got, want):
        assert rel_err(g, r) < 1e-5


def _pointwise_layers(model):
    """How many 1x1 convolutions after the first layer ``model`` has."""
    sfi = sum(1 for m in model.modules() if isinstance(m, SFIConv2d) and m.kernel_size == 1)
    plain = sum(1 for m in model.modules() if isinstance(m, models.PlainBottleneck)) * 2
    return sfi + plain


def _matrix_products(model, x):
    with torch.no_grad(), OpCounter() as counter:
        model(x)
    return _products(counter) - counter.count["aten.addmm"]  # the classifier's (with a bias)


def test_set_pointwise_backend_reaches_every_1x1_layer_and_refuses_unknown_names():
    model = models.sfi_resnet26().eval()
    layers = _pointwise_layers(model)
    # Per SFIConv block SFIC1, SFIC3 and a first block's downsample (layer1's SFIC1 is the
    # first layer): 4 + 5 + 5 + 3, and layer4's plain block's conv1 and conv3.
    assert layers == 19
    # At batch 8, 256x256: layer4's 5 (512 rows, and its first SFIC1 on layer3's 16x16 map:
    # 2048 rows, 1024 -> 512 channels) and layer3's downsample (2048 rows, 512 -> 1024)...
    x = torch.randn(8, 3, 256, 256)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_allocator, "large_blocks_reused", lambda nbytes: True)
        assert _matrix_products(model, x) == 6
        # ... and where large blocks are not reused (glibc's defaults), the three with a 32 MiB
        # output: layer1's first block's SFIC3 and downsample (64 -> 256 channels) and its
        # second block's SFIC3 (without gradients, a large input alone does not count).
        patch.setattr(cpu_allocator, "large_blocks_reused", lambda nbytes: False)
        assert _matrix_products(model, x) == 6 + (3 if _extension.has_cpp_kernels() else 0)
    models.set_pointwise_backend(model, "torch")
    assert _matrix_products(model, x) == 0
    models.set_pointwise_backend(model, "gemm")
    assert _matrix_products(model, x) == layers
    with pytest.raises(ValueError, match="backend must be one of"):
        models.set_pointwise_backend(model, "fft")
    # An NCHW model keeps PyTorch's convolutions ("auto" takes gemm on channels_last only).
    nchw = models.sfi_resnet26(channels_last=False).eval()
    assert _matrix_products(nchw, x) == 0


@pytest.mark.parametrize("attribute", ["conv_backend", "pointwise_backend"])
def test_modules_pickled_before_a_backend_attribute_still_run(attribute):
    model = models.sfi_resnet26().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    for module in model.modules():
        module.__dict__.pop(attribute, None)  # as unpickled from an older version
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_a_hooked_plain_layer_keeps_its_module_call():
    model = models.sfi_resnet26().eval()
    block = model.layer4[1]
    seen = []
    block.conv1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert seen == [torch.Size([1, 512, 2, 2])]


def test_fast_model_float32_training_on_auto_stays_close_to_pytorchs_convolutions():
    _, fast = make_pair(26, dtype=torch.float32)
    fast.train()
    torch_pointwise = models.set_pointwise_backend(copy.deepcopy(fast), "torch")
    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([0, 1])
    with OpCounter() as counter:
        out = fast(x)
    assert _products(counter) > 0
    want = torch_pointwise(x)
    assert rel_err(out, want) < 1e-4
    F.cross_entropy(out, target).backward()
    F.cross_entropy(want, target).backward()
    for (name, p), q in zip(fast.named_parameters(), torch_pointwise.parameters()):
        if p.grad is not None:
            assert rel_err(p.grad, q.grad) < 1e-3, name


def test_activations_stay_channels_last_through_the_matrix_product_layers():
    # Hooks on the blocks and the fused layers only: hooks on the convolutions themselves would
    # send PlainBottleneck's to their module call (test_layout_walk.py hooks every module).
    model = models.sfi_resnet26().train()
    outputs = []
    for module in model.modules():
        if isinstance(module, (models.SFIBottleneck, models.PlainBottleneck)) or \
                type(module).__name__ == "SFIConvNorm":
            module.register_forward_hook(lambda m, args, out: outputs.append((m, out)))
    with OpCounter() as counter:
        model(torch.randn(1, 3, 128, 128)).sum().backward()
    # Every 1x1 layer took it (forward; aten.mm also counts the classifier's gradient).
    assert _products(counter) >= _pointwise_layers(model)
    for module, out in outputs:
        assert out.is_contiguous(memory_format=torch.channels_last), type(module).__name__


# ---- The C++ op (csrc/conv1x1_cpu.cpp) and its pooled outputs.

def _op_args(kind, dtype=torch.float32):
    x = laid_out(torch.randn(2, 5, 3, 7, dtype=dtype), kind).requires_grad_()
    return x, torch.randn(4, 5, 1, 1, dtype=dtype, requires_grad=True)


@needs_cpp
@pytest.mark.parametrize("kind", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_ops_pass_opcheck(kind, dtype):
    x, w = _op_args(kind, dtype)
    torch.library.opcheck(torch.ops.sficonv_ext.conv1x1_rows_forward, (x, w))
    grad = torch.randn(2, 4, 3, 7, dtype=dtype)
    for need_x, need_w in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(torch.ops.sficonv_ext.conv1x1_rows_backward,
                              (grad, x.detach(), w.detach(), need_x, need_w))


@needs_cpp
def test_rows_ops_refuse_bad_input():
    op = torch.ops.sficonv_ext.conv1x1_rows_forward
    x, w = torch.randn(2, 5, 3, 7), torch.randn(4, 5, 1, 1)
    with pytest.raises(RuntimeError, match="share one floating dtype"):
        op(x, w.double())
    with pytest.raises(RuntimeError, match="share one floating dtype"):
        op(x.int(), w.int())
    with pytest.raises(RuntimeError, match=r"weight must be \[K, C, 1, 1\]"):
        op(x, torch.randn(4, 5, 3, 3))
    with pytest.raises(RuntimeError, match="x has 5 channels, weight expects 6"):
        op(x, torch.randn(4, 6, 1, 1))
    with pytest.raises(RuntimeError, match=r"x must be \[N, C, H, W\]"):
        op(x[0], w)
    backward = torch.ops.sficonv_ext.conv1x1_rows_backward
    with pytest.raises(RuntimeError, match=r"grad_y must be \[2, 4, 3, 7\]"):
        backward(torch.randn(2, 4, 3, 6), x, w, True, True)
    with pytest.raises(RuntimeError, match="grad_y must be a CPU tensor of x's dtype"):
        backward(torch.randn(2, 4, 3, 7, dtype=torch.float64), x, w, True, True)


def _large_pair():
    # [2, 256, 128, 128] float32 is 32 MiB: past the kernel pool's 31 MiB for outputs.
    x = torch.randn(2, 64, 128, 128).contiguous(memory_format=torch.channels_last)
    return x, torch.randn(256, 64, 1, 1) / 8


@needs_cpp
def test_large_outputs_and_input_gradients_come_from_the_kernel_pool_and_are_reused():
    x, w = _large_pair()
    cpu_allocator.trim_kernel_pool()
    start = cpu_allocator.kernel_pool_stats()
    y = torch.ops.sficonv_ext.conv1x1_rows_forward(x, w)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, F.conv2d(x, w)) < 1e-5
    assert cpu_allocator.kernel_pool_stats()["in_use_bytes"] - start["in_use_bytes"] == y.nbytes
    # The input gradient of the transposed shapes (256 -> 64 channels) is as large.
    grad_x, grad_w = torch.ops.sficonv_ext.conv1x1_rows_backward(
        torch.randn(2, 64, 128, 128), y, w.transpose(0, 1).contiguous(), True, True)
    assert grad_x.shape == y.shape and grad_w.shape == (64, 256, 1, 1)
    assert cpu_allocator.kernel_pool_stats()["in_use_bytes"] - start["in_use_bytes"] == \
        2 * y.nbytes
    del y, grad_x
    before = cpu_allocator.kernel_pool_stats()
    assert before["in_use_bytes"] == start["in_use_bytes"]
    again = torch.ops.sficonv_ext.conv1x1_rows_forward(x, w)
    after = cpu_allocator.kernel_pool_stats()
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    assert rel_err(again, F.conv2d(x, w)) < 1e-5  # a reused block is overwritten, not summed
    del again
    cpu_allocator.trim_kernel_pool()


@needs_cpp
def test_auto_takes_the_pooled_product_for_large_tensors_unless_large_blocks_are_reused(
        monkeypatch):
    x, w = _large_pair()
    assert x.shape[0] * 128 * 128 > GEMM_WIDE_MAX_ROWS  # not a few-rows case
    assert x.shape[0] * 128 * 128 * 256 * 4 >= GEMM_POOLED_MIN_BYTES
    # glibc's defaults: keep_large_blocks_on_heap() cannot be undone, and other tests of this
    # process may have called it (the rule reads only this flag of it).
    monkeypatch.setattr(cpu_allocator, "_applied", False)
    assert not cpu_allocator.large_blocks_reused()
    assert _auto_ran_gemm(x, w)
    assert _auto_ran_gemm(F.avg_pool2d(x, 2).contiguous(memory_format=torch.channels_last),
                          w) is False  # 8 MiB
    # A large input into a small output: only where its gradient will be computed.
    big_in = torch.randn(2, 256, 128, 128).contiguous(memory_format=torch.channels_last)
    narrow = torch.randn(64, 256, 1, 1)
    assert not _auto_ran_gemm(big_in, narrow)
    assert _auto_ran_gemm(big_in.requires_grad_(), narrow)
    with torch.no_grad():
        assert not _auto_ran_gemm(big_in, narrow)
    with cpu_allocator.large_block_cache():
        assert cpu_allocator.large_blocks_reused()
        assert not _auto_ran_gemm(x, w)
    with cpu_allocator.large_block_cache(min_bytes=64 << 20):  # caches larger blocks only
        assert not cpu_allocator.large_blocks_reused(32 << 20)
        assert _auto_ran_gemm(x, w)
    monkeypatch.setattr(cpu_allocator, "_applied", True)  # keep_large_blocks_on_heap() ran
    assert cpu_allocator.large_blocks_reused()
    assert not _auto_ran_gemm(x, w)


@needs_cpp
def test_the_large_tensor_rule_stays_out_of_compiled_graphs(monkeypatch):
    # Dynamo would trace the allocator query and bake its answer into the graph without a
    # guard: under torch.compile the rule is off, and the graph holds PyTorch's convolution.
    monkeypatch.setattr(cpu_allocator, "_applied", False)
    x, w = _large_pair()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward
    compiled = torch.compile(lambda t, v: conv1x1(t, v), fullgraph=True, backend=capture)
    assert rel_err(compiled(x, w), F.conv2d(x, w)) < 1e-5
    assert len(graphs) == 1 and "conv2d" in graphs[0]
    assert "cpu_block_cache_stats" not in graphs[0] and "conv1x1_rows" not in graphs[0]
    assert _auto_ran_gemm(x, w)  # eager, the same call takes the pooled product


@needs_cpp
@pytest.mark.parametrize("shape", [(0, 3, 4, 5, 6), (2, 3, 4, 0, 6), (2, 0, 4, 5, 6)])
def test_rows_ops_on_empty_inputs(shape):
    n, c, k, h, w_ = shape
    x = torch.randn(n, c, h, w_).contiguous(memory_format=torch.channels_last)
    w = torch.randn(k, c, 1, 1)
    y = torch.ops.sficonv_ext.conv1x1_rows_forward(x, w)
    assert y.shape == (n, k, h, w_) and not y.any()  # empty, or the empty sum's zeros
    grad_x, grad_w = torch.ops.sficonv_ext.conv1x1_rows_backward(
        torch.randn(n, k, h, w_), x, w, True, True)
    assert grad_x.shape == x.shape and grad_w.shape == w.shape and not grad_w.any()
    torch.library.opcheck(torch.ops.sficonv_ext.conv1x1_rows_forward, (x, w))


@needs_cpp
def test_no_input_channels_into_a_reused_pool_block_gives_zeros():
    # A 32 MiB output with C = 0 takes the block a real output of that size just gave back:
    # its old values must not show through.
    x, w = _large_pair()
    cpu_allocator.trim_kernel_pool()
    y = torch.ops.sficonv_ext.conv1x1_rows_forward(x, w)
    assert y.abs().sum() > 0
    del y
    hits = cpu_allocator.kernel_pool_stats()["hits"]
    empty_x = torch.empty(2, 0, 128, 128).contiguous(memory_format=torch.channels_last)
    zeros = torch.ops.sficonv_ext.conv1x1_rows_forward(empty_x, torch.empty(256, 0, 1, 1))
    assert cpu_allocator.kernel_pool_stats()["hits"] == hits + 1  # the same block, reused
    assert zeros.shape == (2, 256, 128, 128) and not zeros.any()
    del zeros
    cpu_allocator.trim_kernel_pool()
