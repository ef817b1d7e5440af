"""Clear errors for inputs the network cannot take, raised before any kernel runs."""
import torch

from ..ops.autocast import autocast_on


def _stem_and_stages(size):
    """Spatial size after the stem (7x7 s2 conv, 3x3 s2 max pool) and after each stage."""
    size = (size + 2 * 3 - 7) // 2 + 1      # conv1
    size = (size + 2 * 1 - 3) // 2 + 1      # maxpool
    sizes = [size]                          # layer1 keeps it
    for _ in range(3):                      # layers 2-4: 2x2 average pool, floor
        size //= 2
        sizes.append(size)
    return sizes


def min_input_size():
    """Smallest height/width for which every stage still has at least one pixel."""
    size = 1
    while _stem_and_stages(size)[-1] < 1:
        size += 1
    return size


MIN_INPUT_SIZE = min_input_size()
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _last_stage_uses_batch_statistics(model):
    # The last stage's BatchNorms see the fewest values per channel. One normalises with batch
    # statistics in training mode, or always without running statistics; one frozen with
    # .eval() inside a training model (fine-tuning) uses its running statistics.
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               and (m.training or m.running_mean is None) for m in model.layer4.modules())


def check_input(model, x):
    """Validate ``x`` for an SFIConv-ResNet: a floating ``[N, 3, H, W]`` tensor of the model's
    dtype (unless autocast is on) with ``H, W >= MIN_INPUT_SIZE``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of shape [N, 3, H, W], got {type(x).__name__}")
    if x.is_nested:
        raise ValueError("expected one dense [N, 3, H, W] tensor, got a nested tensor; batch "
                         "images of one size together (or resize them) instead")
    if x.layout != torch.strided:
        raise ValueError(f"expected a dense (strided) tensor, got layout {x.layout}; convert it "
                         f"with .to_dense()")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input [N, 3, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        raise ValueError(f"expected 3 input channels (RGB) in dimension 1, got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {x.dtype}; convert the images "
                        f"with .float() and normalise them first")
    h, w = x.shape[-2:]
    if min(h, w) < MIN_INPUT_SIZE:
        raise ValueError(f"input spatial size {h}x{w} is too small: SFIConv-ResNet downsamples "
                         f"32 times and needs at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}")
    weight_dtype = model.conv1.weight.dtype
    autocast = autocast_on(x.device.type)
    if x.dtype not in _FLOATS:
        raise TypeError(f"expected a float16, bfloat16, float32 or float64 input, got "
                        f"{x.dtype}")
    if x.dtype != weight_dtype and not autocast:
        raise TypeError(f"input dtype {x.dtype} does not match the model's parameters "
                        f"({weight_dtype}); call model.to({x.dtype}) or convert the input")
    if autocast and (x.dtype == torch.float64) != (weight_dtype == torch.float64):
        # Autocast leaves float64 alone (as for F.conv2d), so one float64 side meets a cast one.
        raise TypeError(f"input dtype {x.dtype} with parameters in {weight_dtype} under "
                        f"autocast: autocast does not cast float64; convert the input to "
                        f"float32 (or the model to float64 and turn autocast off)")
    if x.device != model.conv1.weight.device:
        raise ValueError(f"input is on {x.device} but the model is on "
                         f"{model.conv1.weight.device}")
    final = _stem_and_stages(h)[-1] * _stem_and_stages(w)[-1]
    if x.shape[0] * final < 2 and _last_stage_uses_batch_statistics(model):
        why = ("in training mode BatchNorm" if model.training else
               "a BatchNorm without running statistics (track_running_stats=False)")
        raise ValueError(
            f"{why} needs more than one value per channel, but a batch of {x.shape[0]} at "
            f"{h}x{w} leaves {x.shape[0] * final} at the last stage; use a batch of 2 or more, "
            f"larger images{', or model.eval()' if model.training else ''}")
