"""Checkpoint interop between the fast model and the two published layouts (SPEC section 4).

Every entry of the fast model's state_dict is described by a :class:`Rule`: which published
tensors it is made of, and which region of the fast tensor each one fills. Export slices the
fast tensors; import assembles them. The same rules serve both directions, so a round trip is
exact by construction, except for a learnable MCSConv filter: the published layout holds the
filter forward applies (the raw weight constrained), which a learnable model re-normalises when
it loads it back (equal within float rounding, unless an off-centre sum was clamped; export
warns then).
"""
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch.nn.modules.module import _IncompatibleKeys

from torch.nn.modules.batchnorm import _BatchNorm

from ..nn import FirstSFIConv2d, MCSConv2d, SFIConv2d, SFIConvNorm
from ..nn.mcs import unconstrained_channels
from ..reference.resnet import DEPTHS

LAYOUTS = ("wrapper", "bare")
WRAPPER_PREFIX = "rgb_extract_feature"
# Index of each bare-network child inside the wrapper's nn.Sequential (fc is the wrapper's own).
WRAPPER_INDEX = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


@dataclass
class Part:
    """One published tensor: the region of the fast tensor it holds.

    ``source=False`` marks a published duplicate (``const_weight``, ``bn_f.num_batches_tracked``):
    written on export, required by strict loading, but not read back.
    """

    key: str
    region: tuple = None  # None: the whole tensor
    source: bool = True


    def take(self, tensor):
        return tensor if self.region is None else tensor[self.region]


@dataclass
class Rule:
    own_key: str
    parts: list = field(default_factory=list)
    export_value: object = None  # callable returning the tensor to export, if not the own one


def _official_module_path(name):
    # The published network wraps downsamples in nn.Sequential and names the filter MCSConv.
    out = []
    for part in name.split(".") if name else []:
        if part == "downsample":
            out += ["downsample", "0"]
        elif part == "mcs":
            out.append("MCSConv")
        else:
            out.append(part)
    return ".".join(out)


def _join(*parts):
    return ".".join(p for p in parts if p)


def _sfi_conv_rules(own, off, conv):
    i, o = conv.in_spatial, conv.out_spatial
    s_in, f_in = slice(0, i), slice(i, None)
    if conv.merge_output:
        blocks = {"s2s": (slice(None), s_in), "f2f": (slice(None), f_in)}
    else:
        s_out, f_out = slice(0, o), slice(o, None)
        blocks = {"s2s": (s_out, s_in), "f2s": (s_out, f_in),
                  "s2f": (f_out, s_in), "f2f": (f_out, f_in)}
    return [Rule(_join(own, "weight"),
                 [Part(_join(off, name, "weight"), region) for name, region in blocks.items()])]


def _first_conv_rules(own, off, conv):
    o = conv.out_spatial
    return [Rule(_join(own, "weight"), [Part(_join(off, "s2s.weight"), (slice(0, o),)),
                                        Part(_join(off, "f2f.weight"), (slice(o, None),))])]


def _exported_mcs_filter(name, mcs):
    weight = mcs.effective_weight().detach()
    if mcs.learnable:
        clamped = unconstrained_channels(weight)
        if clamped:
            warnings.warn(f"{name}: channels {clamped[:8]} of this learnable MCSConv filter have "
                          f"an off-centre sum within eps={mcs.eps} of zero (clamped), so the "
                          f"exported filter's taps do not sum to 1; a learnable model that loads "
                          f"it back will normalise it again and compute something else",
                          stacklevel=3)
    return weight


def _mcs_rules(own, off, mcs):
    weight = Rule(_join(own, "weight"),
                  [Part(_join(off, "weight")), Part(_join(off, "const_weight"), source=False)],
                  export_value=lambda: _exported_mcs_filter(own, mcs))
    bias = Rule(_join(own, "published_bias"), [Part(_join(off, "bias"))])
    return [weight, bias]


def _split_bn_rules(own, off_parent, spatial):
    rules = []
    for entry in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if spatial is None:
            parts = [Part(_join(off_parent, "bn_s", entry))]
        elif entry == "num_batches_tracked":
            parts = [Part(_join(off_parent, "bn_s", entry)),
                     Part(_join(off_parent, "bn_f", entry), source=False)]
        else:
            s = spatial
            parts = [Part(_join(off_parent, "bn_s", entry), (slice(0, s),)),
                     Part(_join(off_parent, "bn_f", entry), (slice(s, None),))]
        rules.append(Rule(_join(own, entry), parts))
    return rules


