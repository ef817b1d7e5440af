"""The fused first SFIConv layer (``ops.first_sfi_conv``) against its composition and the
published layer. Without a GPU the Triton kernel runs in Triton's CPU interpreter (float32,
tiny shapes); on a GPU every dtype runs."""
import pytest
import torch

from sficonv_ext import ops
from sficonv_ext.nn import FirstSFIConv2d
from sficonv_ext.reference.layers import FirstSFIConv

from conftest import fresh_leaf, rel_err

needs_triton = pytest.mark.skipif(not ops.backends()["triton_ops"],
                                  reason="Triton ops unavailable")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _no_tf32():
    # The composed path's cuDNN convolutions would otherwise round float32 to TF32 (1e-3).
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run(backend, x, weight, mcs_weight, bias, split, constrained, grad):
    leaves = [fresh_leaf(t) if t is not None else None
              for t in (x, weight, mcs_weight, bias)]
    x, weight, mcs_weight, bias = leaves
    y = ops.first_sfi_conv(x, weight, mcs_weight, split, bias=bias, constrained=constrained,
                           backend=backend)
    inputs = [t for t in leaves if t is not None]
    return [y] + list(torch.autograd.grad(y, inputs, grad.to(y.dtype)))


def make_inputs(n, cin, h, w, cout, layout, dtype=torch.float32, device=DEVICE, bias=True,
                mcs_k=5):
    x = torch.randn(n, cin, h, w, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(n, cin, h, 2 * w, device=device)[..., ::2]
    weight = torch.randn(cout, cin, 1, 1, device=device)
    mcs_weight = torch.rand(cin, 1, mcs_k, mcs_k, device=device) + 0.5
    b = torch.randn(cout, device=device) if bias else None
    grad = torch.randn(n, cout, h, w, device=device)
    return [t.to(dtype) if t is not None else None for t in (x, weight, mcs_weight, b)] + [grad]


@needs_triton
@pytest.mark.parametrize("shape", [(2, 20, 7, 9, 24, 12), (1, 3, 5, 6, 17, 8),
                                   (1, 33, 4, 17, 16, 5)])
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "strided"])
@pytest.mark.parametrize("constrained", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_composition_float32(shape, layout, constrained, bias, mcs_k=5):
    n, cin, h, w, cout, split = shape
    x, weight, mcs_weight, b, grad = make_inputs(n, cin, h, w, cout, layout, bias=bias,
                                                 mcs_k=mcs_k)
    got = run("triton", x, weight, mcs_weight, b, split, constrained, grad)
    want = run("composed", *(t.double() if t is not None else None
                             for t in (x, weight, mcs_weight, b)), split, constrained,
               grad.double())
    assert len(got) == len(want)
    for a, e in zip(got, want):
        assert rel_err(a.double(), e) < 1e-5
    # The output keeps the input's layout (NCHW input once came back channels_last). Stated, not
    # taken from the float64 composition: on a GPU that runs a native kernel whose output is NCHW
    # whatever the input (cuDNN has no float64 channels_last), so its strides are no reference.
    want_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=want_format), (layout, got[0].stride())


@needs_triton
@pytest.mark.parametrize("mcs_k", [3, 7])  # the network's filter is 5x5; the kernel takes any odd k
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_fused_matches_composition_for_other_filter_sizes(mcs_k, layout):
    test_fused_matches_composition_float32((2, 20, 7, 9, 24, 12), layout, True, True, mcs_k)


def test_composition_matches_published_layer_float64():
    published = FirstSFIConv(8, 6, kernel_size=1, padding=0).double()
    fast = FirstSFIConv2d(8, 6, 1).double()
    with torch.no_grad():
        fast.weight.copy_(torch.cat([published.s2s.weight, published.f2f.weight]))
        fast.mcs.weight.copy_(published.MCSConv.weight)
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    assert rel_err(fast(x), torch.cat(published(x), 1)) < 1e-12


@needs_triton
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])  # the output follows x's layout
def test_first_layer_opcheck(layout):
    x, weight, mcs_weight, b, _ = make_inputs(1, 16, 4, 5, 16, layout)
    kwargs = {} if torch.cuda.is_available() else {
        # Triton's CPU interpreter dereferences fake tensors: those checks need a GPU.
        "test_utils": ("test_schema", "test_autograd_registration")}
    for bias, constrained in ((b, True), (None, True), (b, False)):
        torch.library.opcheck(torch.ops.sficonv_ext.first_sfi_conv_triton.default,
                              (x.requires_grad_(), weight.requires_grad_(), mcs_weight, bias, 8,
                               constrained, 1e-6), **kwargs)


