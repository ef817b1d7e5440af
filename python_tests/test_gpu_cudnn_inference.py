"""fuse_for_inference(model, cudnn=True) on a GPU (skipped without one): the real fused cuDNN
ops against the plain folded model, per dtype; the wiring is checked on the CPU in
test_cudnn_inference.py."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from sficonv_ext import models
from sficonv_ext.models.cudnn_inference import cudnn_fusion_available

from conftest import make_pair, rel_err
from test_gpu_models import _check_against_float32, _no_tf32

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and cudnn_fusion_available()),
                                reason="needs a CUDA device with cuDNN")

FUSED_OPS = {"aten::cudnn_convolution_relu", "aten::cudnn_convolution_add_relu"}
# Autocast dtype (None: float32 without TF32) -> tolerance on logits against the plain path
# (float32), or added to HALF_ERROR_RATIO x the plain path's own error (half types).
CASES = {"float32": (None, 1e-4), "bfloat16": (torch.bfloat16, 2e-2),
         "float16": (torch.float16, 5e-3)}


@pytest.fixture(scope="module")
def fast():
    torch.manual_seed(0)
    _, model = make_pair(26, dtype=torch.float32)
    return model.cuda().eval()


def _autocast(amp):
    return torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None)


@pytest.mark.parametrize("dtype", sorted(CASES))
def test_cudnn_layers_match_the_plain_folded_model(fast, dtype):
    amp, tol = CASES[dtype]
    _no_tf32()
    plain = models.fuse_for_inference(fast, cudnn=False)
    fused = models.fuse_for_inference(fast, cudnn=True)
    x = torch.randn(3, 3, 97, 131, device="cuda")  # odd sizes: odd maps in every stage
    with torch.inference_mode():
        truth = plain(x)
        with _autocast(amp):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                got = fused(x)
            expect = plain(x)
    ran = {e.key for e in prof.key_averages()}
    assert FUSED_OPS <= ran, ran & FUSED_OPS
    # Calls cuDNN found no fused engine for ran the plain path (correct either way): say how
    # many, for the GPU check's log.
    convs = [m._fused for m in fused.modules() if hasattr(m, "_fused")]
    convs = [c for f in convs for c in (f if isinstance(f, list) else [f])]
    refused = sum(len(c._no_engine) for c in convs)
    print(f"cudnn {dtype}: {refused} of {len(convs)} fused convolutions found no cuDNN engine")
    assert torch.isfinite(got).all()
    if amp is None:
        assert rel_err(got, expect) < tol
    else:
        _check_against_float32(f"cudnn logits {dtype}", got.float(), expect.float(), truth, tol)


def _fused_ops_run(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, FUSED_OPS & {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_calls_never_read_stale_output_memory(fast, dtype):
    # cudnn_convolution_relu hands cuDNN its fresh, unwritten output as the graph's residual
    # operand with a scale of 0: NaN left in that memory by an earlier tensor must not reach
    # the result (0 * NaN is NaN). x is made in the compute dtype and the weights are cast
    # before (a warm-up call), so the op's output is the next allocation of the NaN block's
    # size on this stream: the caching allocator hands it that very block (checked).
    amp = CASES[dtype][0]
    _no_tf32()
    fused = models.fuse_for_inference(fast, cudnn=True)
    layer = fused.network.layer1[1].SFIC2  # a 3x3 convolution with its ReLU
    x = torch.randn(4, 64, 32, 32, device="cuda", dtype=amp or torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), _autocast(amp):
        expect = F.relu(layer.conv(x))
        layer(x)  # warm-up: weight casts cached, cuDNN plan built
        if layer._fused._no_engine:
            pytest.skip(f"cuDNN has no fused engine for {dtype} here (without TF32 for float32):"
                        f" the layer takes the plain path")
        for _ in range(3):
            junk = torch.full_like(expect, float("nan"))
            stale = junk.data_ptr()
            del junk
            got, ran = _fused_ops_run(lambda: layer(x))
            assert ran == {"aten::cudnn_convolution_relu"}
            assert got.data_ptr() == stale, "the output did not land on the NaN block"
            assert torch.isfinite(got).all()
            assert rel_err(got.float(), expect.float()) < (1e-4 if amp is None else 2e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nan_in_the_input_reaches_the_output_as_on_the_plain_path(fast, dtype):
    # A ReLU that maps NaN to 0 would hide a broken input: the fused call must keep every NaN
    # the plain path keeps, in one layer and through the whole model.
    amp = CASES[dtype][0]
    plain = models.fuse_for_inference(fast, cudnn=False)
    fused = models.fuse_for_inference(fast, cudnn=True)
    x = torch.randn(2, 64, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    x[0, 5, 7, 9] = float("nan")
    residual = torch.randn(2, 256, 16, 16, device="cuda").contiguous(
        memory_format=torch.channels_last)
    image = torch.randn(2, 3, 64, 64, device="cuda")
    image[1, 0, 30, 30] = float("nan")
    with torch.inference_mode(), _autocast(amp):
        for name in ("SFIC2", "SFIC3"):
            layer_fused = getattr(fused.network.layer1[1], name)
            layer_plain = getattr(plain.network.layer1[1], name)
            # SFIC2 (3x3, ReLU) and SFIC3 (1x1 to 256 channels, residual add and ReLU).
            kwargs = {} if name == "SFIC2" else {"residual": residual, "relu": True}
            got, ran = _fused_ops_run(lambda: layer_fused(x, **kwargs))
            assert ran, name
            want = layer_plain(x, **kwargs)
            assert torch.isnan(want).any(), name
            assert torch.equal(torch.isnan(got), torch.isnan(want)), name
        assert torch.equal(torch.isnan(fused(image)), torch.isnan(plain(image)))


def test_cudnn_layers_replay_from_a_cuda_graph(fast):
    eager = models.fuse_for_inference(fast, cudnn=True)
    graphed = models.fuse_for_inference(fast, cuda_graph=True, cudnn=True)
    with _autocast(torch.bfloat16):
        for _ in range(3):  # capture, then replays on fresh inputs
            x = torch.randn(2, 3, 96, 64, device="cuda")
            with torch.no_grad():
                want = eager(x)
            got = graphed(x)
            assert rel_err(got.float(), want.float()) < 1e-2
        # The graph holds the weight casts, so replays see an in-place change of a weight,
        # as the eager model (whose cached cast follows the version counter) does.
        with torch.no_grad():
            for model in (eager.network, graphed.network.network):
                model.layer2[0].SFIC2.conv.weight.mul_(-1.0)
            want = eager(x)
        got = graphed(x)
        assert rel_err(got.float(), want.float()) < 1e-2


def test_gradients_still_flow_through_the_plain_path(fast):
    fused = models.fuse_for_inference(fast, cudnn=True)
    x = torch.randn(1, 3, 64, 64, device="cuda", requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fused(x).sum().backward()
    assert not (FUSED_OPS & {e.key for e in prof.key_averages()})
    assert x.grad is not None and torch.isfinite(x.grad).all()
