"""The C++ BatchNorm + residual add + ReLU epilogue (``batch_norm_act(..., backend="cpp")``,
csrc/norm_act_cpu.cpp) against PyTorch's BatchNorm in float64: outputs, every gradient, running
statistics, both layouts and strided inputs, opcheck, gradcheck, thread-count determinism and
bad input."""
import copy

import pytest
import torch

from sficonv_ext import models, ops
from sficonv_ext.ops import _extension

from conftest import epilogue_step as run
from conftest import make_bn as conftest_make_bn
from conftest import OpCounter, laid_out, make_pair, rel_err

pytestmark = pytest.mark.skipif(not _extension.has_cpp_kernels(),
                                reason="the C++ extension is not built")
OP = "sficonv_ext::batch_norm_act_forward"
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3,
              torch.bfloat16: 3e-2}


def make_bn(c, momentum=0.1, dtype=torch.float64):
    return conftest_make_bn(c, momentum, dtype=dtype)


def inputs(shape, dtype, residual, kind):
    x = laid_out((torch.randn(shape, dtype=torch.float64) * 2 + 0.7).to(dtype), kind)
    r = laid_out(torch.randn(shape, dtype=torch.float64).to(dtype), kind) if residual else None
    return x, r, laid_out(torch.randn(shape, dtype=torch.float64), kind)


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (3, 3, 4, 3), (1, 64, 13, 11), (2, 1, 1, 67),
                                   (4, 17, 1, 1)])
@pytest.mark.parametrize("kind", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (True, False),
                                           (False, False)])
def test_cpp_epilogue_matches_batchnorm_float64(shape, kind, residual, relu):
    bn = make_bn(shape[1])
    x, r, g = inputs(shape, torch.float64, residual, kind)
    got = run(copy.deepcopy(bn), x, r, relu, g, "cpp")
    want = run(bn, x, r, relu, g, "torch")
    for a, e in zip(got, want):
        assert rel_err(a, e.to(a.dtype)) < 1e-10
    y = got[0]
    if kind == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_cpp_running_statistics_over_several_steps(momentum):
    bn = make_bn(6, momentum)
    bn_ref = copy.deepcopy(bn)
    for _ in range(3):
        x = torch.randn(3, 6, 5, 4, dtype=torch.float64) * 3 + 1
        ops.batch_norm_act(x, bn, backend="cpp")
        ops.batch_norm_act(x, bn_ref, backend="torch")
    for a, e in zip(bn.buffers(), bn_ref.buffers()):
        assert rel_err(a.double(), e.double()) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_cpp_epilogue_lower_precision(dtype, kind):
    shape = (4, 32, 9, 11)
    bn = make_bn(shape[1], dtype=torch.float32)
    x, r, g = inputs(shape, dtype, True, kind)
    got = run(copy.deepcopy(bn), x, r, True, g, "cpp")
    assert got[0].dtype == dtype
    # Values within rounding of 0 may fall on either side of the ReLU in another precision:
    # the reference takes its mask from the kernel's output (as the GPU tests do).
    bn64 = copy.deepcopy(bn).double()
    want_y = run(copy.deepcopy(bn64), x.double(), r.double(), True, g, "torch")[0]
    assert rel_err(got[0].double(), want_y) < TOLERANCES[dtype]
    mask = (got[0] > 0).double()
    want = run(bn64, x.double(), r.double(), False, g * mask, "torch")
    for a, e in zip(got[1:], want[1:]):
        assert rel_err(a.double(), e.double()) < TOLERANCES[dtype]


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck])
@pytest.mark.parametrize("kind", ["nchw", "channels_last", "strided"])
def test_cpp_gradcheck(check, kind):
    # gradgradcheck: create_graph=True through the C++ op must give BatchNorm's true second
    # derivatives, not silent zeros.
    x, r, _ = inputs((2, 3, 4, 5), torch.float64, True, kind)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    forward = torch.ops.sficonv_ext.batch_norm_act_forward
    for relu in (True, False):
        args = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
        assert check(lambda *a: forward(*a, relu, 1e-5)[0], args)


