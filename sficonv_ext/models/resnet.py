"""Fast SFIConv-ResNet: the published network (SPEC section 3) on fused layers.

Module names follow the published bare network where the structure allows (``conv1``, ``bn1``,
``layerN.B.SFIC1``...), with one ``conv`` and one ``bn`` per SFIConv layer instead of the
published four convolutions and two BatchNorms. :mod:`.interop` maps between the two layouts.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import FirstSFIConv2d, SFIConv2d, SFIConvNorm
from ..nn.hooks import hooked
from ..ops.ad_modes import functorch_transform_active
from ..ops.conv1x1 import CONV1X1_BACKENDS, conv1x1
from ..ops.conv3x3 import CONV3X3_BACKENDS, conv3x3
from ..ops.norm_act import NORM_ACT_BACKENDS, batch_norm_act
from ..reference.resnet import DEPTHS, EXPANSION
from .input_checks import check_input


def _set_on_every_layer(model, attribute, backend, choices):
    if backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    for module in model.modules():
        if hasattr(module, attribute):
            setattr(module, attribute, backend)
    return model


def set_norm_backend(model, backend):
    """Pick the BatchNorm(+add)(+ReLU) epilogue path of every layer of ``model``: "auto",
    "torch", "cpp" or "triton" (see :func:`sficonv_ext.ops.batch_norm_act`). Returns ``model``."""
    return _set_on_every_layer(model, "norm_backend", backend, NORM_ACT_BACKENDS)


def set_conv_backend(model, backend):
    """Pick the path of every 3x3 convolution of ``model``: "auto", "torch" or "winograd"
    (see :func:`sficonv_ext.ops.conv3x3`). Returns ``model``."""
    return _set_on_every_layer(model, "conv_backend", backend, CONV3X3_BACKENDS)


def set_pointwise_backend(model, backend):
    """Pick the path of every 1x1 convolution of ``model`` after the first layer: "auto",
    "torch" or "gemm" (see :func:`sficonv_ext.ops.conv1x1`). Returns ``model``."""
    return _set_on_every_layer(model, "pointwise_backend", backend, CONV1X1_BACKENDS)


def _is_plain_conv(conv, size):
    """An unhooked nn.Conv2d that computes exactly ``conv3x3`` (``size`` 3: stride 1, padding
    1) or ``conv1x1`` (``size`` 1: stride 1, no padding)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (size, size)
            and conv.stride == (1, 1) and conv.padding == (size // 2, size // 2)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not hooked(conv))


class SFIBottleneck(nn.Module):
    """SFIConv bottleneck of layers 1-3, or of layer4's first block with ``last=True``.

    ``first=True`` is the published first block of layer1: SFIC1 is a FirstSFIConv on the stem
    tensor and ITS OUTPUT, not the block input, feeds the residual branch.
    """

    def __init__(self, inplanes, planes, stride=1, downsample=False, first=False, last=False,
                 mcs_options=None):
        super().__init__()
        if last and not downsample:
            raise ValueError("a last SFIConv block merges the branches, so it needs a downsample")
        width, out = planes, planes * EXPANSION
        self.first, self.last = first, last
        if first:
            conv1 = FirstSFIConv2d(inplanes, width, 1, **(mcs_options or {}))
        else:
            conv1 = SFIConv2d(inplanes, width, 1)
        self.SFIC1 = SFIConvNorm(conv1, relu=True)
        self.SFIC2 = SFIConvNorm(SFIConv2d(width, width, 3, stride=stride), relu=True)
        self.SFIC3 = SFIConvNorm(SFIConv2d(width, out, 1, merge_output=last), relu=False)
        self.downsample = None
        if downsample:
            ds_in = width if first else inplanes
            self.downsample = SFIConvNorm(
                SFIConv2d(ds_in, out, 1, stride=stride, merge_output=last), relu=False)

    def forward(self, x):
        h = self.SFIC1(x)
        residual = h if self.first else x
        if self.downsample is not None:
            residual = self.downsample(residual)
        # SFIC3's BatchNorm, the residual add and the block's ReLU: one epilogue.
        return self.SFIC3(self.SFIC2(h), residual=residual, relu=True)


class PlainBottleneck(nn.Module):
    """Ordinary ResNet bottleneck of the remaining layer4 blocks (identity residual)."""

    conv_backend = "auto"  # whole models pickled before these attributes existed
    pointwise_backend = "auto"

    def __init__(self, inplanes, planes):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.norm_backend = "auto"  # see set_norm_backend; not saved
        self.conv_backend = "auto"  # see set_conv_backend; not saved
        self.pointwise_backend = "auto"  # see set_pointwise_backend; not saved

    def _pointwise(self, conv, x):
        if _is_plain_conv(conv, 1):  # the module itself when hooked or replaced
            return conv1x1(x, conv.weight, conv.bias, backend=self.pointwise_backend)
        return conv(x)

    def forward(self, x):
        # Each convolution's output is a temporary: add and ReLU may work in place on it
        # (after fuse_for_inference, with onednn=False), unless a hook has been handed it.
        out = batch_norm_act(self._pointwise(self.conv1, x), self.bn1,
                             backend=self.norm_backend, inplace_ok=not hooked(self.conv1))
        if _is_plain_conv(self.conv2, 3):  # the module itself when hooked or replaced
            out = conv3x3(out, self.conv2.weight, self.conv2.bias, backend=self.conv_backend)
        else:
            out = self.conv2(out)
        out = batch_norm_act(out, self.bn2, backend=self.norm_backend,
                             inplace_ok=not hooked(self.conv2))
        return batch_norm_act(self._pointwise(self.conv3, out), self.bn3, x,
                              backend=self.norm_backend, inplace_ok=not hooked(self.conv3))


class SFIResNet(nn.Module):
    """SFIConv-ResNet on fused layers; forward maps ``[N, 3, H, W]`` to logits ``[N, classes]``.

    Options: ``mcs_learnable`` (False: published frozen filter; True: learnable constrained
    filter), ``mcs_init`` ("published" or "stable"), ``mcs_eps`` (clamp of the constraint's sum),
    ``channels_last`` (True: weights and activations in channels_last, the input is converted
    on entry; measured faster on CPU (oneDNN) and the layout tensor cores want on GPU).
    ``load_state_dict`` takes this model's own layout and both published layouts.
    """

    def __init__(self, depth=26, num_classes=2, mcs_learnable=False, mcs_init="published",
                 mcs_eps=1e-6, channels_last=True):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.depth, self.num_classes = depth, num_classes
        self.channels_last = channels_last
        mcs_options = dict(mcs_learnable=mcs_learnable, mcs_init=mcs_init, mcs_eps=mcs_eps)
        blocks = DEPTHS[depth]
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(
            SFIBottleneck(64, 64, 1, downsample=True, first=True, mcs_options=mcs_options),
            *[SFIBottleneck(256, 64) for _ in range(1, blocks[0])])
        self.layer2 = self._sfi_stage(256, 128, blocks[1])
        self.layer3 = self._sfi_stage(512, 256, blocks[2])
        self.layer4 = nn.Sequential(
            SFIBottleneck(1024, 512, 2, downsample=True, last=True),
            *[PlainBottleneck(2048, 512) for _ in range(1, blocks[3])])
        self.fc = nn.Linear(512 * EXPANSION, num_classes)
        self.norm_backend = "auto"  # see set_norm_backend; not saved
        self.conv_backend = "auto"  # see set_conv_backend; not saved
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @staticmethod
    def _sfi_stage(inplanes, planes, blocks):
        return nn.Sequential(SFIBottleneck(inplanes, planes, 2, downsample=True),
                             *[SFIBottleneck(planes * EXPANSION, planes)
                               for _ in range(1, blocks)])

    def features(self, x):
        """Pooled 2048-d features, before ``fc``."""
        check_input(self, x)
        if self.channels_last and not functorch_transform_active():
            x = x.contiguous(memory_format=torch.channels_last)
        # The stem's ReLU runs after the max pool, on a map 4x smaller. They commute exactly
        # (both monotone: the max of the ReLUs is the ReLU of the max), and so do gradients:
        # a window with a positive max sends its gradient to the same element either way, any
        # other window sends zero.
        x = batch_norm_act(self.conv1(x), self.bn1, relu=False, backend=self.norm_backend,
                           inplace_ok=True)
        x = F.relu(self.maxpool(x), inplace=not hooked(self.maxpool))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x):
        return self.fc(self.features(x))

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load this model's own layout, the published bare network or the published training
        wrapper (``rgb_extract_feature.*`` + ``fc.*``). A mismatch names the offending keys."""
        from .interop import to_own_state_dict
        own, report = to_own_state_dict(self, state_dict, strict=strict)
        result = super().load_state_dict(own, strict=strict, assign=assign)
        if report is None:
            return result
        return report


def _builder(depth):
    def build(num_classes=2, **options):
        return SFIResNet(depth, num_classes=num_classes, **options)
    build.__name__ = f"sfi_resnet{depth}"
    build.__doc__ = (f"Fast SFIConv-ResNet-{depth}: ``[N, 3, H, W]`` -> logits "
                     f"``[N, num_classes]``. Options: see :class:`SFIResNet`.")
    return build


sfi_resnet26 = _builder(26)
sfi_resnet50 = _builder(50)
sfi_resnet101 = _builder(101)
sfi_resnet152 = _builder(152)
