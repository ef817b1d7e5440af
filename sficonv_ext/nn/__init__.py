"""Fast SFIConv layers built on the fusion identity (one tensor, one convolution per layer)."""
from .mcs import MCS_INITS, MCSConv2d, published_mcs_init, stable_mcs_init
from .sficonv import (FirstSFIConv2d, SFIConv2d, SFIConvNorm, SplitBatchNorm2d,
                      pool_before_pointwise)

__all__ = ["MCSConv2d", "MCS_INITS", "published_mcs_init", "stable_mcs_init", "SFIConv2d",
           "FirstSFIConv2d", "SFIConvNorm", "SplitBatchNorm2d", "pool_before_pointwise"]