def test_first_layer_rejects_bad_input():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(6, 4, 1, 1)
    mw = torch.rand(4, 1, 5, 5)
    with pytest.raises(ValueError, match="channels"):
        ops.first_sfi_conv(x, torch.randn(6, 3, 1, 1), mw, 3)
    with pytest.raises(ValueError, match="split"):
        ops.first_sfi_conv(x, w, mw, 6)
    with pytest.raises(TypeError, match="dtype"):
        ops.first_sfi_conv(x, w.double(), mw, 3)
    with pytest.raises(ValueError, match="backend"):
        ops.first_sfi_conv(x, w, mw, 3, backend="cuda")
    with pytest.raises(ValueError, match="bias"):
        ops.first_sfi_conv(x, w, mw, 3, bias=torch.randn(5))
    if ops.backends()["triton_ops"]:
        with pytest.raises(ValueError, match="1x1"):
            ops.first_sfi_conv(x, torch.randn(6, 4, 3, 3), mw, 3, backend="triton")


@pytest.mark.parametrize("mcs_shape,constrained,eps,match", [
    ((4, 1, 4, 4), False, 1e-6, "odd"), ((4, 1, 3, 5), False, 1e-6, r"\[C, 1, k, k\]"),
    ((4, 2, 3, 3), False, 1e-6, r"\[C, 1, k, k\]"), ((4, 1, 5, 5), True, 0.0, "eps")])
def test_fused_path_checks_the_mcs_filter_as_the_composed_path_does(mcs_shape, constrained, eps,
                                                                    match):
    # The fused kernel indexes a [C, 1, k, k] filter of odd k: anything else read past it.
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 1, 1)
    mw = torch.rand(*mcs_shape)
    for backend in ("composed", "triton"):
        with pytest.raises(ValueError, match=match):
            ops.first_sfi_conv(x, w, mw, 3, constrained=constrained, eps=eps, backend=backend)


@needs_triton
def test_fused_backward_can_be_differentiated_again():
    # A gradient penalty differentiates the backward: recomputed through PyTorch's MCSConv,
    # since the Triton backward ops have no autograd of their own.
    x, weight, mcs_weight, _, grad = make_inputs(1, 5, 6, 7, 8, "channels_last")

    def penalty_grads(backend):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, mcs_weight)]
        y = ops.first_sfi_conv(*leaves, 3, constrained=True, backend=backend)
        gx, = torch.autograd.grad((y * grad).sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(gx.square().sum(), leaves[1:])

    for got, want in zip(penalty_grads("triton"), penalty_grads("composed")):
        assert rel_err(got.double(), want.double()) < 1e-4
    # Only the bias trainable (a frozen layer's bias under a gradient penalty): nothing to
    # recompute, and the bias gradient still comes back differentiable.
    bias = torch.randn(8, device=DEVICE, requires_grad=True)
    y = ops.first_sfi_conv(x, weight, mcs_weight, 3, bias=bias, backend="triton")
    g_b, = torch.autograd.grad((y * grad).sum(), bias, create_graph=True)
    assert rel_err(g_b.double(), grad.sum(dim=(0, 2, 3)).double()) < 1e-5


GPU_TOLERANCES = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@cuda
@needs_triton
@pytest.mark.parametrize("dtype", sorted(GPU_TOLERANCES, key=str))
@pytest.mark.parametrize("shape", [(4, 64, 64, 64, 64, 32), (3, 64, 33, 19, 64, 32),
                                   (2, 20, 7, 9, 24, 12)])
def test_gpu_fused_matches_composition(dtype, shape):
    n, cin, h, w, cout, split = shape
    x, weight, mcs_weight, b, grad = make_inputs(n, cin, h, w, cout, "channels_last", dtype)
    got = run("triton", x, weight, mcs_weight, b, split, True, grad)
    want = run("composed", *(t.double() for t in (x, weight, mcs_weight, b)), split, True,
               grad.double())
    for a, e in zip(got, want):
        assert rel_err(a.double(), e) < GPU_TOLERANCES[dtype]


@cuda
@needs_triton
def test_gpu_auto_composes_and_triton_fuses():
    # The measured rule (see sficonv_ext/ops/first_layer.py): "auto" composes, in inference and
    # in training; backend="triton" runs the fused kernel.
    x = torch.randn(2, 64, 16, 16, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    weight = torch.randn(64, 64, 1, 1, device="cuda", dtype=torch.bfloat16)
    mcs_weight = torch.rand(64, 1, 5, 5, device="cuda", dtype=torch.bfloat16)

    def kernels(requires_grad, backend):
        weight.requires_grad_(requires_grad)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ops.first_sfi_conv(x, weight, mcs_weight, 32, backend=backend)
            torch.cuda.synchronize()
        return " ".join(e.name for e in prof.events())
    assert "_first_layer_kernel" not in kernels(False, "auto")
    assert "_first_layer_kernel" not in kernels(True, "auto")
    assert "_first_layer_kernel" in kernels(False, "triton")
