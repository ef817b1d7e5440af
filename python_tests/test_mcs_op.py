"""sficonv_ext.ops.mcs_conv (C++ CPU kernels) against the pure-PyTorch definition."""
import pytest
import torch
import torch.nn.functional as F

from sficonv_ext import ops
from sficonv_ext.nn import published_mcs_init
from sficonv_ext.reference import constrain_mcs_weight

from conftest import (fresh_leaf, laid_out, rel_err, signed_mcs_weights,
                      worst_channel_rel_err)

cpp = pytest.mark.skipif(not ops.backends()["cpp"], reason="C++ extension not built")


def expected(x, weight, constrained, eps=1e-6):
    """The op's definition, computed in float64 with PyTorch's own convolution."""
    w = weight.double()
    w = constrain_mcs_weight(w, eps) if constrained else w
    return F.conv2d(x.double(), w, padding=weight.shape[-1] // 2, groups=x.shape[1])


def both_grads(fn, x, weight, g):
    xr, wr = fresh_leaf(x), fresh_leaf(weight)
    y = fn(xr, wr)
    return (y,) + torch.autograd.grad(y, (xr, wr), g)


SHAPES = [(1, 1, 1, 1), (3, 3, 2, 67), (1, 64, 13, 7), (3, 1, 67, 3), (1, 3, 31, 29),
          (2, 3, 5, 61), (1, 3, 64, 64)]


@cpp
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 5, 7, 11])  # 1 and 11: the kernels' generic-k code
@pytest.mark.parametrize("constrained", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_float64_matches_definition(shape, k, constrained, layout):
    n, c, h, w = shape
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(n, c, h, 2 * w, dtype=torch.float64)[..., ::2]
    weight = torch.randn(c, 1, k, k, dtype=torch.float64)
    g = torch.randn(n, c, h, w, dtype=torch.float64)
    y, gx, gw = both_grads(lambda a, b: ops.mcs_conv(a, b, constrained=constrained,
                                                     backend="cpp"), x, weight, g)
    y_ref, gx_ref, gw_ref = both_grads(lambda a, b: ops.mcs_conv(a, b, constrained=constrained,
                                                                 backend="torch"), x, weight, g)
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(gx, gx_ref) < 1e-10
    assert rel_err(gw, gw_ref) < 1e-10
    if layout == "channels_last" and c > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)


# The C++ kernels take a vector path for whole 64-byte vectors of channels (channels_last: 16
# float32 or 8 float64 channels) or columns (NCHW weight gradient), with K = 3, 5, 7 unrolled,
# runs of 8 pixels away from the borders, and scalar code for the rest (and for other K). These
# shapes put every part in play: channel counts below, at and between whole vectors, widths
# shorter than a tap row, shorter than a run, and with runs plus leftover pixels.
VECTOR_PATH_SHAPES = [(2, 19, 11, 37), (1, 16, 3, 24), (1, 33, 9, 2), (2, 8, 1, 13),
                      (1, 17, 6, 67), (1, 48, 13, 9)]


@cpp
@pytest.mark.parametrize("shape", VECTOR_PATH_SHAPES)
@pytest.mark.parametrize("k", [3, 5, 7, 9])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [True, False])
def test_vector_paths_match_definition(shape, k, dtype, channels_last):
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # Positive taps keep the constraint's sum away from zero: float32 compares kernels here,
    # not the conditioning of a near-zero divisor.
    weight = torch.rand(shape[1], 1, k, k, dtype=dtype) + 0.5
    g = torch.randn(shape, dtype=dtype)
    y, gx, gw = both_grads(lambda a, b: ops.mcs_conv(a, b, backend="cpp"), x, weight, g)
    y_ref, gx_ref, gw_ref = both_grads(lambda a, b: ops.mcs_conv(a, b, backend="torch"),
                                       x.double(), weight.double(), g.double())
    tol = 1e-10 if dtype == torch.float64 else TOLERANCES[dtype]
    assert rel_err(y.double(), y_ref) < tol
    assert rel_err(gx.double(), gx_ref) < tol
    assert rel_err(gw.double(), gw_ref) < tol * 4


