"""Fast SFIConv-ResNet models, checkpoint interop and inference fusion."""
from .fuse import FusedForInference, fuse_for_inference
from .input_checks import MIN_INPUT_SIZE
from .interop import LAYOUTS, detect_layout, to_official_state_dict
from .resnet import (PlainBottleneck, SFIBottleneck, SFIResNet, set_conv_backend,
                     set_norm_backend, set_pointwise_backend, sfi_resnet26, sfi_resnet50,
                     sfi_resnet101, sfi_resnet152)

__all__ = ["SFIResNet", "SFIBottleneck", "PlainBottleneck", "sfi_resnet26", "sfi_resnet50",
           "sfi_resnet101", "sfi_resnet152", "to_official_state_dict", "detect_layout", "LAYOUTS",
           "fuse_for_inference", "FusedForInference", "MIN_INPUT_SIZE", "set_norm_backend",
           "set_conv_backend", "set_pointwise_backend"]
