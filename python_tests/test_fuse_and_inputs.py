"""fuse_for_inference parity, and clear errors for inputs the network cannot take."""
import pytest
import torch

from sficonv_ext import models
from sficonv_ext.nn import SplitBatchNorm2d

from conftest import make_pair, rel_err


@pytest.mark.parametrize("learnable", [False, True])
def test_fuse_for_inference_float32_parity(learnable):
    model = models.sfi_resnet26(mcs_learnable=learnable)
    _, fast = make_pair(26, dtype=torch.float32)
    model.load_state_dict(fast.state_dict())
    if learnable:  # a raw weight off the constraint, as training leaves it: folding must bake
        with torch.no_grad():  # the constrained filter, not the raw one
            mcs = model.layer1[0].SFIC1.conv.mcs
            mcs.weight.add_(torch.rand_like(mcs.weight) * 0.1).mul_(3.0)
    model.eval()
    fused = models.fuse_for_inference(model)
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        expect = model(x)
        got = fused(x)
    assert rel_err(got, expect) < 1e-4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert fused.network.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not fused.training


def test_fuse_for_inference_float64_is_exact_to_rounding():
    _, fast = make_pair(50)
    fast.eval()
    fused = models.fuse_for_inference(fast)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(fused(x), fast(x)) < 1e-10


def test_fused_model_is_eval_only_and_not_exportable():
    fused = models.fuse_for_inference(models.sfi_resnet26())
    with pytest.raises(RuntimeError, match="eval-only"):
        fused.train()
    with pytest.raises(ValueError, match="fused for inference"):
        models.to_official_state_dict(fused)
    with pytest.raises(TypeError):
        models.fuse_for_inference(torch.nn.Linear(2, 2))
    # The inner network, which users reach as fused.network, is marked too.
    with pytest.raises(ValueError, match="fused for inference"):
        models.to_official_state_dict(fused.network)
    with pytest.raises(ValueError, match="fused for inference already"):
        models.fuse_for_inference(fused.network)


def test_fuse_folds_sync_batchnorms():
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(make_pair(26, torch.float32)[1]).eval()
    fused = models.fuse_for_inference(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) < 1e-5


def test_fuse_refuses_a_batchnorm_without_running_statistics():
    model = models.sfi_resnet26().eval()
    model.layer2[0].SFIC1.bn = SplitBatchNorm2d(
        model.layer2[0].SFIC1.bn.num_features, track_running_stats=False)
    with pytest.raises(ValueError, match="cannot be folded"):
        models.fuse_for_inference(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fuse_keeps_low_precision_convolutions_beside_float32_batchnorms(dtype):
    # The "BatchNorm in float32" recipe: folding must not promote the weights to float32.
    _, fast = make_pair(26, dtype=torch.float32)
    fast = fast.to(dtype).eval()
    for m in fast.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.float()
    fused = models.fuse_for_inference(fast)
    assert {p.dtype for p in fused.parameters()} == {dtype}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = fused(x.to(dtype))
        assert got.dtype == dtype
        assert rel_err(got.float(), fast.float()(x)) < (0.1 if dtype == torch.bfloat16 else 0.02)


def test_fuse_leaves_the_original_untouched():
    model = models.sfi_resnet26().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    models.fuse_for_inference(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.fixture(scope="module")
def model():
    return models.sfi_resnet26().eval()


@pytest.mark.parametrize("x,error,pattern", [
    (torch.randn(1, 4, 64, 64), ValueError, "3 input channels"),
    (torch.randn(3, 64, 64), ValueError, "4-D"),
    (torch.randn(1, 1, 3, 64, 64), ValueError, "4-D"),
    (torch.randn(1, 3, 28, 64), ValueError, "too small"),
    (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), TypeError, "floating"),
    (torch.randn(1, 3, 64, 64, dtype=torch.float64), TypeError, "dtype"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_input_errors(model, x, error, pattern):
    with pytest.raises(error, match=pattern):
        model(x)


def test_minimum_size_is_exact(model):
    assert models.MIN_INPUT_SIZE == 29
    with torch.no_grad():
        assert model(torch.randn(1, 3, 29, 29)).shape == (1, 2)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="depth"):
        models.SFIResNet(depth=34)
    with pytest.raises(ValueError, match="num_classes"):
        models.sfi_resnet26(num_classes=0)
    with pytest.raises(ValueError, match="init"):
        models.sfi_resnet26(mcs_init="zeros")


def test_empty_batch_in_eval(model):
    with torch.no_grad():
        assert model(torch.randn(0, 3, 64, 64)).shape == (0, 2)