@cpp
@pytest.mark.parametrize("n", [0, 1, 3])
def test_batch_sizes_including_empty(n):
    x = torch.randn(n, 3, 9, 8, dtype=torch.float64)
    weight = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    y = ops.mcs_conv(x, weight, backend="cpp")
    assert y.shape == x.shape
    if n:
        assert rel_err(y, expected(x, weight, True)) < 1e-10
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    ops.mcs_conv(xr, wr, backend="cpp").sum().backward()
    assert wr.grad.shape == weight.shape and (n or torch.all(wr.grad == 0))


@pytest.mark.parametrize("x_shape, w_shape", [((2, 0, 8, 8), (0, 1, 5, 5)),
                                              ((2, 4, 0, 8), (4, 1, 5, 5)),
                                              ((0, 4, 8, 8), (4, 1, 5, 5))])
def test_the_torch_path_takes_empty_inputs_like_the_kernels(x_shape, w_shape):
    # F.conv2d alone refuses zero channels (groups=0) and images smaller than the filter.
    x = torch.randn(x_shape, requires_grad=True)
    weight = torch.randn(w_shape, requires_grad=True)
    y = ops.mcs_conv(x, weight, backend="torch")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert weight.grad.shape == weight.shape and torch.all(weight.grad == 0)


def test_the_torch_path_constrains_a_float16_filter_in_float32():
    # A small off-centre sum S (0.01) and a nearly uniform incoming gradient: the weight
    # gradient (g - mean(g)) / S is representable in float16, but the chain rule's terms g / S
    # and dot / S**2 are not, and in float16 they came out inf - inf: NaN for every tap.
    torch.manual_seed(0)
    weight = torch.randn(1, 1, 5, 5).half()
    off_centre_sum = weight.double().sum() - weight[0, 0, 2, 2].double()
    weight[0, 0, 0, 0] = (weight[0, 0, 0, 0].double() - off_centre_sum + 0.01).half()
    x = torch.ones(2, 1, 32, 32, dtype=torch.half)
    grad = (0.25 + 0.1 * torch.randn(2, 1, 32, 32)).half()
    w64 = weight.double().requires_grad_()  # float64 from the same float16 values
    F.conv2d(x.double(), constrain_mcs_weight(w64), padding=2).backward(grad.double())
    assert w64.grad.abs().max() < 6e4  # representable in float16
    w16 = weight.clone().requires_grad_()
    ops.mcs_conv(x, w16, backend="torch").backward(grad)
    assert torch.isfinite(w16.grad).all()
    # Loose: PyTorch's own float16 CPU convolution backward is this far off here (0.18 when
    # written; the C++ kernels, which accumulate in float32, 4e-4), amplified by 1/S.
    assert rel_err(w16.grad.double(), w64.grad) < 0.3


# Per-dtype tolerances (relative to the output's largest magnitude), float32 accumulation.
TOLERANCES = {torch.float32: 5e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@cpp
@pytest.mark.parametrize("dtype", sorted(TOLERANCES, key=str))
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_dtypes(dtype, channels_last):
    x = torch.randn(2, 16, 23, 17).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = signed_mcs_weights(16, 5, dtype)
    g = torch.randn(2, 16, 23, 17).to(dtype)
    y, gx, gw = both_grads(lambda a, b: ops.mcs_conv(a, b, backend="cpp"), x, weight, g)
    assert y.dtype == dtype and gw.dtype == dtype
    y_ref, gx_ref, gw_ref = both_grads(lambda a, b: ops.mcs_conv(a, b, backend="torch"),
                                       x.double(), weight.double(), g.double())
    tol = TOLERANCES[dtype]
    assert worst_channel_rel_err(y.double(), y_ref) < tol
    assert worst_channel_rel_err(gx.double(), gx_ref) < tol
    assert worst_channel_rel_err(gw.double(), gw_ref, dim=0) < tol * 4  # N*H*W products


@cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels", [4, 20])
def test_half_types_round_like_torch(dtype, channels_last, channels):
    # bfloat16/float16 run the float32 kernels with whole-vector conversions on load and store
    # (csrc/cpu_vector.h): the result must be the float32 kernel's, rounded as torch rounds,
    # bit for bit, NaN and overflow to infinity included.
    x = torch.randn(2, channels, 13, 37)
    x[0, 1, 6, 20] = float("nan")
    if dtype == torch.float16:
        x[1] *= 3e4  # some outputs overflow float16's 65504
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.rand(channels, 1, 5, 5) + 0.5).to(dtype)
    g = torch.randn(2, channels, 13, 37).to(dtype)
    got = torch.ops.sficonv_ext.mcs_conv_backward(g, x, weight, True, 1e-6, True, True)
    got = (torch.ops.sficonv_ext.mcs_conv_forward(x, weight, True, 1e-6),) + tuple(got)
    wide = torch.ops.sficonv_ext.mcs_conv_backward(g.float(), x.float(), weight.float(), True,
                                                   1e-6, True, True)
    wide = (torch.ops.sficonv_ext.mcs_conv_forward(x.float(), weight.float(), True, 1e-6),) + \
        tuple(wide)
    assert torch.isnan(got[0]).any()
    if dtype == torch.float16:
        assert torch.isinf(got[0]).any()
    for a, b in zip(got, wide):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b.to(dtype), rtol=0, atol=0, equal_nan=True)


