"""Bad input found by a review of the public API: each now gets a clear error (or, for meta
tensors, works) instead of a silent wrong answer, a deep internal error or a ZeroDivisionError."""
import pytest
import torch
import torch.nn as nn

from sficonv_ext import models, ops, reference
from sficonv_ext.nn import FirstSFIConv2d, SFIConv2d


def test_batch_norm_act_refuses_a_residual_on_another_device_or_not_floating():
    x = torch.randn(2, 4, 5, 5)
    bn = nn.BatchNorm2d(4)
    # Before: the C++ kernel read garbage, PyTorch's add_ ignored a meta residual.
    for backend in ("torch", "cpp"):
        with pytest.raises(ValueError, match="residual is on meta"):
            ops.batch_norm_act(x, bn, torch.randn(2, 4, 5, 5, device="meta"), backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        ops.batch_norm_act(x, bn.eval(), torch.ones(2, 4, 5, 5, dtype=torch.int64))


@pytest.mark.parametrize("make", [lambda: SFIConv2d(4, 4, 1, alpha=0),
                                  lambda: SFIConv2d(4, 4, 1, alpha=1),
                                  lambda: SFIConv2d(1, 4, 3),
                                  lambda: FirstSFIConv2d(3, 1, 1)])
def test_a_split_that_leaves_a_branch_empty_is_refused(make):
    with pytest.raises(ValueError, match="both must be at least 1"):
        make()


def test_triton_on_the_cpu_without_the_interpreter_says_what_it_needs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3)
    try:
        ops.mcs_conv(x, w, backend="triton")
    except RuntimeError as error:  # no usable Triton at all: its own clear message
        assert "unavailable" in str(error)
    except ValueError as error:
        assert "CUDA tensors (or TRITON_INTERPRET=1" in str(error)
    else:
        pytest.fail("backend='triton' ran on a CPU tensor without the interpreter")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.batch_norm_act(x, nn.BatchNorm2d(4), backend="triton")


def test_meta_tensors_give_shapes():
    y = ops.mcs_conv(torch.randn(1, 4, 8, 8, device="meta"),
                     torch.randn(4, 1, 3, 3, device="meta"))
    assert y.shape == (1, 4, 8, 8) and y.device.type == "meta"
    model = models.sfi_resnet26().to("meta").eval()
    assert model(torch.randn(2, 3, 64, 64, device="meta")).shape == (2, 2)


def test_sparse_and_nested_inputs_get_the_networks_own_errors():
    model = models.sfi_resnet26().eval()
    fused = models.fuse_for_inference(model)
    x = torch.randn(1, 3, 64, 64)
    nested = torch.nested.nested_tensor([torch.randn(3, 64, 64), torch.randn(3, 64, 70)])
    for net in (model, fused):
        with pytest.raises(ValueError, match="dense"):
            net(x.to_sparse())
        with pytest.raises(ValueError, match="nested tensor"):
            net(nested)


def test_first_sfi_conv_refuses_a_weight_that_is_not_square_and_odd():
    # Before: a [4, 3, 1, 3] weight padded both sides by 1 and returned 10x8 from 8x8.
    for shape in ((4, 3, 1, 3), (4, 3, 2, 2)):
        with pytest.raises(ValueError, match="square with an odd size"):
            ops.first_sfi_conv(torch.randn(1, 3, 8, 8), torch.randn(*shape),
                               torch.randn(3, 1, 5, 5), 2)


def test_checkpoint_interop_errors_name_the_problem():
    model = models.sfi_resnet26()
    for not_a_model in (nn.Linear(2, 2), model.state_dict(), model.layer1):
        with pytest.raises(TypeError, match="exports a whole SFIResNet"):
            models.to_official_state_dict(not_a_model)
    with pytest.raises(TypeError, match="expected a state_dict"):
        model.load_state_dict(None)
    with pytest.raises(TypeError, match="keys must be strings"):
        model.load_state_dict({1: torch.zeros(1)})
    published = reference.PublishedTrainingWrapper(26).state_dict()
    key = "rgb_extract_feature.0.weight"
    with pytest.raises(TypeError, match=key):
        model.load_state_dict({**published, key: None})
    with pytest.raises(TypeError, match=r"state_dict\['fc.weight'\] is not a tensor"):
        model.load_state_dict({**model.state_dict(), "fc.weight": "x"})  # own layout too
    # NumPy values and extra non-tensor entries (strict=False) still load, as before.
    model.load_state_dict({k: v.numpy() for k, v in published.items()})
    model.load_state_dict({**model.state_dict(), "epoch": 3}, strict=False)
    with pytest.raises(RuntimeError, match="starts with 'module.'"):
        model.load_state_dict({"module." + k: v for k, v in published.items()})


