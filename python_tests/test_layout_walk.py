"""channels_last and autocast hold end to end in the fast model (no silent layout flip inside),
and the model-level errors of issue 4: sparse input, one value per BatchNorm channel, CUDA-graph
misuse."""
import pytest
import torch

from sficonv_ext import models


def walk_activations(model, x, autocast_dtype=None):
    """(module name, output) for every module whose output is a 4-D tensor."""
    seen = []
    hooks = [m.register_forward_hook(
        lambda mod, inp, out, name=name: seen.append((name, out))
        if isinstance(out, torch.Tensor) and out.dim() == 4 else None)
        for name, m in model.named_modules() if name]
    try:
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_every_activation_stays_channels_last(train, autocast_dtype):
    model = models.sfi_resnet26().train(train)
    x = torch.randn(2, 3, 67, 61)  # NCHW from a loader: converted once, on entry
    seen = walk_activations(model, x, autocast_dtype)
    assert len(seen) > 80  # every conv, norm and block of ResNet-26
    flipped = [name for name, t in seen
               if not t.is_contiguous(memory_format=torch.channels_last)]
    assert not flipped, f"activations left channels_last at {flipped[:5]}"
    if autocast_dtype is not None:
        convs = [(name, t.dtype) for name, t in seen if name.endswith("conv")]
        assert convs and all(d == autocast_dtype for _, d in convs), convs[:5]


def test_sparse_input_is_rejected():
    with pytest.raises(ValueError, match="dense"):
        models.sfi_resnet26().eval()(torch.randn(1, 3, 32, 32).to_sparse())


def test_training_batch_with_one_value_per_channel_is_rejected():
    model = models.sfi_resnet26().train()
    with pytest.raises(ValueError, match="more than one value per channel"):
        model(torch.randn(1, 3, 40, 40))  # layer4 is 1x1: one value per channel
    model(torch.randn(2, 3, 40, 40))        # two values: fine
    model.eval()(torch.randn(1, 3, 40, 40))  # eval uses running statistics: fine


def test_cuda_graph_needs_a_cuda_model():
    with pytest.raises(ValueError, match="CUDA device"):
        models.fuse_for_inference(models.sfi_resnet26(), cuda_graph=True)