@cpp
@pytest.mark.parametrize("constrained", [True, False])
# 3 channels: scalar code only; 19 float64 channels: channels_last runs two 8-lane vectors and a
# scalar tail (fewer channels than a vector take the NCHW kernels).
@pytest.mark.parametrize("channels,layout", [(3, "nchw"), (19, "nchw"), (19, "channels_last"),
                                             (19, "strided")])
def test_gradcheck(constrained, channels, layout):
    x = laid_out(torch.randn(2, channels, 6, 7, dtype=torch.float64), layout).requires_grad_()
    weight = torch.randn(channels, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: ops.mcs_conv(a, b, constrained=constrained, backend="cpp"), (x, weight))


@cpp
def test_the_raw_ops_refuse_float8():
    # float8 passed isFloatingType and failed later, in the dtype dispatch.
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3)
    with pytest.raises(RuntimeError, match="expected float32, float64, float16 or bfloat16"):
        torch.ops.sficonv_ext.mcs_conv_forward(x.to(torch.float8_e4m3fn),
                                               w.to(torch.float8_e4m3fn), True, 1e-6)


@cpp
# 4 channels are fewer than one float32 vector (the channels_last input takes the NCHW kernels);
# 20 run the channels_last vector kernels with a scalar tail.
@pytest.mark.parametrize("channels,layout", [(4, "nchw"), (4, "channels_last"),
                                             (20, "channels_last"), (20, "strided")])
def test_opcheck(channels, layout):
    x = laid_out(torch.randn(2, channels, 7, 6), layout)
    weight = torch.randn(channels, 1, 5, 5, requires_grad=True)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.sficonv_ext.mcs_conv_forward.default, (x, weight, True, 1e-6))
    g = laid_out(torch.randn(2, channels, 7, 6), layout)
    torch.library.opcheck(torch.ops.sficonv_ext.mcs_conv_backward.default,
                          (g, x.detach(), weight.detach(), True, 1e-6, True, True))
    torch.library.opcheck(torch.ops.sficonv_ext.mcs_conv_backward.default,
                          (g, x.detach(), weight.detach(), False, 1e-6, True, False))
    # Only the weight gradient: the (zero) x gradient still has x's layout, as the fake says.
    torch.library.opcheck(torch.ops.sficonv_ext.mcs_conv_backward.default,
                          (g, x.detach(), weight.detach(), True, 1e-6, False, True))


@cpp
@pytest.mark.parametrize("constrained", [True, False])
def test_second_derivatives_match_the_pytorch_path(constrained):
    # The backward op has no autograd of its own: create_graph=True must still give the true
    # second derivatives (gradient penalties), not PyTorch's silent-zero fallback.
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(3, 1, 3, 3, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda a, b: ops.mcs_conv(a, b, constrained=constrained, backend="cpp"), (x, weight))
    results = []
    for backend in ("cpp", "torch"):
        y = ops.mcs_conv(x, weight, constrained=constrained, backend=backend)
        gx, gw = torch.autograd.grad((y ** 2).sum(), (x, weight), create_graph=True)
        results.append(torch.autograd.grad(gx.sum() + (gw ** 2).sum(), (x, weight)))
    for got, expect in zip(*results):
        assert expect.abs().max() > 0 and rel_err(got, expect) < 1e-10


