"""Fast model vs reference on CUDA (skipped without a GPU): per-dtype tolerances."""
import copy
import math

import pytest
import torch

from sficonv_ext import models, ops
from sficonv_ext.nn import FirstSFIConv2d, MCSConv2d

from conftest import make_pair, rel_err

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# The kernels a parametrised run forces: (MCSConv op backend, first layer backend, BatchNorm +
# add + ReLU epilogue backend). On CUDA "auto" takes cuDNN for the MCSConv of channels_last
# input (the models' layout) and PyTorch's ops for the rest, as measured faster: left at "auto",
# no kernel of this package would run in a model test.
KERNELS = {"auto": ("auto", "auto", "auto"), "cuda": ("cuda", "auto", "torch"),
           "triton": ("triton", "triton", "triton")}


def force_kernels(model, kernels):
    info = ops.backends()
    if (kernels == "cuda" and not info["cuda"]) or (kernels == "triton"
                                                    and not info["triton_ops"]):
        pytest.skip(f"the {kernels} kernels are not available here")
    mcs, first, norm = KERNELS[kernels]
    for module in model.modules():
        if isinstance(module, MCSConv2d):
            module.backend = mcs
        if isinstance(module, FirstSFIConv2d):
            module.backend = first
    return models.set_norm_backend(model, norm)

# (autocast dtype or None, relative tolerance on logits). float32: fast against the reference.
# Half types: each model's autocast result against the reference's float32 result; the fast
# model may err at most HALF_ERROR_RATIO times as much as the reference's own autocast run, plus
# the tolerance. (A fixed tolerance on fast vs reference failed on an H100 in bfloat16 train
# mode, at 7.6% relative: the difference of two half-precision runs holds both runs' rounding
# through 26 layers of batch statistics over 4 images, so each is measured against float32.)
CASES = {"float32": (None, 2e-3), "bfloat16": (torch.bfloat16, 2e-2),
         "float16": (torch.float16, 5e-3)}
HALF_ERROR_RATIO = 3.0


def _no_tf32():
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _log_scale(a, b):
    ratio = a.norm().item() / b.norm().item()
    return abs(math.log(ratio)) if ratio > 0 else math.inf


def _check_against_float32(name, got, ref_amp, truth, tol):
    # Three measures, each against the float32 result: the largest error (relative to the
    # largest value), the direction (cosine) and the scale (log of the norm ratio). A bfloat16
    # gradient of the first layers through 23 layers of backward is mostly rounding noise for
    # both models (on the CPU with bf16 autocast: cosine 0.67 to float32 for the reference, 0.75
    # for the fast model; largest error 0.73 and 0.46), so the error ratio alone would accept
    # even a zero gradient, which the cosine rejects, and a gradient scaled by 2, which the
    # scale rejects (norm ratios there: 0.88 reference, 0.96 fast).
    err_fast, err_ref = rel_err(got, truth), rel_err(ref_amp, truth)
    cos_fast, cos_ref = _cosine(got, truth), _cosine(ref_amp, truth)
    scale_fast, scale_ref = _log_scale(got, truth), _log_scale(ref_amp, truth)
    print(f"{name}: max error fast {err_fast:.3e}, reference {err_ref:.3e}; "
          f"cosine fast {cos_fast:.4f}, reference {cos_ref:.4f}; "
          f"|log norm ratio| fast {scale_fast:.3e}, reference {scale_ref:.3e} (against float32)")
    assert cos_ref > 0.3, (name, cos_ref)  # the comparison means something
    assert err_fast < HALF_ERROR_RATIO * err_ref + tol, (name, err_fast, err_ref)
    assert cos_fast > cos_ref - 0.1, (name, cos_fast, cos_ref)
    assert scale_fast < HALF_ERROR_RATIO * scale_ref + 0.1, (name, scale_fast, scale_ref)


@cuda
@pytest.mark.parametrize("dtype", sorted(CASES))
@pytest.mark.parametrize("kernels", sorted(KERNELS))
def test_cuda_eval_and_train_parity(dtype, kernels):
    amp, tol = CASES[dtype]
    _no_tf32()
    ref, fast = make_pair(26, dtype=torch.float32)
    ref, fast = ref.cuda(), force_kernels(fast.cuda(), kernels)
    # NCHW input: the model turns it into channels_last on entry.
    x = torch.randn(4, 3, 96, 80, device="cuda")
    for train in (False, True):
        ref.train(train), fast.train(train)
        with torch.no_grad():
            truth = ref(x)
            with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
                out_ref, out_fast = ref(x), fast(x)
        if amp is None:
            assert rel_err(out_fast, out_ref) < tol, (dtype, train)
        else:
            _check_against_float32(f"logits train={train}", out_fast.float(), out_ref.float(),
                                   truth, tol)


@cuda
def test_cuda_fuse_for_inference():
    # The default on CUDA runs the cuDNN fused layers where torch has them (measured faster on
    # an H100 and an H200); cudnn=False keeps plain F.conv2d calls. Both match the model.
    from sficonv_ext.models.cudnn_inference import CudnnConvNorm, cudnn_fusion_available
    _, fast = make_pair(26, dtype=torch.float32)
    fast = fast.cuda().eval()
    x = torch.randn(2, 3, 128, 128, device="cuda")
    for cudnn in (None, False):
        fused = models.fuse_for_inference(fast, cudnn=cudnn)
        swapped = any(isinstance(m, CudnnConvNorm) for m in fused.modules())
        assert swapped == (cudnn is None and cudnn_fusion_available())
        with torch.no_grad():
            assert rel_err(fused(x), fast(x)) < 2e-3