def official_rules(model):
    """Rules for every state_dict entry of ``model``, with published keys in the bare layout."""
    if getattr(model, "fused_for_inference", False):
        raise ValueError("this model was fused for inference (BatchNorm folded into the "
                         "convolutions); export or load checkpoints with the unfused model")
    rules = []
    # An SFIConvNorm's BatchNorm is the published bn_s/bn_f pair, also when it is no longer a
    # SplitBatchNorm2d (SyncBatchNorm.convert_sync_batchnorm replaces it): the split is the
    # convolution's.
    split_bns = {_join(name, "bn"): module.conv.out_spatial for name, module in
                 model.named_modules() if isinstance(module, SFIConvNorm)
                 and isinstance(module.bn, _BatchNorm)}
    for name, module in model.named_modules():
        off = _official_module_path(name)
        if name in split_bns:
            rules += _split_bn_rules(name, off.rpartition(".")[0], split_bns[name])
        elif isinstance(module, SFIConv2d):
            rules += _sfi_conv_rules(name, off, module)
        elif isinstance(module, FirstSFIConv2d):
            rules += _first_conv_rules(name, off, module)
        elif isinstance(module, MCSConv2d):
            rules += _mcs_rules(name, off, module)
        else:
            # Modules laid out as published (stem, plain bottlenecks, fc): one to one.
            local = list(module.named_parameters(recurse=False))
            local += [(n, b) for n, b in module.named_buffers(recurse=False)
                      if n not in module._non_persistent_buffers_set]
            rules += [Rule(_join(name, n), [Part(_join(off, n))]) for n, _ in local]
    return rules


def _to_layout(bare_key, layout):
    if layout == "bare":
        return bare_key
    head, _, rest = bare_key.partition(".")
    if head == "fc":
        return bare_key
    return _join(WRAPPER_PREFIX, str(WRAPPER_INDEX[head]), rest)


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def to_official_state_dict(model, layout="wrapper"):
    """Export ``model`` as a state_dict the published code loads with ``strict=True``.

    ``layout="wrapper"``: the published training wrapper (``best.pkl``: ``rgb_extract_feature.*``
    and ``fc.*``); ``layout="bare"``: the bare network (``conv1.*`` ... ``fc.*``).
    """
    _check_layout(layout)
    from .resnet import SFIResNet  # here: resnet imports this module for load_state_dict
    if getattr(model, "fused_for_inference", False):
        official_rules(model)  # raises its clear ValueError for a fused model
    if not isinstance(model, SFIResNet):
        raise TypeError(f"to_official_state_dict exports a whole SFIResNet from "
                        f"sficonv_ext.models (load a state_dict into one first), got "
                        f"{type(model).__name__}")
    own = model.state_dict()
    out = OrderedDict()
    for rule in official_rules(model):
        value = rule.export_value() if rule.export_value else own[rule.own_key]
        for part in rule.parts:
            out[_to_layout(part.key, layout)] = part.take(value).detach().clone()
    return out


def detect_layout(state_dict):
    """``"wrapper"``, ``"bare"`` or ``"own"``, from the keys of a state_dict."""
    keys = list(state_dict)
    if any(k.startswith(WRAPPER_PREFIX + ".") for k in keys):
        return "wrapper"
    if any(re.search(r"(^|\.)((s2s|f2f|bn_s|bn_f|MCSConv)\.|const_weight$)", k) for k in keys):
        return "bare"
    return "own"


def _blocks_per_stage(keys, layout):
    pattern = (r"^rgb_extract_feature\.([4-7])\.(\d+)\." if layout == "wrapper"
               else r"^layer([1-4])\.(\d+)\.")
    counts = {}
    for k in keys:
        m = re.match(pattern, k)
        if m:
            stage = int(m.group(1)) - (3 if layout == "wrapper" else 0)
            counts[stage] = max(counts.get(stage, 0), int(m.group(2)) + 1)
    return tuple(counts.get(s, 0) for s in (1, 2, 3, 4))


def _model_name(model):
    depth = getattr(model, "depth", None)
    return type(model).__name__ + (f" (SFIConv-ResNet-{depth})" if depth else "")


def _depth_hint(model, keys, layout):
    if getattr(model, "depth", None) not in DEPTHS:
        return ""
    found = _blocks_per_stage(keys, layout)
    if found == DEPTHS[model.depth] or not any(found):
        return ""
    names = [f"SFIConv-ResNet-{d}" for d, b in DEPTHS.items() if b == found]
    what = names[0] if names else f"blocks per stage {list(found)}"
    build = (f"sficonv_ext.models.sfi_resnet{names[0].rpartition('-')[2]} (on the command "
             f"line: --arch sfi_resnet{names[0].rpartition('-')[2]})" if names
             else "the sfi_resnet<depth> of that depth")
    return (f" The checkpoint looks like {what}; this model is SFIConv-ResNet-{model.depth} "
            f"(build it with {build}).")