@cpp
@pytest.mark.parametrize("width", [5, 21])
def test_infinity_in_the_last_columns_leaves_other_taps_finite(width):
    # NCHW weight gradient: the last vector of a row must not multiply g's zero padding by an
    # infinite x (0 * inf = NaN) where the definition has no such product. Width 21 in float64:
    # two whole 8-lane vectors, then a scalar tail holding the infinity.
    x = torch.randn(1, 2, 4, width, dtype=torch.float64)
    x[0, 0, 2, width - 1] = float("inf")
    g = torch.randn(1, 2, 4, width, dtype=torch.float64)
    grads = []
    for backend in ("cpp", "torch"):
        weight = (torch.rand(2, 1, 3, 3, dtype=torch.float64, generator=torch.Generator()
                             .manual_seed(3)) + 0.5).requires_grad_()
        ops.mcs_conv(x, weight, constrained=False, backend=backend).backward(g)
        grads.append(weight.grad)
    assert torch.equal(torch.isnan(grads[0]), torch.isnan(grads[1]))
    finite = torch.isfinite(grads[1])
    assert finite.any() and rel_err(grads[0][finite], grads[1][finite]) < 1e-10


def _sum_over_taps_inside(x, taps):
    """sum_{a,b} taps[c, a, b] * x[i + a - p, j + b - p] over the taps whose pixel is inside the
    image: the op's definition, with no product for padding (so no inf * 0)."""
    n, c, h, w = x.shape
    k = taps.shape[-1]
    p = k // 2
    y = torch.zeros_like(x)
    for a in range(k):
        for b in range(k):
            i0, i1, j0, j1 = max(0, p - a), min(h, h + p - a), max(0, p - b), min(w, w + p - b)
            if i0 < i1 and j0 < j1:
                y[:, :, i0:i1, j0:j1] += (taps[:, a, b].view(1, c, 1, 1) *
                                          x[:, :, i0 + a - p:i1 + a - p, j0 + b - p:j1 + b - p])
    return y


def _weight_grad_over_taps_inside(x, g, k):
    c, h, w, p = x.shape[1], x.shape[2], x.shape[3], k // 2
    out = torch.zeros(c, k, k, dtype=x.dtype)
    for a in range(k):
        for b in range(k):
            i0, i1, j0, j1 = max(0, p - a), min(h, h + p - a), max(0, p - b), min(w, w + p - b)
            if i0 < i1 and j0 < j1:
                window = x[:, :, i0 + a - p:i1 + a - p, j0 + b - p:j1 + b - p]
                out[:, a, b] = (g[:, :, i0:i1, j0:j1] * window).sum((0, 2, 3))
    return out.view(c, 1, k, k)


@cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout,channels", [("nchw", 3), ("nchw", 17), ("channels_last", 3),
                                             ("channels_last", 17)])
@pytest.mark.parametrize("where", ["tap", "x", "grad"])
def test_infinities_make_the_nans_of_the_definition(dtype, layout, channels, where):
    # An infinite filter tap, input or gradient value next to the border: every path (NCHW
    # padded planes, channels_last vector runs and edge pixels, channel tails, the NCHW detour
    # for few channels) must give the definition's infinities and NaNs, no NaN from a product
    # with a padding zero. 17 channels: whole vectors plus a tail channel in both dtypes.
    k, (n, h, w) = 5, (2, 9, 21)
    x = torch.randn(n, channels, h, w, dtype=dtype)
    g = torch.randn(n, channels, h, w, dtype=dtype)
    weight = torch.randn(channels, 1, k, k, dtype=dtype)
    for c in (1, channels - 1):
        if where == "tap":
            weight[c, 0, 0, 4] = float("inf")
        elif where == "x":
            x[0, c, 0, w - 1] = float("inf")
        else:  # both edges: the left and right runs skip different window columns
            g[1, c, h - 1, 0] = -float("inf")
            g[0, c, 0, w - 1] = float("inf")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
    y = torch.ops.sficonv_ext.mcs_conv_forward(x, weight, False, 1e-6)
    gx, gw = torch.ops.sficonv_ext.mcs_conv_backward(g, x, weight, False, 1e-6, True, True)
    taps = weight[:, 0].double()
    want_y = _sum_over_taps_inside(x.double(), taps)
    want_gx = _sum_over_taps_inside(g.double(), taps.flip(-1, -2))
    want_gw = _weight_grad_over_taps_inside(x.double(), g.double(), k)
    assert not (torch.isfinite(want_y).all() and torch.isfinite(want_gw).all())  # a real case
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for got, want in ((y, want_y), (gx, want_gx), (gw, want_gw)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, equal_nan=True)


