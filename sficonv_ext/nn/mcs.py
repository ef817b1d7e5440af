"""MCSConv2d: the constrained depthwise filter of the frequency branch (SPEC section 1)."""
import torch
import torch.nn as nn

from .._arguments import as_int
from ..ops import BACKENDS, mcs_conv
from ..reference.constraint import constrain_mcs_weight

MCS_INITS = ("published", "stable")


def published_mcs_init(channels, kernel_size=5, generator=None, dtype=None):
    """The published initialisation: ``N(0, 1)`` taps divided by their off-centre sum, centre -1.

    Nothing guards a sum near zero, so taps of 100 and more occur; kept for parity.
    """
    raw = torch.randn(channels, 1, kernel_size, kernel_size, generator=generator, dtype=dtype)
    c = kernel_size // 2
    raw[:, :, c, c] = 0
    raw = raw / raw.sum(dim=(1, 2, 3), keepdim=True)
    raw[:, :, c, c] = -1
    return raw


def stable_mcs_init(channels, kernel_size=5, generator=None, dtype=None):
    """A bounded initialisation: positive off-centre taps summing to 1 (to float rounding),
    centre -1.

    Every ``S_c`` is 1 up to rounding, so no filter starts near the clamp and no tap exceeds 1.
    """
    raw = torch.rand(channels, 1, kernel_size, kernel_size, generator=generator, dtype=dtype)
    raw = raw + 0.5  # keeps every tap well away from 0
    c = kernel_size // 2
    raw[:, :, c, c] = 0
    raw = raw / raw.sum(dim=(1, 2, 3), keepdim=True)
    raw[:, :, c, c] = -1
    return raw


def unconstrained_channels(weight):
    """Channels of a filter ``[C, 1, k, k]`` that break the published constraint: a centre other
    than -1, or off-centre taps whose sum is not 1 up to rounding.

    The rounding allowed is bfloat16's, whatever the dtype the filter is stored in now: a model
    kept in bfloat16 or float16 and saved in float32 carries that rounding. It scales with the
    taps' absolute sum (the published initialisation can give taps above 100 that cancel). A
    learnable filter's raw weight drifts further than that within a few optimizer steps.
    """
    w = weight.detach().to(torch.float64, copy=True)  # zeroed below: never the caller's
    c = w.shape[-1] // 2
    centre = w[:, 0, c, c].clone()
    w[:, 0, c, c] = 0
    sums, magnitudes = w.sum(dim=(1, 2, 3)), w.abs().sum(dim=(1, 2, 3))
    tolerance = torch.finfo(torch.bfloat16).eps * (1 + magnitudes)
    bad = (centre != -1) | ((sums - 1).abs() > tolerance)
    return bad.nonzero().flatten().tolist()


class MCSConv2d(nn.Module):
    """Depthwise ``k x k`` constrained convolution, stride 1, padding ``k // 2``, no bias.

    ``learnable=False`` (default, published behaviour): ``weight`` holds the constrained filter
    and is frozen. ``learnable=True``: ``weight`` is a raw parameter and the constraint is applied
    in every forward as a differentiable reparametrisation, so training moves the filter.
    ``published_bias`` is the published module's unused random ``bias`` (zeros until a published
    checkpoint is loaded); it is kept only so that
    published checkpoints round-trip exactly, and never enters the computation.
    ``backend`` picks the kernel (see :func:`sficonv_ext.ops.mcs_conv`); it is not saved.
    """

    def __init__(self, channels, kernel_size=5, learnable=False, init="published", eps=1e-6,
                 backend="auto"):
        super().__init__()
        channels = as_int(channels, "MCSConv2d channels")
        kernel_size = as_int(kernel_size, "MCSConv2d kernel_size")
        if channels < 1:
            raise ValueError(f"MCSConv2d needs at least one channel, got {channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"MCSConv2d kernel_size must be odd and positive, got {kernel_size}")
        if init not in MCS_INITS:
            raise ValueError(f"MCSConv2d init must be one of {MCS_INITS}, got {init!r}")
        if not eps > 0:
            raise ValueError(f"MCSConv2d eps must be positive, got {eps}")
        if backend not in BACKENDS:
            raise ValueError(f"MCSConv2d backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.channels = channels
        self.kernel_size = kernel_size
        self.learnable = learnable
        self.eps = eps
        make = published_mcs_init if init == "published" else stable_mcs_init
        self.weight = nn.Parameter(make(channels, kernel_size), requires_grad=learnable)
        self.register_buffer("published_bias", torch.zeros(channels))

    def refusal_of(self, loaded, prefix=""):
        """Why this module refuses ``loaded`` as its filter, or None: a frozen filter is used as
        it is, so one that is not constrained (such as a learnable MCSConv's raw weight, under
        the same key) would silently change the outputs."""
        if (self.learnable or not isinstance(loaded, torch.Tensor) or loaded.is_meta
                or not loaded.is_floating_point() or loaded.shape != self.weight.shape):
            return None
        bad = unconstrained_channels(loaded)
        if not bad:
            return None
        return (f"{prefix}weight: channels {bad[:8]}{' ...' if len(bad) > 8 else ''} of this "
                f"frozen MCSConv filter are not constrained (centre -1, other taps summing to "
                f"1); a learnable MCSConv's raw weight? Build the model with mcs_learnable=True "
                f"to load it")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        refusal = self.refusal_of(state_dict.get(prefix + "weight"), prefix)
        if refusal:
            error_msgs.append(refusal)
            # Refused, so not copied in either (as PyTorch skips a tensor of the wrong shape):
            # the model keeps its filter whatever load_state_dict's caller does next.
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
            if prefix + "weight" in missing_keys:
                missing_keys.remove(prefix + "weight")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def effective_weight(self):
        """The filter forward applies: constrained on the fly in learnable mode."""
        if self.learnable:
            return constrain_mcs_weight(self.weight, self.eps)
        return self.weight

    def forward(self, x):
        # Learnable: the raw weight goes in and the kernel applies the constraint itself.
        return mcs_conv(x, self.weight, constrained=self.learnable, eps=self.eps,
                        backend=self.backend)

    def extra_repr(self):
        return (f"{self.channels}, kernel_size={self.kernel_size}, learnable={self.learnable}, "
                f"eps={self.eps}, backend={self.backend!r}")
