"""Forward-mode AD and torch.func transforms: the custom kernels have no jvp formula or batching
rule, so "auto" must take PyTorch ops there (before, the C++ MCSConv kernel and the oneDNN
inference layers returned their primal and dropped the tangent without a word), and an
explicitly chosen kernel must be refused."""
import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn as nn

from sficonv_ext import models, ops

from conftest import make_pair, rel_err


def _tangent(fn, x, t):
    with fwad.dual_level():
        return fwad.unpack_dual(fn(fwad.make_dual(x, t))).tangent


@pytest.mark.parametrize("constrained", [True, False])
def test_mcs_conv_tangent_matches_the_pytorch_path(constrained):
    x, t = torch.randn(2, 4, 9, 11), torch.randn(2, 4, 9, 11)
    w = torch.randn(4, 1, 5, 5)
    want = _tangent(lambda i: ops.mcs_conv(i, w, constrained=constrained, backend="torch"), x, t)
    got = _tangent(lambda i: ops.mcs_conv(i, w, constrained=constrained), x, t)
    assert got is not None and rel_err(got, want) < 1e-6
    _, jvp = torch.func.jvp(lambda i: ops.mcs_conv(i, w, constrained=constrained), (x,), (t,))
    assert rel_err(jvp, want) < 1e-6
    # A tangent on the weight, through the constraint.
    tw = torch.randn_like(w)
    want_w = _tangent(lambda v: ops.mcs_conv(x, v, constrained=constrained, backend="torch"),
                      w, tw)
    got_w = _tangent(lambda v: ops.mcs_conv(x, v, constrained=constrained), w, tw)
    assert rel_err(got_w, want_w) < 1e-6


def test_explicit_kernel_backends_are_refused_under_forward_ad():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3)
    with fwad.dual_level(), pytest.raises(ValueError, match="forward-mode"):
        ops.mcs_conv(fwad.make_dual(x, torch.randn_like(x)), w, backend="cpp")
    bn = nn.BatchNorm2d(4)
    with fwad.dual_level(), pytest.raises(ValueError, match="forward-mode"):
        ops.batch_norm_act(fwad.make_dual(x, torch.randn_like(x)), bn, backend="cpp")


def test_model_jvp_matches_finite_differences_in_float64():
    _, fast = make_pair(26)  # float64
    fast.eval()
    x, t = torch.randn(1, 3, 64, 64, dtype=torch.float64), torch.randn(1, 3, 64, 64,
                                                                       dtype=torch.float64)
    _, jvp = torch.func.jvp(fast, (x,), (t,))
    h = 1e-6
    with torch.no_grad():
        finite = (fast(x + h * t) - fast(x - h * t)) / (2 * h)
    assert rel_err(jvp, finite) < 1e-6


def test_fused_model_tangent_matches_the_eager_model():
    _, fast = make_pair(26, dtype=torch.float32)
    fast.eval()
    fused = models.fuse_for_inference(fast)  # oneDNN layers on the CPU
    x, t = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    want = _tangent(fast, x, t)
    got = _tangent(fused, x, t)
    assert rel_err(got, want) < 1e-4


def test_torch_func_grad_of_the_model_matches_autograd():
    _, fast = make_pair(26, dtype=torch.float32)
    fast.eval()
    x = torch.randn(1, 3, 64, 64)
    got = torch.func.grad(lambda i: fast(i).square().sum())(x)
    xi = x.clone().requires_grad_()
    fast(xi).square().sum().backward()
    assert rel_err(got, xi.grad) < 1e-5


@pytest.mark.parametrize("fuse", [False, True])
def test_per_sample_gradients_with_vmap_match_autograd(fuse):
    # The model's entry conversion to channels_last is not implemented under vmap: the input
    # keeps its layout there (the weights stay channels_last).
    _, fast = make_pair(26, dtype=torch.float32)
    fast.eval()
    model = models.fuse_for_inference(fast) if fuse else fast
    x = torch.randn(2, 3, 64, 64)

    def loss(sample):
        return model(sample.unsqueeze(0)).square().sum()

    got = torch.func.vmap(torch.func.grad(loss))(x)
    for i in range(2):
        xi = x[i:i + 1].clone().requires_grad_()
        model(xi).square().sum().backward()
        assert rel_err(got[i:i + 1], xi.grad) < 1e-5


def test_transforms_after_a_compiled_call_under_forward_ad_still_take_pytorch_ops():
    # A compiled call under forward AD once made Dynamo compile the transform check as a frame
    # of its own, its answer baked in: torch.func.grad then ran the C++ kernel and failed, and
    # vmap fell back to a slow per-sample loop with a warning.
    import warnings
    torch._dynamo.reset()
    x, w = torch.randn(2, 4, 9, 9), torch.randn(4, 1, 3, 3)

    def f(a, b):
        return ops.mcs_conv(a, b) * 2.0

    compiled = torch.compile(f, backend="eager")
    try:
        with fwad.dual_level():
            out = compiled(fwad.make_dual(x, torch.randn_like(x)), w)
            assert fwad.unpack_dual(out).tangent is not None
        want = torch.func.grad(lambda a: f(a, w).sum())(x)
        got = torch.func.grad(lambda a: compiled(a, w).sum())(x)
        assert rel_err(got, want) < 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            batched = torch.func.vmap(lambda a: compiled(a, w))(torch.stack([x, x + 1]))
        assert rel_err(batched[1], f(x + 1, w)) < 1e-6
    finally:
        torch._dynamo.reset()


def test_a_compiled_call_under_forward_ad_keeps_the_tangent():
    # torch 2.11's Dynamo traced unpack_dual's tangent as None: the compiled call ran the C++
    # kernel and returned no tangent (torch 2.14 kept it). Then plain calls go back to the kernel.
    torch._dynamo.reset()
    x, t, w = torch.randn(2, 4, 9, 9), torch.randn(2, 4, 9, 9), torch.randn(4, 1, 5, 5)
    compiled = torch.compile(lambda a: ops.mcs_conv(a, w) * 2.0, backend="eager")
    try:
        want = _tangent(lambda a: ops.mcs_conv(a, w, backend="torch") * 2.0, x, t)
        got = _tangent(compiled, x, t)
        assert got is not None and rel_err(got, want) < 1e-6
        with torch.profiler.profile() as prof:  # the dual level closed: the kernel again
            plain = compiled(x)
        assert rel_err(plain, ops.mcs_conv(x, w) * 2.0) < 1e-6
        names = {e.key for e in prof.key_averages()}
        if ops.backends()["cpp"]:
            assert "sficonv_ext::mcs_conv_forward" in names, names
    finally:
        torch._dynamo.reset()