@cpp
def test_compile_fullgraph_no_graph_break():
    def f(x, w):
        return ops.mcs_conv(x, w, backend="cpp").relu().sum()
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    w = torch.randn(3, 1, 5, 5, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, w)
    out.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    f(x, w).backward()
    assert torch.allclose(out, f(x, w))
    assert torch.allclose(gx, x.grad) and torch.allclose(gw, w.grad)


@cpp
def test_zero_sum_channel_is_clamped_to_positive_eps():
    weight = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    weight[1] = 0.0
    weight[1, 0, 0, 0], weight[1, 0, 4, 4] = 1.0, -1.0  # off-centre sum exactly 0
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    y = ops.mcs_conv(x, weight, eps=1e-3, backend="cpp")
    assert rel_err(y, expected(x, weight, True, eps=1e-3)) < 1e-10
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    ops.mcs_conv(xr, wr, eps=1e-3, backend="cpp").sum().backward()
    xt, wt = x.clone().requires_grad_(), weight.clone().requires_grad_()
    ops.mcs_conv(xt, wt, eps=1e-3, backend="torch").sum().backward()
    assert rel_err(wr.grad, wt.grad) < 1e-10


@cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sums_inside_the_clamp_keep_their_sign(dtype, channels_last):
    # |S| below eps is clamped to eps with S's sign: -eps/10 divides by -eps, +eps/10 by +eps.
    # 20 channels: whole vectors and a scalar tail in channels_last, in both dtypes.
    eps = 1e-3
    weight = torch.rand(20, 1, 3, 3, dtype=torch.float64) + 0.5
    for c, s in [(1, -eps / 10), (2, eps / 10), (5, -2 * eps), (11, -eps / 3), (19, 0.0)]:
        weight[c] = 0.0
        weight[c, 0, 0, 0], weight[c, 0, 2, 2] = 1.0, s - 1.0  # off-centre sum exactly s
    weight = weight.to(dtype)
    x = torch.randn(2, 20, 11, 13, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 20, 11, 13, dtype=dtype)
    got = both_grads(lambda a, b: ops.mcs_conv(a, b, eps=eps, backend="cpp"), x, weight, g)
    want = both_grads(lambda a, b: ops.mcs_conv(a, b, eps=eps, backend="torch"),
                      x.double(), weight.double(), g.double())
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, b in zip(got, want):
        assert rel_err(a.double(), b) < tol


@cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_weight_gradient_of_non_finite_taps_matches_the_torch_path(dtype):
    # The chain rule through the constraint (csrc constraint_grad, the same function a CUDA
    # kernel runs) against the PyTorch path: an inf or NaN centre tap is never used (finite
    # gradients elsewhere); a NaN or inf off-centre tap makes that channel's sum, and so its
    # off-centre gradient, NaN; the centre's gradient is 0 always; |S| exactly eps passes the
    # gradient through S.
    eps = 2.0 ** -10  # exact in every dtype here
    weight = torch.rand(6, 1, 5, 5, dtype=torch.float64) + 0.5
    weight[0, 0, 2, 2] = float("inf")
    weight[1, 0, 2, 2] = float("nan")
    weight[2, 0, 0, 1] = float("nan")
    weight[3, 0, 4, 0] = float("inf")
    weight[4] = 0.0
    weight[4, 0, 0, 0] = eps  # S == eps exactly
    weight = weight.to(dtype)
    x = torch.randn(2, 6, 9, 10, dtype=dtype)
    g = torch.randn(2, 6, 9, 10, dtype=dtype)
    grads = {}
    for backend in ("cpp", "torch"):
        w = weight.clone().requires_grad_()
        y = ops.mcs_conv(x, w, eps=eps, backend=backend)
        grads[backend], = torch.autograd.grad(y, w, g)
    got, want = grads["cpp"].double(), grads["torch"].double()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isfinite(got[[0, 1, 4, 5]]).all()
    assert (got[:, 0, 2, 2] == 0).all()  # the centre's gradient, whatever the channel
    off_centre = torch.ones(25, dtype=torch.bool)
    off_centre[12] = False
    assert torch.isnan(got[[2, 3], 0].flatten(1)[:, off_centre]).all()
    # Channel by channel: the one at |S| == eps has gradients 1e4 times the others'.
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for c in range(6):
        finite = torch.isfinite(want[c])
        assert rel_err(got[c][finite], want[c][finite]) < tol, c