@cuda
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_cuda_graph_inference_replays_and_refuses_other_shapes(amp):
    _, fast = make_pair(26, dtype=torch.float32)
    fast = fast.cuda().eval()
    eager = models.fuse_for_inference(fast, cudnn=False)
    graphed = models.fuse_for_inference(fast, cuda_graph=True, cudnn=False)
    with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
        for _ in range(3):  # capture, then replays on fresh inputs
            x = torch.randn(3, 3, 96, 64, device="cuda")
            with torch.no_grad():
                want = eager(x)
            got = graphed(x)
            x.zero_()  # the output must not alias anything the caller can change
            assert rel_err(got.float(), want.float()) < (1e-5 if amp is None else 1e-2)
        with pytest.raises(ValueError, match="captured for input"):
            graphed(torch.randn(2, 3, 96, 64, device="cuda"))
    if amp is not None:
        with pytest.raises(ValueError, match="captured for input"):
            graphed(torch.randn(3, 3, 96, 64, device="cuda"))  # autocast now off
    with pytest.raises(ValueError, match="CUDA tensor"):
        graphed(torch.randn(3, 3, 96, 64))


@cuda
def test_cuda_graph_captured_under_inference_mode_replays_outside_it():
    # The captured input buffer must be a normal tensor: an inference tensor refuses the copy
    # of a later call made outside inference_mode.
    _, fast = make_pair(26, dtype=torch.float32)
    fast = fast.cuda().eval()
    eager = models.fuse_for_inference(fast, cudnn=False)
    graphed = models.fuse_for_inference(fast, cuda_graph=True, cudnn=False)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.inference_mode():
        first = graphed(x)
    with torch.no_grad():
        want = eager(x)
    assert rel_err(first, want) < 1e-5
    assert rel_err(graphed(x), want) < 1e-5
    with torch.inference_mode():
        assert rel_err(graphed(x), want) < 1e-5


@cuda
@pytest.mark.parametrize("cudnn", [False, True])
def test_cuda_graph_captures_again_after_the_weights_change(cudnn):
    # A replay reads the weights at their captured addresses (and the cuDNN layers' cast
    # copies of them): new weights, loaded in place or assigned, must be used, not the old.
    if cudnn and not models.cudnn_inference.cudnn_fusion_available():
        pytest.skip("this torch build lacks the fused cuDNN convolution ops")
    _, fast = make_pair(26, dtype=torch.float32)
    fast = fast.cuda().eval()
    graphed = models.fuse_for_inference(fast, cuda_graph=True, cudnn=cudnn)
    other = models.fuse_for_inference(make_pair(26, dtype=torch.float32)[1].cuda().eval(),
                                      cudnn=cudnn)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    first = graphed(x)
    for assign in (False, True):
        graphed.network.network.load_state_dict(other.network.state_dict(), assign=assign)
        with torch.no_grad():
            want = other(x)
        assert rel_err(want, first) > 1e-2  # the two models differ
        assert rel_err(graphed(x), want) < 1e-5


@cuda
@pytest.mark.parametrize("dtype", sorted(CASES))
@pytest.mark.parametrize("kernels", sorted(KERNELS))
def test_cuda_fast_model_gradients_match_reference(dtype, kernels):
    # The MCSConv kernels, the fused first layer and the epilogues (as `kernels` forces them)
    # inside a full train step: the gradient of a layer1 convolution (through 23 layers of
    # backward) and of the classifier.
    amp, tol = CASES[dtype]
    _no_tf32()
    ref, fast = make_pair(26, dtype=torch.float32)
    ref, fast = ref.cuda().train(), force_kernels(fast.cuda(), kernels).train()
    x = torch.randn(4, 3, 64, 72, device="cuda")
    published = ref.rgb_extract_feature[4][0].SFIC1.conv  # children: 4 is layer1
    ref_params = [published.s2s.weight, published.f2f.weight, ref.fc.weight]

    def ref_grads(enabled):
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=enabled):
            loss = ref(x).float().square().sum()
        s2s, f2f, fc = torch.autograd.grad(loss, ref_params)
        return torch.cat([s2s, f2f]).float(), fc.float()

    with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
        loss = fast(x).float().square().sum()
    got = [g.float() for g in torch.autograd.grad(
        loss, [fast.layer1[0].SFIC1.conv.weight, fast.fc.weight])]
    truth = ref_grads(False)
    for g in got:
        assert torch.isfinite(g).all()
    if amp is None:
        for g, w, name in zip(got, truth, ("layer1 conv", "fc")):
            assert rel_err(g, w) < 5 * tol, name
    else:
        ref_amp = ref_grads(True)
        for g, r, w, name in zip(got, ref_amp, truth, ("layer1 conv", "fc")):
            _check_against_float32(f"{name} gradient", g, r, w, 5 * tol)


@cuda
@pytest.mark.parametrize("kernels", ["cuda", "triton"])
def test_cuda_fast_model_compiles_fullgraph_with_fused_ops(kernels):
    # fullgraph=True fails on any graph break: the custom ops forced on (CUDA MCSConv; or the
    # Triton first layer, epilogues and MCSConv) must all trace. aot_eager keeps the test
    # short; the benchmark runs inductor.
    _no_tf32()
    _, fast = make_pair(26, dtype=torch.float32)
    fast = force_kernels(fast.cuda(), kernels).train()
    twin = copy.deepcopy(fast)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, got = fast(x), compiled(x)
    assert rel_err(got.float(), want.float()) < 5e-2
    got.float().square().sum().backward()
    assert all(p.grad is not None for p in twin.parameters() if p.requires_grad)
