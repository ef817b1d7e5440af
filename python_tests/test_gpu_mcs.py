"""MCSConv CUDA C++ and Triton backends on a GPU (skipped without one): every dtype and layout
against the float64 definition, opcheck, determinism."""
import re

import pytest
import torch

from sficonv_ext import ops

from conftest import (fresh_leaf, laid_out, rel_err, signed_mcs_weights,
                      worst_channel_rel_err)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOLERANCES = {torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _available(backend):
    info = ops.backends()
    return info["cuda"] if backend == "cuda" else info["triton_ops"]


def grads(backend, x, weight, g, constrained):
    xr, wr = fresh_leaf(x), fresh_leaf(weight)
    y = ops.mcs_conv(xr, wr, constrained=constrained, backend=backend)
    return (y,) + torch.autograd.grad(y, (xr, wr), g)


def check_against_definition(backend, x, weight, g, dtype, constrained, tol):
    """Output and both gradients of ``backend`` in ``dtype`` against the float64 definition
    (the weight gradient, a reduction, at 4x ``tol``); returns the backend's results."""
    got = grads(backend, x.to(dtype), weight.to(dtype), g.to(dtype), constrained)
    want = grads("torch", x.to(dtype).double(), weight.to(dtype).double(), g.to(dtype).double(),
                 constrained)
    assert rel_err(got[0].double(), want[0]) < tol
    assert rel_err(got[1].double(), want[1]) < tol
    assert rel_err(got[2].double(), want[2]) < 4 * tol
    return got


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", sorted(TOLERANCES, key=str))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape,k", [((3, 64, 67, 61), 5), ((2, 3, 1, 45), 3), ((1, 5, 33, 7), 7),
                                     ((0, 4, 8, 8), 5), ((2, 8, 130, 129), 9)])
@pytest.mark.parametrize("constrained", [True, False])
def test_gpu_backend_matches_definition(backend, dtype, layout, shape, k, constrained):
    if not _available(backend):
        pytest.skip(f"{backend} backend not built")
    n, c, h, w = shape
    x = torch.randn(n, c, h, w, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(n, c, h, 2 * w, device="cuda")[..., ::2]
    # Positive taps keep the constrained filter bounded, so float16 cannot overflow.
    weight = torch.rand(c, 1, k, k, device="cuda") + 0.5
    g = torch.randn(n, c, h, w, device="cuda")
    got = grads(backend, x.to(dtype), weight.to(dtype), g.to(dtype), constrained)
    want = grads("torch", x.to(dtype).double(), weight.to(dtype).double(), g.to(dtype).double(),
                 constrained)
    assert got[0].dtype == dtype and got[0].shape == x.shape
    if n == 0:
        return
    tol = TOLERANCES[dtype]
    assert rel_err(got[0].double(), want[0]) < tol
    assert rel_err(got[1].double(), want[1]) < tol
    assert rel_err(got[2].double(), want[2]) < 4 * tol
    if layout == "channels_last" and c > 1:
        assert got[0].is_contiguous(memory_format=torch.channels_last)


# 3 channels: the NCHW kernels and the per-pixel weight gradient (channels_last with fewer than
# 16 channels); 19: the channels_last row kernels, 32 channel lanes per warp with idle ones.
@pytest.mark.parametrize("channels,layout", [(3, "nchw"), (19, "channels_last"),
                                             (19, "strided")])
def test_cuda_float64_gradcheck_and_opcheck(channels, layout):
    if not _available("cuda"):
        pytest.skip("CUDA kernels not built")
    x = laid_out(torch.randn(2, channels, 7, 6, dtype=torch.float64, device="cuda"), layout)
    x.requires_grad_()
    w = torch.randn(channels, 1, 5, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.mcs_conv(a, b, backend="cuda"), (x, w))
    torch.library.opcheck(torch.ops.sficonv_ext.mcs_conv_forward.default, (x, w, True, 1e-6))
    g = laid_out(torch.randn(2, channels, 7, 6, dtype=torch.float64, device="cuda"), layout)
    for need_x, need_w in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.sficonv_ext.mcs_conv_backward.default,
                              (g, x.detach(), w.detach(), True, 1e-6, need_x, need_w))


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channels_last_grad", "strided"])
@pytest.mark.parametrize("shape,k", [((2, 19, 33, 31), 5), ((1, 40, 9, 70), 3),
                                     ((1, 17, 12, 13), 7), ((2, 8, 30, 29), 9),
                                     ((1, 3, 10, 11), 1), ((1, 20, 20, 21), 11)])