@cpp
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels", [4, 20])  # 20: a whole float32 vector plus a scalar tail
def test_nan_propagates(channels_last, channels):
    x = torch.randn(1, channels, 19, 19)
    x[0, 2, 9, 9] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = ops.mcs_conv(x, torch.randn(channels, 1, 5, 5), backend="cpp")
    assert torch.isnan(y[0, 2, 7:12, 7:12]).all()
    others = [c for c in range(channels) if c != 2]
    assert not torch.isnan(y[0, others]).any() and not torch.isnan(y[0, 2, 0, 0])


@cpp
@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_gradient_is_deterministic(channels_last):
    # Bitwise the same on repeats and whatever the thread count (the kernels run under
    # at::parallel_for, OpenMP: the partial sums are fixed per plane/chunk and reduced in order).
    x = torch.randn(4, 19, 33, 35)  # 19 channels: the vector path and the scalar tail
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(19, 1, 5, 5)
    g = torch.randn_like(x)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, threads), max(2, threads)):
            torch.set_num_threads(n)
            outs.append(torch.ops.sficonv_ext.mcs_conv_backward(g, x, weight, True, 1e-6, True,
                                                                True))
    finally:
        torch.set_num_threads(threads)
    for gx, gw in outs[1:]:
        assert torch.equal(gx, outs[0][0]) and torch.equal(gw, outs[0][1])


@pytest.mark.parametrize("x,weight,error,pattern", [
    (torch.randn(1, 3, 8, 8), torch.randn(3, 1, 4, 4), ValueError, "odd"),
    (torch.randn(1, 3, 8, 8), torch.randn(3, 2, 5, 5), ValueError, r"\[C, 1, k, k\]"),
    (torch.randn(1, 3, 8, 8), torch.randn(4, 1, 5, 5), ValueError, "4 channels but x has 3"),
    (torch.randn(3, 8, 8), torch.randn(3, 1, 5, 5), ValueError, "4-D"),
    (torch.randn(1, 3, 8, 8), torch.randn(3, 1, 5, 5, dtype=torch.float64), TypeError,
     "float32 but weight is torch.float64"),
    (torch.ones(1, 3, 8, 8, dtype=torch.int64), torch.ones(3, 1, 5, 5, dtype=torch.int64),
     TypeError, "floating"),
])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_inputs(x, weight, error, pattern, backend):
    with pytest.raises(error, match=pattern):
        ops.mcs_conv(x, weight, backend=backend)


def test_bad_backend_and_eps():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(3, 1, 5, 5)
    with pytest.raises(ValueError, match="backend"):
        ops.mcs_conv(x, w, backend="opencl")
    with pytest.raises(ValueError, match="eps"):
        ops.mcs_conv(x, w, eps=0.0)
    with pytest.raises(ValueError, match="CUDA tensors"):
        ops.mcs_conv(x, w, backend="cuda")


@cpp
def test_cpp_kernel_checks_reach_python():
    # The C++ op validates too, for callers that bypass mcs_conv.
    with pytest.raises(RuntimeError, match="kernel size must be odd"):
        torch.ops.sficonv_ext.mcs_conv_forward(torch.randn(1, 3, 8, 8),
                                               torch.randn(3, 1, 4, 4), True, 1e-6)


def test_backends_reports_consistently():
    info = ops.backends()
    assert info["auto_cpu"] == ("cpp" if info["cpp"] else "torch")
    assert info["auto_cpu_channels_last_frozen"] == ("cpp" if info["cpp"] else "torch")
    assert info["auto_cpu_channels_last_frozen_bfloat16"] == "torch"
    assert info["auto_cpu_channels_last_frozen_bfloat16_grad"] == ("cpp" if info["cpp"]
                                                                   else "torch")
    assert set(["cpp", "cuda", "triton", "cuda_archs", "torch"]) <= set(info)


