"""The networks ``--arch`` can name."""
from .. import models
from .errors import UserError

ARCHS = {
    "sfi_resnet26": models.sfi_resnet26,
    "sfi_resnet50": models.sfi_resnet50,
    "sfi_resnet101": models.sfi_resnet101,
    "sfi_resnet152": models.sfi_resnet152,
}


def build_model(arch, mcs_learnable=False, mcs_init="published"):
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch](num_classes=2, mcs_learnable=mcs_learnable, mcs_init=mcs_init)