def test_argument_errors_show_what_was_given():
    from sficonv_ext.cpu_allocator import large_block_cache
    with pytest.raises(ValueError, match="below 2\\*\\*63"):
        with large_block_cache(1 << 70):
            pass
    with pytest.raises(ValueError, match="got '26'"):
        models.SFIResNet(depth="26")


@pytest.mark.parametrize("eps, dtype", [(1e-50, torch.float32), (1e-40, torch.float16),
                                        (1e39, torch.float32), (1e5, torch.float16)])
def test_an_eps_the_filter_dtype_cannot_hold_is_refused(eps, dtype):
    # Before: eps=1e-50 became 0 in float32 and a zero-sum channel turned NaN on every backend.
    x, w = torch.randn(1, 4, 8, 8, dtype=dtype), torch.randn(4, 1, 3, 3, dtype=dtype)
    with pytest.raises(ValueError, match="not representable"):
        ops.mcs_conv(x, w, eps=eps)
    ops.mcs_conv(x, w, eps=1e-6)  # the default fits every dtype


def test_a_float64_input_under_autocast_is_told_why():
    model = models.sfi_resnet26().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError,
                                                                    match="autocast"):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))


def test_any_spelling_triton_accepts_turns_the_interpreter_on(monkeypatch):
    from sficonv_ext.ops.mcs_conv import triton_runs_on
    x = torch.randn(1, 4, 8, 8)
    for value, on in (("1", True), ("true", True), ("yes", True), ("0", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert triton_runs_on(x) == on, value


def test_eps_is_checked_only_where_the_constraint_uses_it():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 1, 3, 3)
    ops.mcs_conv(x, w, constrained=False, eps=1e-50)  # a plain depthwise convolution


def test_wrong_argument_types_are_named():
    x, weight, mcs = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 1, 1), torch.randn(4, 1, 5, 5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
        ops.first_sfi_conv(x.numpy(), weight, mcs, 2)
    with pytest.raises(TypeError, match="mcs_weight must be a torch.Tensor, got ndarray"):
        ops.first_sfi_conv(x, weight, mcs.numpy(), 2)
    with pytest.raises(TypeError, match="split must be an int, got 2.0"):
        ops.first_sfi_conv(x, weight, mcs, 2.0)
    import numpy as np  # NumPy integers are integers
    assert ops.first_sfi_conv(x, weight, mcs, np.int64(2)).shape == x.shape
    from sficonv_ext.nn import MCSConv2d
    with pytest.raises(TypeError, match="kernel_size must be an int, got 5.0"):
        MCSConv2d(4, 5.0)
    with pytest.raises(TypeError, match="channels must be an int, got 4.0"):
        MCSConv2d(4.0)
    with pytest.raises(TypeError, match="kernel_size must be an int, got 3.0"):
        SFIConv2d(4, 4, 3.0)
    with pytest.raises(TypeError, match="channels must be an int, got True"):
        MCSConv2d(True)
    assert MCSConv2d(np.int64(4), np.int64(5)).weight.shape == (4, 1, 5, 5)


def test_a_square_kernel_size_tuple_is_taken_as_nn_conv2d_takes_it():
    assert SFIConv2d(4, 4, (3, 3)).weight.shape == (4, 4, 3, 3)
    assert FirstSFIConv2d(3, 4, [1, 1]).weight.shape == (4, 3, 1, 1)
    with pytest.raises(ValueError, match=r"must be square, got \(3, 5\)"):
        SFIConv2d(4, 4, (3, 5))
    with pytest.raises(ValueError, match="must be odd, got 2"):
        FirstSFIConv2d(3, 4, 2)