@cpp
def test_auto_rule_on_cpu():
    x = torch.randn(1, 4, 6, 6)
    cl = x.contiguous(memory_format=torch.channels_last)
    frozen, learnable = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5, requires_grad=True)
    assert ops.resolve_backend("auto", x, frozen) == "cpp"
    assert ops.resolve_backend("auto", cl, learnable) == "cpp"
    assert ops.resolve_backend("auto", cl, frozen) == "cpp"
    # bfloat16 channels_last with a frozen filter: oneDNN's forward measured faster, ours
    # forward + backward, so oneDNN only where no input gradient is asked for.
    assert ops.resolve_backend("auto", cl.bfloat16(), frozen.bfloat16()) == "torch"
    training_input = cl.bfloat16().requires_grad_()
    assert ops.resolve_backend("auto", training_input, frozen.bfloat16()) == "cpp"
    with torch.no_grad():
        assert ops.resolve_backend("auto", training_input, frozen.bfloat16()) == "torch"
    assert ops.resolve_backend("auto", cl.bfloat16(), learnable.bfloat16()) == "cpp"


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_autocast_casts_both_inputs(backend):
    x = torch.randn(1, 3, 9, 9, dtype=torch.bfloat16)  # as a bf16 layer would hand it over
    # A float32 parameter of published taps that cancel (up to 80): constrained after its
    # cast to bfloat16 it would be 14% off, constrained first 0.1%.
    draws = [published_mcs_init(3, generator=torch.Generator().manual_seed(s))
             for s in range(40)]
    w = max(draws, key=lambda d: d.abs().max()).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.mcs_conv(x, w, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
    # The constraint first, at the filter's precision, then the cast (constrain_before_autocast).
    want = expected(x, constrain_mcs_weight(w.detach()).bfloat16(), False)
    assert rel_err(y.double(), want) < 2e-2


@pytest.mark.parametrize("backend", ["torch"] + (["cpp"] if ops.backends()["cpp"] else []))
def test_autocast_leaves_float64_alone_like_conv2d(backend):
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    w = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.mcs_conv(x, w, backend=backend)
        reference = torch.nn.functional.conv2d(x, w, padding=2, groups=3)
    assert y.dtype == reference.dtype == torch.float64
    assert rel_err(y, expected(x, w, True)) < 1e-10


def test_autocast_leaves_float64_alone_in_the_first_layer():
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    weight = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    mcs_weight = torch.rand(4, 1, 5, 5, dtype=torch.float64) + 0.5
    plain = ops.first_sfi_conv(x, weight, mcs_weight, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.first_sfi_conv(x, weight, mcs_weight, 3)
    assert got.dtype == torch.float64 and torch.equal(got, plain)


def reference_mcs(x, weight, eps=1e-6):
    """The published constraint and PyTorch's depthwise convolution, differentiated by autograd."""
    return F.conv2d(x, constrain_mcs_weight(weight, eps), padding=weight.shape[-1] // 2,
                    groups=x.shape[1])


@cpp
@pytest.mark.parametrize("centre", [float("inf"), float("nan")])
def test_a_non_finite_raw_centre_tap_leaves_the_gradients_finite(centre):
    # The constraint never uses the raw centre tap (it becomes -1): the forward ignores it, and
    # the weight gradient once went NaN for the whole channel (inf * 0 in the backward).
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    w[0, 0, 1, 1] = centre
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    g = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    got = both_grads(lambda a, b: ops.mcs_conv(a, b, backend="cpp"), x, w, g)
    want = both_grads(lambda a, b: reference_mcs(a, b), x, w, g)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-10


@cpp
def test_a_nan_gradient_leaves_the_centre_taps_gradient_zero():
    # The centre is the constant -1: its gradient is 0 whatever arrives (NaN * 0 was NaN).
    w = torch.rand(2, 1, 3, 3, dtype=torch.float64) + 0.5
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    g = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    g[0, 0, 2, 2] = float("nan")
    got = both_grads(lambda a, b: ops.mcs_conv(a, b, backend="cpp"), x, w, g)[2]
    want = both_grads(lambda a, b: reference_mcs(a, b), x, w, g)[2]
    assert got[:, 0, 1, 1].eq(0).all() and want[:, 0, 1, 1].eq(0).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
