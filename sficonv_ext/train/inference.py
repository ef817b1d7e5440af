"""Loading a checkpoint for scoring, shared by ``sficonv eval`` and ``sficonv predict``."""
import torch

from .. import models
from . import checkpoint as ckpt
from .architectures import build_model
from .errors import UserError


def load_model(path, arch, device, channels_last=False, compile_model=False, log=print,
               fuse=False, loaded=None):
    """Build the network a checkpoint needs and load it (ours, or a published ``best.pkl``).
    ``fuse``: return ``models.fuse_for_inference`` of it (eval-only, BatchNorm folded).
    ``loaded``: ``ckpt.load_file(path)``'s result where the caller has it already.

    ``arch`` None: the checkpoint's own, or sfi_resnet26 for a published file (which does not
    record it). Returns ``(model in eval mode, resolved checkpoint path)``.
    """
    obj, path = loaded or ckpt.load_file(path)
    state_dict, saved_arch, options = ckpt.model_weights(obj, path)
    if arch and saved_arch and arch != saved_arch:
        raise UserError(f"--arch {arch} does not match the checkpoint's {saved_arch}")
    arch = arch or saved_arch or "sfi_resnet26"
    model = build_model(arch, **options)
    ckpt.load_into(model, state_dict, path)
    log(f"loaded {path} ({'training checkpoint' if saved_arch else 'state_dict'}, {arch})")
    model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if fuse:
        model = models.fuse_for_inference(model)
        log("scoring with fuse_for_inference (BatchNorm folded into the convolutions)")
    if compile_model:
        model = torch.compile(model)
    return model, path