@pytest.mark.parametrize("kind", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("relu", [True, False])
def test_cpp_opcheck(kind, relu):
    x, r, g = inputs((2, 6, 3, 5), torch.float32, True, kind)
    bn = make_bn(6, dtype=torch.float32)
    w, b = bn.weight.detach().requires_grad_(), bn.bias.detach().requires_grad_()
    for residual in (r, None):
        torch.library.opcheck(torch.ops.sficonv_ext.batch_norm_act_forward.default,
                              (x.detach().requires_grad_(), w, b, residual, relu, 1e-5))
    y, mean, var = torch.ops.sficonv_ext.batch_norm_act_forward(x, w.detach(), b.detach(), r,
                                                                relu, 1e-5)
    for has_residual in (True, False):
        torch.library.opcheck(torch.ops.sficonv_ext.batch_norm_act_backward.default,
                              (g.float(), x, y, w.detach(), mean, var, has_residual, relu, 1e-5))


def test_cpp_compiles_without_graph_breaks():
    bn = make_bn(5, dtype=torch.float32)
    x, r, _ = inputs((2, 5, 6, 7), torch.float32, True, "channels_last")

    def step(x, r):
        return ops.batch_norm_act(x, bn, r, backend="cpp").sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    want = step(x, r)
    assert torch.allclose(compiled(x, r), want, rtol=1e-6)


def test_cpp_is_deterministic_across_thread_counts():
    x, r, g = inputs((4, 24, 33, 31), torch.float32, True, "channels_last")
    bn = make_bn(24, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(copy.deepcopy(bn), x, r, True, g, "cpp")
        torch.set_num_threads(max(2, threads))
        many = run(copy.deepcopy(bn), x, r, True, g, "cpp")
    finally:
        torch.set_num_threads(threads)
    for a, e in zip(one, many):
        assert torch.equal(a, e)


def test_cpp_nan_propagates_like_batchnorm():
    bn = make_bn(3)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x[1, 2, 3, 0] = float("nan")
    got = ops.batch_norm_act(x, copy.deepcopy(bn), relu=False, backend="cpp")
    want = ops.batch_norm_act(x, bn, relu=False, backend="torch")
    assert torch.equal(got.isnan(), want.isnan()) and got[:, 2].isnan().all()
    assert torch.allclose(got[:, :2], want[:, :2], rtol=1e-12)


@pytest.mark.parametrize("backend_kind", ["nchw", "channels_last"])
def test_cpp_relu_passes_gradient_through_nan_like_torch(backend_kind):
    # torch's ReLU backward zeroes the gradient only where the output is <= 0: a NaN output
    # (here from a NaN residual, after the statistics) passes its gradient on.
    bn = make_bn(3)
    x, r, g = inputs((2, 3, 4, 5), torch.float64, True, backend_kind)
    r = r.clone()
    r[0, 1, 2, 3] = float("nan")
    got = run(copy.deepcopy(bn), x, r, True, g, "cpp")
    want = run(bn, x, r, True, g, "torch")
    assert got[0][0, 1, 2, 3].isnan() and got[4][0, 1, 2, 3] == g[0, 1, 2, 3]
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e.to(a.dtype), rtol=1e-10, atol=1e-12, equal_nan=True)


def test_cpp_rejects_bad_input():
    bn = make_bn(4)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    forward = torch.ops.sficonv_ext.batch_norm_act_forward
    with pytest.raises(RuntimeError, match=r"weight must be \[4\]"):
        forward(x, torch.ones(3, dtype=x.dtype), torch.zeros(4, dtype=x.dtype), None, True, 1e-5)
    with pytest.raises(RuntimeError, match="residual is Float but x is Double"):
        forward(x, bn.weight, bn.bias, x.float(), True, 1e-5)
    with pytest.raises(RuntimeError, match="4-D"):
        forward(x[0], bn.weight, bn.bias, None, True, 1e-5)
    with pytest.raises(RuntimeError, match="floating"):
        forward(x.long(), bn.weight, bn.bias, None, True, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.batch_norm_act(torch.randn(1, 4, 1, 1, dtype=torch.float64), bn, backend="cpp")
    with pytest.raises(ValueError, match="CPU tensors"):
        ops.batch_norm_act(x.to("meta"), copy.deepcopy(bn).to("meta"), backend="cpp")
    with pytest.raises(TypeError, match="nn.BatchNorm2d"):
        ops.batch_norm_act(x, torch.nn.Identity(), backend="cpp")


def test_cpp_refuses_what_batchnorm_refuses_and_passes_an_empty_batch_through():
    x = torch.randn(2, 4, 5, 5)
    zero_eps = make_bn(4, dtype=torch.float32)
    zero_eps.eps = 0.0  # a constant channel would become inf - inf = NaN
    with pytest.raises(ValueError, match="eps must be positive"):
        ops.batch_norm_act(x, zero_eps, backend="cpp")
    with pytest.raises(RuntimeError, match="eps must be positive"):
        torch.ops.sficonv_ext.batch_norm_act_forward(x, zero_eps.weight, zero_eps.bias, None,
                                                      True, 0.0)
    with pytest.raises(TypeError, match="parameters are torch.float64"):
        ops.batch_norm_act(x, make_bn(4, dtype=torch.float64), backend="cpp")
    # float32 parameters with bfloat16 x run, as they do in BatchNorm2d.
    ops.batch_norm_act(x.bfloat16(), make_bn(4, dtype=torch.float32), backend="cpp")
    bn, plain = make_bn(4, dtype=torch.float32), None
    plain = copy.deepcopy(bn)
    empty = torch.randn(0, 4, 5, 5)
    got = ops.batch_norm_act(empty, bn, backend="cpp")
    assert got.shape == empty.shape and torch.equal(got, torch.relu(plain(empty)))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(plain, name)), name


@pytest.mark.parametrize("kind", ["nchw", "channels_last"])
def test_cpp_variance_keeps_its_precision_for_a_large_mean(kind):
    # A float32 sum of 1000 + small noise once lost the mean's low bits: the variance came out
    # 5e-4 to 2e-3 off (PyTorch, which sums in double: 1e-5 to 1e-4 in NCHW).
    torch.manual_seed(0)
    x = laid_out((1000 + 0.01 * torch.randn(8, 16, 32, 32, dtype=torch.float64)).float(), kind)
    bn = make_bn(16, momentum=1.0, dtype=torch.float32)
    ops.batch_norm_act(x, bn, relu=False, backend="cpp")
    want = x.double().var(dim=(0, 2, 3), unbiased=True)
    assert rel_err(bn.running_var.double(), want) < 2e-5
    # float32 running statistics hold the mean to half a unit in the last place (6e-5 at 1000).
    assert (bn.running_mean.double() - x.double().mean(dim=(0, 2, 3))).abs().max() < 7e-5


def test_fast_model_trains_identically_with_the_cpp_epilogue():
    # One float64 training step of SFIConv-ResNet-26 with every epilogue through the C++ op,
    # against the same model on the PyTorch path: outputs, gradients and buffers.
    _, fast = make_pair(26, dtype=torch.float64)
    fast = fast.train()
    fused = models.set_norm_backend(copy.deepcopy(fast), "cpp")
    x = torch.randn(3, 3, 35, 33, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last)
    out_ref, out = fast(x), fused(x)
    assert rel_err(out, out_ref) < 1e-10
    out_ref.square().sum().backward()
    out.square().sum().backward()
    for (name, p_ref), (_, p) in zip(fast.named_parameters(), fused.named_parameters()):
        if p_ref.grad is not None:
            assert rel_err(p.grad, p_ref.grad) < 1e-9, name
    for (name, b_ref), (_, b) in zip(fast.named_buffers(), fused.named_buffers()):
        assert rel_err(b.double(), b_ref.double()) < 1e-12, name


# ---- What "auto" picks in training mode (sficonv_ext/ops/norm_act.py: the C++ epilogue for
# float32 and bfloat16 CPU tensors of at least 2**20 values, PyTorch's BatchNorm for smaller ones
# and wherever the C++ op would change what a caller sees). The tests of those exceptions use tensors above
# the size threshold, so that the exception is what sends them to PyTorch.
BIG = (2, 16, 256, 128)  # 2**20 values


def _auto_ops(x, bn, residual=None, relu=True):
    with OpCounter() as seen:
        y = ops.batch_norm_act(x, bn, residual, relu)
    return y, set(seen.count)


def _cpp_ran(names):
    return "sficonv_ext.batch_norm_act_forward" in names


@pytest.mark.parametrize("kind", ["nchw", "channels_last", "strided"])
def test_auto_takes_the_cpp_epilogue_for_float32_cpu_training(kind):
    shape = BIG
    bn = make_bn(shape[1], dtype=torch.float32)
    x, r, g = inputs(shape, torch.float32, True, kind)
    _, names = _auto_ops(x, copy.deepcopy(bn), r)
    assert _cpp_ran(names) and "aten.native_batch_norm" not in names
    # Below the threshold (one column fewer): PyTorch's path, the C++ op's fixed cost dominating.
    _, names = _auto_ops(x[:, :, :, 1:], copy.deepcopy(bn), r[:, :, :, 1:])
    assert not _cpp_ran(names)
    # ... and it computes what the PyTorch path does (outputs, gradients, running statistics).
    got = run(copy.deepcopy(bn), x, r, True, g, "auto")
    want = run(copy.deepcopy(bn), x, r, True, g, "torch")
    for a, e in zip(got, want):
        assert rel_err(a.double(), e.double()) < 1e-5


def test_auto_takes_the_cpp_epilogue_for_bfloat16_autocast_training():
    # What autocast hands the epilogue on the CPU: a bfloat16 convolution output and residual,
    # the BatchNorm's float32 parameters and statistics.
    bn = make_bn(BIG[1], dtype=torch.float32)
    x, r, g = inputs(BIG, torch.bfloat16, True, "channels_last")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, names = _auto_ops(x, copy.deepcopy(bn), r)
        got = run(copy.deepcopy(bn), x, r, True, g, "auto")
        pytorch = run(copy.deepcopy(bn), x, r, True, g, "torch")
    exact = run(copy.deepcopy(bn).double(), x.double(), r.double(), True, g, "torch")
    assert _cpp_ran(names) and "aten.native_batch_norm" not in names
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert [t.dtype for t in got] == [t.dtype for t in pytorch]
    # Against float64: outputs and gradients within bfloat16 rounding (by norm: where a value of
    # bn(x) + r lies within rounding of 0, the ReLU's mask may go either way), statistics
    # within float32 rounding.
    for a, e in zip(got[:5], exact[:5]):
        assert ((a.double() - e).norm() / e.norm()).item() < 1e-2
    for a, e in zip(got[5:], exact[5:]):
        assert rel_err(a.double(), e.double()) < 1e-5
    # PyTorch's path rounds bn(x) to bfloat16 before adding r, so its ReLU mask differs from
    # float64's in more places than the C++ op's, which adds in float32 and rounds once.
    def mask_misses(y_out):
        return ((y_out > 0) != (exact[0] > 0)).sum().item()
    assert mask_misses(got[0]) <= mask_misses(pytorch[0])


def test_auto_keeps_pytorch_batchnorm_where_the_cpp_op_would_change_what_is_seen():
    x = torch.randn(BIG)
    seen = []
    hooked_bn = make_bn(BIG[1], dtype=torch.float32)
    hooked_bn.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    _, names = _auto_ops(x, hooked_bn)
    assert seen == [x.shape] and not _cpp_ran(names)  # the hook ran

    class ScaledBatchNorm(torch.nn.BatchNorm2d):  # a subclass with its own forward
        def forward(self, inp):
            return super().forward(inp) * 2

    custom = ScaledBatchNorm(BIG[1])
    y, names = _auto_ops(x, custom, relu=False)
    assert not _cpp_ran(names)
    assert torch.allclose(y, 2 * torch.nn.functional.batch_norm(x, None, None, custom.weight,
                                                                custom.bias, training=True))
    # Not measured: PyTorch's path (float16 as autocast would give it: float32 parameters).
    for dtype, param_dtype in ((torch.float64, torch.float64), (torch.float16, torch.float32),
                               (torch.bfloat16, torch.bfloat16)):
        _, names = _auto_ops(x.to(dtype), make_bn(BIG[1], dtype=param_dtype))
        assert not _cpp_ran(names)
    # A residual of another dtype: PyTorch adds it unrounded, the C++ op would round it first.
    _, names = _auto_ops(x.bfloat16(), make_bn(BIG[1], dtype=torch.float32), torch.randn(BIG))
    assert not _cpp_ran(names)
    _, names = _auto_ops(x, make_bn(BIG[1], dtype=torch.float32).eval())
    assert not _cpp_ran(names)
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # PyTorch's error
        ops.batch_norm_act(torch.randn(1, 8, 1, 1), make_bn(8, dtype=torch.float32))


def test_auto_leaves_the_epilogue_to_inductor_under_compile(monkeypatch):
    from sficonv_ext.ops import norm_act
    x, bn = torch.randn(BIG), make_bn(BIG[1], dtype=torch.float32)
    assert norm_act._resolve("auto", x, bn, None) == "cpp"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert norm_act._resolve("auto", x, bn, None) == "torch"


def test_an_output_without_relu_may_be_changed_in_place_and_is_not_kept():
    # PyTorch's BatchNorm does not save its output; the C++ op keeps it only as the ReLU's mask.
    # Without a ReLU a caller may change it in place before backward, as with nn.BatchNorm2d.
    x = torch.randn(BIG).requires_grad_()
    grad = torch.randn(BIG)
    bn = make_bn(BIG[1], dtype=torch.float32)
    grads = []
    for backend in ("cpp", "torch"):
        y = ops.batch_norm_act(x, copy.deepcopy(bn), None, relu=False, backend=backend)
        y.mul_(2)
        grads += torch.autograd.grad(y, x, grad)
    assert rel_err(grads[0], grads[1]) < 1e-4


def test_second_derivatives_when_only_the_residual_needs_a_gradient():
    # create_graph=True recomputes through PyTorch's BatchNorm; with x, weight and bias frozen
    # there is nothing to differentiate there, only the residual's gradient to hand on.
    bn = make_bn(3)
    for p in bn.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    r = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)  # differentiated too
    y = ops.batch_norm_act(x, bn, r, True, backend="cpp")
    (gr,) = torch.autograd.grad(y, r, g, create_graph=True)
    assert torch.equal(gr, g * (y > 0))
    (gg,) = torch.autograd.grad(gr.sum(), g)
    assert torch.equal(gg, (y > 0).to(gg.dtype))


