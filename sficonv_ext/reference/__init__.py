"""Pure-PyTorch reproduction of the published SFIConv code: the ground truth for every fast path.

See ``shared/SPEC.md``. Slow by design; use :mod:`sficonv_ext.models` for real work.
"""
from .layers import (FirstSFIConv, FirstSFIConvB, FirstSFIConvBR, LastSFIConv, LastSFIConvB,
                     LastSFIConvBR, MCSConv, SFIConv, SFIConvB, SFIConvBR, frequency_channels,
                     spatial_channels)
from .resnet import (DEPTHS, Bottleneck, BottleneckLast, BottleneckOrigin,
                     PublishedTrainingWrapper, SFIConvResNet, sfi_resnet26, sfi_resnet50,
                     sfi_resnet101, sfi_resnet152)
from .constraint import constrain_mcs_weight

__all__ = [
    "MCSConv", "FirstSFIConv", "SFIConv", "LastSFIConv", "SFIConvBR", "SFIConvB",
    "FirstSFIConvBR", "FirstSFIConvB", "LastSFIConvBR", "LastSFIConvB", "Bottleneck",
    "BottleneckLast", "BottleneckOrigin", "SFIConvResNet", "PublishedTrainingWrapper", "DEPTHS",
    "sfi_resnet26", "sfi_resnet50", "sfi_resnet101", "sfi_resnet152", "frequency_channels",
    "spatial_channels", "constrain_mcs_weight",
]