@pytest.mark.parametrize("constrained", [True, False])
def test_cuda_float64_matches_definition(layout, shape, k, constrained):
    # Every CUDA kernel family in float64 (tiles, rows in both layouts, the per-pixel ones for
    # other k) against the float64 PyTorch path, per channel; "channels_last_grad" gives the
    # backward a channels_last output gradient too.
    if not _available("cuda"):
        pytest.skip("CUDA kernels not built")
    x = laid_out(torch.randn(shape, dtype=torch.float64, device="cuda"),
                 "channels_last" if layout.startswith("channels_last") else layout)
    weight = signed_mcs_weights(shape[1], k, torch.float64, "cuda")
    g = torch.randn(shape, dtype=torch.float64, device="cuda")
    if layout == "channels_last_grad":
        g = g.contiguous(memory_format=torch.channels_last)
    got = grads("cuda", x, weight, g, constrained)
    want = grads("torch", x, weight, g, constrained)
    for a, b, dim in zip(got, want, (1, 1, 0)):  # y, grad x, grad weight
        assert worst_channel_rel_err(a, b, dim) < 1e-10


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_weight_gradient_is_deterministic(backend):
    if not _available(backend):
        pytest.skip(f"{backend} backend not built")
    torch.use_deterministic_algorithms(True)
    try:
        x = torch.randn(8, 32, 64, 64, device="cuda")
        w = torch.randn(32, 1, 5, 5, device="cuda", requires_grad=True)
        results = []
        for _ in range(3):
            w.grad = None
            (ops.mcs_conv(x, w, backend=backend) ** 2).sum().backward()
            results.append(w.grad.clone())
        assert all(torch.equal(r, results[0]) for r in results)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_gpu_compile_fullgraph(backend):
    # "auto" runs the CUDA C++ ops; "triton" the Triton ops, its constraint step included,
    # traced by inductor through wrap_triton.
    if backend == "triton" and not _available("triton"):
        pytest.skip("Triton ops unavailable")
    x = torch.randn(2, 8, 32, 32, device="cuda", requires_grad=True)
    w = (torch.rand(8, 1, 5, 5, device="cuda") + 0.5).requires_grad_()
    f = torch.compile(lambda a, b: ops.mcs_conv(a, b, backend=backend).square().sum(),
                      fullgraph=True)
    f(x, w).backward()
    got = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ops.mcs_conv(x, w, backend=backend).square().sum().backward()
    for a, b in zip(got, (x.grad, w.grad)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_weight_gradient_of_non_finite_taps(backend, dtype):
    # The constraint step on the GPU (one CUDA or Triton kernel) against the float64 PyTorch
    # path: inf and NaN centre taps (never used), NaN and inf off-centre taps (their channel's
    # sum non-finite), |S| exactly eps, a sum of 0; channel by channel, since the channels near
    # the clamp have gradients thousands of times the others'.
    if not _available(backend):
        pytest.skip(f"{backend} kernels unavailable")
    eps = 2.0 ** -10
    weight = torch.rand(7, 1, 5, 5, device="cuda") + 0.5
    weight[0, 0, 2, 2], weight[1, 0, 2, 2] = float("inf"), float("nan")
    weight[2, 0, 0, 1], weight[3, 0, 4, 0] = float("nan"), float("inf")
    weight[4] = 0.0
    weight[4, 0, 0, 0] = eps
    weight[5] = 0.0
    weight[5, 0, 0, 0], weight[5, 0, 4, 4] = 1.0, -1.0
    weight = weight.to(dtype)
    x = torch.randn(2, 7, 9, 10, device="cuda").to(dtype)
    g = torch.randn(2, 7, 9, 10, device="cuda").to(dtype)
    grads = {}
    for name, d in ((backend, dtype), ("torch", torch.float64)):
        w = weight.to(d).requires_grad_()
        y = ops.mcs_conv(x.to(d), w, eps=eps, backend=name)
        grads[name], = torch.autograd.grad(y, w, g.to(d))
    got, want = grads[backend].double(), grads["torch"]
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert (got[:, 0, 2, 2] == 0).all()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for c in range(7):
        finite = torch.isfinite(want[c])
        assert rel_err(got[c][finite], want[c][finite]) < tol, c


def test_mixed_devices_error():
    with pytest.raises(ValueError, match="cuda"):
        ops.mcs_conv(torch.randn(1, 2, 5, 5, device="cuda"), torch.randn(2, 1, 3, 3))


FUSED_TOLERANCES = {torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2,
                    torch.float64: 1e-12}

# The NCHW kernels for k = 3, 5, 7, chosen by environment (read on every call):
# variant -> (environment, patterns of the kernel names its forward and input+weight backward
# run, as the CUDA profiler reports them).
NCHW_VARIANTS = {
    "tiles": ({"SFICONV_CUDA_NCHW_KERNEL": "tiles"},
              (r"conv_tile_kernel<", r"weight_grad_nchw_kernel<")),
    "rows": ({"SFICONV_CUDA_NCHW_KERNEL": "rows"},
             (r"conv_rows_kernel<", r"weight_grad_nchw_kernel<")),
    "rows-fused": ({"SFICONV_CUDA_NCHW_KERNEL": "rows", "SFICONV_CUDA_FUSED_BACKWARD": "1"},
                   (r"conv_rows_kernel<", r"backward_fused_nchw_kernel<")),
    # The tile kernel built for 3 or 4 resident blocks (fewer registers): an experiment.
    "tiles-mb3": ({"SFICONV_CUDA_TILE_MIN_BLOCKS": "3"},
                  (r"conv_tile_kernel_capped<[^>]*, 3>", r"weight_grad_nchw_kernel<")),
    "tiles-mb4": ({"SFICONV_CUDA_TILE_MIN_BLOCKS": "4"},
                  (r"conv_tile_kernel_capped<[^>]*, 4>", r"weight_grad_nchw_kernel<")),
    # Double-buffered tiles (cp.async), for inputs whose rows are whole aligned 16-byte vectors:
    # the default (no environment), so the profiler test below checks that the default runs it.
    "tiles-pipelined": ({}, (r"conv_tile_pipelined_kernel<", r"weight_grad_nchw_kernel<")),
}
CUDA_KERNEL_ENV = ("SFICONV_CUDA_NCHW_KERNEL", "SFICONV_CUDA_FUSED_BACKWARD",
                   "SFICONV_CUDA_TILE_MIN_BLOCKS")


def _select_nchw_variant(monkeypatch, variant):
    for name in CUDA_KERNEL_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in NCHW_VARIANTS[variant][0].items():
        monkeypatch.setenv(name, value)


# The register-capped tile builds differ from "tiles" only in code generation: two dtypes suffice.
VARIANT_DTYPES = [(v, d) for v in sorted(NCHW_VARIANTS) for d in sorted(FUSED_TOLERANCES, key=str)
                  if not v.startswith("tiles-mb") or d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("variant,dtype", VARIANT_DTYPES)
@pytest.mark.parametrize("shape,k", [((3, 64, 67, 61), 5), ((2, 3, 1, 45), 3), ((1, 5, 33, 7), 7),
                                     ((2, 16, 70, 129), 5), ((4, 2, 5, 200), 3),
                                     ((2, 8, 64, 64), 5), ((1, 4, 40, 96), 7)])
def test_gpu_nchw_kernels_match_definition(monkeypatch, variant, dtype, shape, k):
    # Each NCHW kernel choice (shapes with W a whole number of 16-byte vectors take the tile's
    # vector staging): output and both gradients against the float64 definition, and bitwise
    # against itself on a repeat (fixed-order partials). Constrained taps only: the taps are
    # computed before any of these kernels runs (test_gpu_backend_matches_definition covers
    # constrained=False).
    constrained = True
    if not _available("cuda"):
        pytest.skip("CUDA kernels not built")
    _select_nchw_variant(monkeypatch, variant)
    n, c, h, w = shape
    x = torch.randn(n, c, h, w, device="cuda")
    weight = torch.rand(c, 1, k, k, device="cuda") + 0.5
    g = torch.randn(n, c, h, w, device="cuda")
    got = check_against_definition("cuda", x, weight, g, dtype, constrained,
                                   FUSED_TOLERANCES[dtype])
    again = grads("cuda", x.to(dtype), weight.to(dtype), g.to(dtype), constrained)
    assert torch.equal(got[1], again[1]) and torch.equal(got[2], again[2])


@pytest.mark.parametrize("variant", sorted(NCHW_VARIANTS))
def test_gpu_nchw_variant_runs_its_kernels(monkeypatch, variant):
    # The variants are meant to agree to rounding, so the test above cannot tell which ran: the
    # CUDA profiler can.
    if not _available("cuda"):
        pytest.skip("CUDA kernels not built")
    _select_nchw_variant(monkeypatch, variant)
    x = torch.randn(2, 8, 33, 36, device="cuda")
    weight = torch.rand(8, 1, 5, 5, device="cuda") + 0.5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        grads("cuda", x, weight, torch.randn_like(x), True)
        torch.cuda.synchronize()
    names = " ".join(e.key for e in prof.key_averages())
    for kernel in NCHW_VARIANTS[variant][1]:
        assert re.search(kernel, names), (variant, kernel, names)
    others = {k for v in NCHW_VARIANTS.values() for k in v[1]} - set(NCHW_VARIANTS[variant][1])
    assert not [k for k in others if re.search(k, names)], (variant, names)


@pytest.mark.parametrize("variant", ["tiles", "tiles-pipelined"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_tile_kernel_unaligned_input_and_many_planes(monkeypatch, variant, dtype):
    # The tile kernel stages rows with 16-byte loads only when the input address allows it: an
    # input one element past an aligned address (W still a whole number of vectors) must take
    # the scalar path, not fault or misread. And more planes than a grid's y dimension (65535)
    # run the kernel's plane loop.
    if not _available("cuda"):
        pytest.skip("CUDA kernels not built")
    _select_nchw_variant(monkeypatch, variant)
    shapes = [(2, 3, 19, 64), (70000, 1, 4, 8)]
    for n, c, h, w in shapes:
        flat = torch.randn(n * c * h * w + 1, device="cuda").to(dtype)
        x = flat[1:].view(n, c, h, w)  # contiguous, its address not 16-byte aligned
        if n == 70000:
            x = flat[:-1].view(n, c, h, w)
        weight = (torch.rand(c, 1, 5, 5, device="cuda") + 0.5).to(dtype)
        got = ops.mcs_conv(x, weight, backend="cuda")
        want = ops.mcs_conv(x.double(), weight.double(), backend="torch")
        assert rel_err(got.double(), want) < FUSED_TOLERANCES[dtype], (n, c, h, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gpu_pipelined_tiles_equal_the_tiles_bitwise(monkeypatch, dtype):
    # The double-buffered kernel correlates each tile as the plain tile kernel does, in the same
    # order: outputs and input gradients must be equal bit for bit. These shapes give each
    # block many planes (the launcher fills the GPU once), so the next plane's asynchronous
    # copy and the halo carried across planes run, with non-zero halos (several tiles across).
    if not _available("cuda"):
        pytest.skip("CUDA kernels not built")
    for (n, c, h, w), k in [((8, 64, 70, 200), 5), ((64, 64, 64, 64), 3), ((16, 32, 50, 96), 7)]:
        x = torch.randn(n, c, h, w, device="cuda").to(dtype)
        weight = (torch.rand(c, 1, k, k, device="cuda") + 0.5).to(dtype)
        g = torch.randn_like(x)
        results = {}
        for variant in ("tiles", "tiles-pipelined"):
            _select_nchw_variant(monkeypatch, variant)
            results[variant] = grads("cuda", x, weight, g, True)
        for got, want in zip(results["tiles-pipelined"][:2], results["tiles"][:2]):
            assert torch.equal(got, want), ((n, c, h, w), k, dtype)


@pytest.mark.parametrize("k", [1, 11])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_other_kernel_sizes_match_definition(k, dtype, layout):
    # k = 1 and k >= 11 take the CUDA kernels that serve every size but 3, 5, 7 (and 9, tested
    # above): the elementwise and the general tiled correlation.
    if not _available("cuda"):
        pytest.skip("CUDA kernels not built")
    x = torch.randn(2, 8, 37, 41, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(8, 1, k, k, device="cuda") + 0.5
    g = torch.randn(2, 8, 37, 41, device="cuda")
    check_against_definition("cuda", x, weight, g, dtype, True, TOLERANCES[dtype])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_weight_gradient_of_more_channels_than_a_grid_dimension(layout):
    # Only the fallback weight-gradient kernel (k other than 3, 5, 7) puts channels on a grid
    # dimension; the row kernels for k = 5 must take 70,000 channels (once refused up front).
    if not _available("cuda"):
        pytest.skip("CUDA kernels not built")
    x = torch.randn(1, 70000, 6, 5, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(70000, 1, 5, 5, device="cuda") + 0.5
    g = torch.randn_like(x)
    got = grads("cuda", x, weight, g, True)
    want = grads("torch", x.double(), weight.double(), g.double(), True)
    for a, b in zip(got, want):
        assert rel_err(a.double(), b) < 4 * TOLERANCES[torch.float32]
    # This error crashed the process on an H100 and an H200 (segfault, 2026-11-27 and -28):
    # the build there held its own copy of libstdc++'s number formatting (test_cxx_runtime.py).
    with pytest.raises(RuntimeError, match="at most 65535 channels"):
        grads("cuda", x, torch.rand(70000, 1, 9, 9, device="cuda") + 0.5, g, True)


@pytest.mark.parametrize("name", CUDA_KERNEL_ENV)
def test_gpu_bad_kernel_choice_is_an_error(monkeypatch, name):
    # A misspelt choice must not silently run the default kernel.
    if not _available("cuda"):
        pytest.skip("CUDA kernels not built")
    monkeypatch.setenv(name, "bogus")
    x = torch.randn(1, 2, 9, 9, device="cuda", requires_grad=True)
    weight = torch.rand(2, 1, 5, 5, device="cuda", requires_grad=True)
    with pytest.raises(RuntimeError, match=f"{name}=bogus is not one of"):
        ops.mcs_conv(x, weight, backend="cuda").sum().backward()


def test_gpu_register_cap_with_the_pipelined_kernel_is_an_error(monkeypatch):
    # The register cap builds only the plain tile kernel: asked for together with the
    # double-buffered one, it must say so rather than silently run one of the two.
    if not _available("cuda"):
        pytest.skip("CUDA kernels not built")
    monkeypatch.setenv("SFICONV_CUDA_NCHW_KERNEL", "tiles-pipelined")
    monkeypatch.setenv("SFICONV_CUDA_TILE_MIN_BLOCKS", "3")
    x = torch.randn(1, 2, 9, 16, device="cuda")
    with pytest.raises(RuntimeError, match="caps the plain tile kernel"):
        ops.mcs_conv(x, torch.rand(2, 1, 5, 5, device="cuda") + 0.5, backend="cuda")