@pytest.mark.parametrize("kind", ["channels_last", "nchw"])
def test_outputs_of_31_mib_or_more_come_from_the_kernel_pool_and_are_reused(kind):
    # [2, 256, 128, 128] float32 is 32 MiB: glibc maps such blocks afresh on every call, so the
    # epilogue takes its outputs (y; the input and residual gradients) from the kernel pool.
    from sficonv_ext import cpu_allocator
    forward = torch.ops.sficonv_ext.batch_norm_act_forward
    backward = torch.ops.sficonv_ext.batch_norm_act_backward
    cpu_allocator.trim_kernel_pool()
    # Counted from here: a pooled tensor an earlier test still holds must not matter.
    start = cpu_allocator.kernel_pool_stats()
    gen = torch.Generator().manual_seed(5)
    shape, block = (2, 256, 128, 128), 32 << 20
    x, r, g = (laid_out(torch.randn(shape, generator=gen), kind) for _ in range(3))
    w, b = torch.rand(256, generator=gen) + 0.5, torch.randn(256, generator=gen)

    def call():
        y, mean, var = forward(x, w, b, r, True, 1e-5)
        dx, dw, db, dres = backward(g, x, y, w, mean, var, True, True, 1e-5)
        return y, dx, dres, dw, db

    first = call()
    # y, dx and dres are alive, from the pool.
    assert cpu_allocator.kernel_pool_stats()["in_use_bytes"] - start["in_use_bytes"] == 3 * block
    layout = torch.channels_last if kind == "channels_last" else torch.contiguous_format
    assert all(t.shape == shape and t.is_contiguous(memory_format=layout) for t in first[:3])
    # Against PyTorch's BatchNorm, in float64.
    x64, r64, g64 = (t.double().requires_grad_() for t in (x, r, g))
    bn = torch.nn.BatchNorm2d(256, eps=1e-5).double().train()
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    want_y = torch.relu(bn(x64) + r64)
    want_dx, want_dr = torch.autograd.grad(want_y, (x64, r64), g64)
    errors = [rel_err(got.double(), want.detach())
              for got, want in zip(first[:3], (want_y, want_dx, want_dr))]
    assert max(errors) < TOLERANCES[torch.float32], errors
    values = [t.clone() for t in first]
    del first
    after_first = cpu_allocator.kernel_pool_stats()
    assert after_first["in_use_bytes"] == start["in_use_bytes"]
    assert after_first["cached_bytes"] >= 3 * block
    # The same call again: every large output is a reused block, and the results are the same.
    again = call()
    after = cpu_allocator.kernel_pool_stats()
    assert after["misses"] == after_first["misses"] and after["hits"] == after_first["hits"] + 3
    assert all(torch.equal(got, want) for got, want in zip(again, values))
    # A pooled output keeps its allocator: grown, it gets a 64 MiB block from the pool (its
    # values kept, in storage order), and the 32 MiB block goes back.
    y = again[0]
    stored = y.permute(0, 2, 3, 1).flatten() if kind == "channels_last" else y.flatten()
    stored = stored.clone()
    before_resize = cpu_allocator.kernel_pool_stats()
    y.resize_(2 * y.numel())
    resized = cpu_allocator.kernel_pool_stats()
    assert resized["in_use_bytes"] - before_resize["in_use_bytes"] == block  # 64 in, 32 out
    assert resized["misses"] == before_resize["misses"] + 1
    assert torch.equal(y[:stored.numel()], stored)
    del again, y
    assert cpu_allocator.kernel_pool_stats()["in_use_bytes"] == start["in_use_bytes"]
    assert cpu_allocator.trim_kernel_pool() >= 4 * block


def test_outputs_below_31_mib_come_from_torchs_allocator():
    from sficonv_ext import cpu_allocator
    before = cpu_allocator.kernel_pool_stats()
    x = torch.randn(2, 64, 64, 64).contiguous(memory_format=torch.channels_last)  # 2 MiB
    y, _, _ = torch.ops.sficonv_ext.batch_norm_act_forward(x, torch.ones(64), torch.zeros(64),
                                                           None, True, 1e-5)
    after = cpu_allocator.kernel_pool_stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    y.resize_(9 << 20)  # 36 MiB, grown past the threshold: now the pool serves it
    grown = cpu_allocator.kernel_pool_stats()
    assert grown["hits"] + grown["misses"] == after["hits"] + after["misses"] + 1
    del y


def test_cpp_refuses_float8():
    x = torch.randn(2, 4, 5, 5).to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="expected a floating dtype .* got Float8_e4m3fn"):
        torch.ops.sficonv_ext.batch_norm_act_forward(x, torch.ones(4), torch.zeros(4), None, True,
                                                     1e-5)
