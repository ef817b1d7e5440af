"""The Triton MCSConv against the pure-PyTorch definition. Without a GPU this runs in Triton's
CPU interpreter (conftest sets TRITON_INTERPRET=1): float32 and tiny shapes only there."""
import pytest
import torch

from sficonv_ext import ops

from conftest import (fresh_leaf, laid_out, rel_err, signed_mcs_weights,
                      worst_channel_rel_err)

needs_triton = pytest.mark.skipif(not ops.backends()["triton_ops"],
                                  reason="Triton ops unavailable")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def grads(backend, x, weight, g, constrained):
    xr, wr = fresh_leaf(x), fresh_leaf(weight)
    y = ops.mcs_conv(xr, wr, constrained=constrained, backend=backend)
    return (y,) + torch.autograd.grad(y, (xr, wr), g)


@needs_triton
@pytest.mark.parametrize("shape,k", [((2, 3, 7, 37), 5), ((1, 2, 17, 5), 3), ((1, 1, 1, 1), 5),
                                     ((1, 2, 9, 9), 7), ((1, 40, 5, 6), 3), ((1, 3, 6, 5), 1),
                                     ((1, 2, 13, 12), 11)])
@pytest.mark.parametrize("constrained", [True, False])
# "channels_last_grad": the output gradient in channels_last too. The backward picks its input
# gradient kernel by the gradient's layout, so that is the channels_last kernel's mirrored pass.
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channels_last_grad", "strided"])
def test_triton_float32_matches_torch(shape, k, constrained, layout):
    n, c, h, w = shape
    x = torch.randn(n, c, h, w, device=DEVICE)
    if layout.startswith("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(n, c, h, 2 * w, device=DEVICE)[..., ::2]
    weight = signed_mcs_weights(c, k, device=DEVICE)
    g = torch.randn(n, c, h, w, device=DEVICE)
    if layout == "channels_last_grad":
        g = g.contiguous(memory_format=torch.channels_last)
    got = grads("triton", x, weight, g, constrained)
    want = grads("torch", x.double(), weight.double(), g.double(), constrained)
    for a, b, dim in zip(got, want, (1, 1, 0)):  # y, grad x, grad weight
        assert worst_channel_rel_err(a.double(), b, dim) < 5e-5  # float32
    if layout.startswith("channels_last") and c > 1:
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_sums_inside_the_clamp_keep_their_sign(layout):
    # |S| below eps is clamped to eps with S's sign (0 counting as positive): -eps/10 divides
    # by -eps, +eps/10 by +eps. A kernel that clamped to +eps, or took |S|, fails here.
    eps = 1e-3
    weight = torch.rand(6, 1, 3, 3, dtype=torch.float64) + 0.5
    for c, s in [(1, -eps / 10), (2, eps / 10), (3, -2 * eps), (5, 0.0)]:
        weight[c] = 0.0
        weight[c, 0, 0, 0], weight[c, 0, 2, 2] = 1.0, s - 1.0  # off-centre sum exactly s
    x = torch.randn(1, 6, 5, 7, device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(1, 6, 5, 7, device=DEVICE)
    weight32 = weight.float().to(DEVICE)
    xr, wr = x.clone().requires_grad_(), weight32.clone().requires_grad_()
    y = ops.mcs_conv(xr, wr, eps=eps, backend="triton")
    got = (y,) + torch.autograd.grad(y, (xr, wr), g)
    xt, wt = x.double().requires_grad_(), weight32.double().requires_grad_()
    y = ops.mcs_conv(xt, wt, eps=eps, backend="torch")
    want = (y,) + torch.autograd.grad(y, (xt, wt), g.double())
    for a, b in zip(got, want):
        assert rel_err(a.double(), b) < 1e-4


@needs_triton
def test_triton_rejects_float64():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        ops.mcs_conv(x, torch.randn(2, 1, 3, 3, dtype=torch.float64, device=DEVICE),
                     backend="triton")


# Triton's CPU interpreter dereferences fake tensors, so fake-tensor and AOT checks need a GPU.
OPCHECK_UTILS = (None if torch.cuda.is_available()
                 else ("test_schema", "test_autograd_registration"))


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_opcheck(layout):
    x = laid_out(torch.randn(1, 4, 6, 5, device=DEVICE), layout).requires_grad_()
    w = torch.randn(4, 1, 3, 3, device=DEVICE, requires_grad=True)
    kwargs = {} if OPCHECK_UTILS is None else {"test_utils": OPCHECK_UTILS}
    torch.library.opcheck(torch.ops.sficonv_ext.mcs_conv_triton_forward.default,
                          (x, w, True, 1e-6), **kwargs)
    g = laid_out(torch.randn(1, 4, 6, 5, device=DEVICE), layout)
    for need_x, need_w in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.sficonv_ext.mcs_conv_triton_backward.default,
                              (g, x.detach(), w.detach(), True, 1e-6, need_x, need_w), **kwargs)


@needs_triton
def test_triton_second_derivatives_follow_the_pytorch_path():
    # Shared autograd: create_graph=True recomputes through PyTorch, not silent zeros.
    x = torch.randn(1, 2, 6, 7, device=DEVICE)
    weight = torch.rand(2, 1, 3, 3, device=DEVICE) + 0.5
    results = []
    for backend in ("triton", "torch"):
        xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
        y = ops.mcs_conv(xr, wr, backend=backend)
        gx, gw = torch.autograd.grad((y ** 2).sum(), (xr, wr), create_graph=True)
        results.append(torch.autograd.grad(gx.sum() + (gw ** 2).sum(), (xr, wr)))
    for got, expect in zip(*results):
        assert expect.abs().max() > 0 and rel_err(got, expect) < 1e-5


@needs_triton
def test_triton_nan_filter_tap_makes_its_channel_nan_as_in_the_other_backends():
    # A diverged filter must show in the output, not be clamped or masked away: every output
    # of that channel is NaN (padding multiplies the NaN tap too), the other channel finite.
    weight = torch.rand(2, 1, 3, 3, device=DEVICE) + 0.5
    weight[1, 0, 0, 0] = float("nan")
    x = torch.randn(1, 2, 4, 5, device=DEVICE)
    got = ops.mcs_conv(x, weight, backend="triton")
    want = ops.mcs_conv(x, weight, backend="torch")
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isnan(got[0, 1]).all() and not torch.isnan(got[0, 0]).any()


@needs_triton
def test_triton_a_non_finite_raw_centre_tap_leaves_the_weight_gradient_finite():
    # The Triton backward's constraint step once multiplied the centre by 0 (inf * 0 is NaN).
    weight = torch.rand(2, 1, 3, 3, device=DEVICE) + 0.5
    weight[0, 0, 1, 1] = float("inf")
    x = torch.randn(1, 2, 5, 6, device=DEVICE)
    g = torch.randn(1, 2, 5, 6, device=DEVICE)
    got = grads("triton", x, weight, g, True)
    want = grads("torch", x.double(), weight.double(), g.double(), True)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and rel_err(a.double(), b) < 5e-5


@needs_triton
def test_triton_constraint_step_matches_the_torch_one():
    # The one-kernel chain rule through the constraint against mcs_torch's tensor ops, channel
    # by channel: sums exactly 0, inside the clamp with either sign, exactly eps, inf and NaN
    # centre taps (never used), a NaN and an inf off-centre tap (their channel's sum is
    # non-finite); 37 channels, more than one program's block.
    from sficonv_ext.ops.mcs_torch import constraint_backward
    from sficonv_ext.ops.mcs_triton_constraint import constraint_backward_triton
    eps = 2.0 ** -10
    weight = torch.rand(37, 1, 5, 5, device=DEVICE) + 0.5
    for c, s in [(1, 0.0), (2, eps / 8), (3, -eps / 8), (4, eps), (5, -3 * eps)]:
        weight[c] = 0.0
        weight[c, 0, 0, 0], weight[c, 0, 4, 4] = 1.0, s - 1.0
    weight[6, 0, 2, 2], weight[7, 0, 2, 2] = float("inf"), float("nan")
    weight[8, 0, 1, 3], weight[9, 0, 3, 0] = float("nan"), float("inf")
    grad_eff = torch.randn(37, 25, device=DEVICE)
    grad_eff[10, 12] = float("nan")  # the centre's incoming gradient: reaches nothing
    got = constraint_backward_triton(grad_eff, weight, True, eps)
    want = constraint_backward(grad_eff.double(), weight.double(), True, eps)
    assert got.shape == weight.shape and got.dtype == weight.dtype
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    # Channel by channel: the channels near the clamp have gradients 1e4-1e6 times the others'.
    for c in range(37):
        finite = torch.isfinite(want[c])
        assert rel_err(got[c][finite].double(), want[c][finite]) < 1e-5, c