def _listing(keys, limit=12):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _check_mapping(state_dict):
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state_dict (a mapping of names to tensors), got "
                        f"{type(state_dict).__name__}")
    odd_keys = [k for k in state_dict if not isinstance(k, str)]
    if odd_keys:
        raise TypeError(f"state_dict keys must be strings, got {odd_keys[:3]}")
    nested = [k for k, v in state_dict.items() if isinstance(v, Mapping)]
    if nested and not any(isinstance(v, torch.Tensor) for v in state_dict.values()):
        # A whole training checkpoint ({"state_dict": ..., "epoch": ...}); with strict=False
        # torch would otherwise load nothing and only report it. Name the entry of tensors.
        inner = [k for k in nested if state_dict[k]
                 and all(isinstance(v, torch.Tensor) for v in state_dict[k].values())]
        raise TypeError(f"expected a state_dict, got a mapping with no tensors whose entries "
                        f"{nested[:4]} are mappings: a whole checkpoint? Pass the state_dict "
                        f"inside it, e.g. checkpoint[{(inner or nested)[0]!r}]")


def _check_prefix(model, state_dict):
    # A checkpoint saved from nn.DataParallel / DistributedDataParallel, for a model that is
    # not such a wrapper itself.
    if (state_dict and all(k.startswith("module.") for k in state_dict)
            and not any(k.startswith("module.") for k in model.state_dict())):
        raise RuntimeError("Error loading a state_dict: every key starts with 'module.' (saved "
                           "from DataParallel or DDP): strip it, {k[len('module.'):]: v for k, "
                           "v in state_dict.items()}, and load that")


def _tensor(state_dict, key):
    """A published entry as a tensor (NumPy arrays load too); the key is named if it is not."""
    try:
        return torch.as_tensor(state_dict[key])
    except (TypeError, RuntimeError, ValueError) as error:
        raise TypeError(f"state_dict[{key!r}] is not a tensor ({type(state_dict[key]).__name__}"
                        f"): {error}") from None


_BATCHNORM_ENTRY = re.compile(r"\.(running_mean|running_var|num_batches_tracked)$")


def _filled_in_by_batchnorm(key, state_dict):
    # BatchNorm fills in a missing num_batches_tracked itself, but only for a checkpoint saved
    # before it existed (module metadata version below 2, or no metadata at all).
    if not key.endswith(".num_batches_tracked"):
        return False
    metadata = getattr(state_dict, "_metadata", None) or {}
    version = metadata.get(key[:-len(".num_batches_tracked")], {}).get("version")
    return version is None or version < 2


def _check_folding(model, state_dict, own_now):
    """A checkpoint with BatchNorm entries for a fused model, or one with folded convolution
    biases and no BatchNorm statistics for an unfused model: refused in either direction (the
    weights mean something else there), also with strict=False."""
    fused = getattr(model, "fused_for_inference", False)
    if fused:
        unfolded = sorted(k for k in state_dict if k not in own_now and _BATCHNORM_ENTRY.search(k))
        if unfolded:
            raise ValueError(f"this model was fused for inference (BatchNorm folded into the "
                             f"convolutions) but the state_dict has BatchNorm entries "
                             f"({_listing(unfolded)}): load it into the unfused model, then "
                             f"call fuse_for_inference")
        return
    def is_conv_weight(t):
        return isinstance(t, torch.Tensor) and t.dim() == 4

    folded = sorted(k for k in state_dict if k not in own_now and k.endswith(".bias")
                    and is_conv_weight(own_now.get(k[:-len("bias")] + "weight")))
    unmatched_stats = any(_BATCHNORM_ENTRY.search(k) for k in own_now if k not in state_dict)
    if folded and unmatched_stats:
        raise ValueError(f"this state_dict is of a model fused for inference (convolution biases "
                         f"{_listing(folded)} and no BatchNorm statistics): BatchNorm is folded "
                         f"into its weights, so it cannot be loaded into a model with BatchNorm; "
                         f"load the checkpoint it was fused from")


def _check_own_layout(model, state_dict, strict):
    # Checked before nn.Module.load_state_dict runs: on a mismatch it raises only after copying
    # every entry that does match, which leaves the model half loaded.
    own_now = model.state_dict()
    _check_folding(model, state_dict, own_now)
    for name, module in model.named_modules():
        refusal = (module.refusal_of(state_dict.get(f"{name}.weight"), f"{name}.")
                   if isinstance(module, MCSConv2d) else None)
        if refusal:
            raise RuntimeError(f"Error loading a state_dict into {_model_name(model)} (nothing "
                               f"was loaded): {refusal}")
    missing = sorted(k for k in set(own_now) - set(state_dict)
                     if not _filled_in_by_batchnorm(k, state_dict))
    unexpected = sorted(set(state_dict) - set(own_now))
    if strict and (missing or unexpected):
        msg = [f"Error loading a state_dict into {_model_name(model)} (nothing was loaded):"]
        if missing:
            msg.append(f"missing keys: {_listing(missing)}.")
        if unexpected:
            msg.append(f"unexpected keys: {_listing(unexpected)}.")
        raise RuntimeError(" ".join(msg) + _depth_hint(model, state_dict, "own"))
    bad_shapes = sorted(
        f"{k}: checkpoint {list(_tensor(state_dict, k).shape)}, model {list(own_now[k].shape)}"
        for k in state_dict if k in own_now
        and tuple(_tensor(state_dict, k).shape) != tuple(own_now[k].shape))
    if bad_shapes:
        raise RuntimeError("Error loading a state_dict (nothing was loaded): shape mismatch for "
                           + "; ".join(bad_shapes))


def to_own_state_dict(model, state_dict, strict=True):
    """Translate a state_dict in any supported layout into ``model``'s own layout.

    Returns ``(own_state_dict, report)``; ``report`` is None for the own layout, else the
    missing and unexpected keys in the checkpoint's own names (for ``strict=False``).
    Raises ``RuntimeError`` naming the offending keys on a mismatch in strict mode, and on a shape
    mismatch in any mode.
    """
    _check_mapping(state_dict)
    _check_prefix(model, state_dict)
    layout = detect_layout(state_dict)
    if layout == "own":
        _check_own_layout(model, state_dict, strict)
        return state_dict, None
    own_now = model.state_dict()
    rules = official_rules(model)
    expected = {_to_layout(p.key, layout): (rule, p) for rule in rules for p in rule.parts}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if strict and (missing or unexpected):
        msg = [f"Error loading a published {layout}-layout state_dict into "
               f"{_model_name(model)}:"]
        if missing:
            msg.append(f"missing keys: {_listing(missing)}.")
        if unexpected:
            msg.append(f"unexpected keys: {_listing(unexpected)}.")
        raise RuntimeError(" ".join(msg) + _depth_hint(model, state_dict, layout))
    bad_shapes = []
    for key, (rule, part) in expected.items():
        if key in state_dict:
            want = tuple(part.take(own_now[rule.own_key]).shape)
            got = tuple(_tensor(state_dict, key).shape)
            if got != want:
                bad_shapes.append(f"{key}: checkpoint {list(got)}, model {list(want)}")
    if bad_shapes:
        raise RuntimeError("Error loading a published state_dict: shape mismatch for "
                           + "; ".join(sorted(bad_shapes)) + _depth_hint(model, state_dict, layout))
    own = OrderedDict()
    for rule in rules:
        present = [p for p in rule.parts if p.source and _to_layout(p.key, layout) in state_dict]
        if not present:
            continue  # only possible with strict=False; reported as missing
        target = own_now[rule.own_key]
        first = _tensor(state_dict, _to_layout(present[0].key, layout))
        if len(present) < sum(p.source for p in rule.parts):
            # strict=False with some parts of a fused tensor missing (reported as missing):
            # those regions keep the model's current values, as torch keeps a missing tensor.
            if target.is_meta:  # no current values to keep: the tensor is not loaded at all
                missing = sorted(missing + [_to_layout(p.key, layout) for p in present])
                continue
            value = target.detach().to(dtype=first.dtype, device=first.device, copy=True)
        else:
            # empty_like keeps the model's memory format (channels_last), for assign=True.
            value = torch.empty_like(target, dtype=first.dtype, device=first.device)
        for p in present:
            p.take(value).copy_(_tensor(state_dict, _to_layout(p.key, layout)))
        own[rule.own_key] = value
    return own, _IncompatibleKeys(missing, unexpected)


def load_official(module, state_dict, strict=True):
    """Load a published-layout state_dict into any fast module (a layer, a block, a model)."""
    own, report = to_own_state_dict(module, state_dict, strict=strict)
    result = torch.nn.Module.load_state_dict(module, own, strict=strict)
    return result if report is None else report
