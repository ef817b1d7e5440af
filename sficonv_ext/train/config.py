"""Every option of the ``sficonv`` command in one table: defaults, YAML files, the built-in data
set's own defaults, and what a resumed run may not change.

Precedence, lowest first: defaults, the ``--data builtin`` defaults, the YAML file
(``--config``), the command line.
"""
import math
import os
import sys
from dataclasses import dataclass

from ..models.input_checks import MIN_INPUT_SIZE
from .cpu_memory import CPU_MALLOC_CHOICES
from .errors import UserError

# Published recipe (SPEC section 6) except the learning-rate schedule: halving the rate every
# epoch leaves 1e-4 * 2**-19 (about 2e-10) for the last of 20 epochs, so training stalls after a
# few epochs. Cosine decay over the run is the default; "published" restores the halving.
SCHEDULES = ("cosine", "published", "constant")
AUGMENTS = ("published", "light", "none")
BEST_METRICS = ("acc", "auc", "ap", "eer", "loss")
LOWER_IS_BETTER = {"eer", "loss"}

# ``--data builtin`` is a few thousand small images: these defaults make the README's
# ``sficonv train --data builtin --out runs/demo`` finish in minutes on a 2-core CPU.
BUILTIN_DEFAULTS = {"epochs": 8, "image_size": 64, "batch_size": 32, "lr": 5e-4,
                    "augment": "light"}


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):  # inf: an inf rate trains NaN, not an error
        raise ValueError("must be positive and finite")
    return value


def _non_negative_float(text):
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError("must be 0 or more and finite")
    return value


def _seed(text):
    value = _non_negative_int(text)
    if value >= 2**63:  # torch.manual_seed takes a signed 64-bit integer
        raise ValueError("must be below 2**63")
    return value


def _fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError("must be in [0, 1)")
    return value


def _workers(text):
    return None if str(text) == "auto" else _non_negative_int(text)


def _optional_size(text):
    if str(text).lower() in ("none", "native"):
        return None
    value = int(text)
    if value < MIN_INPUT_SIZE:  # the network halves its input 5 times
        raise ValueError(f"must be at least {MIN_INPUT_SIZE} (the network's smallest input)")
    if value > MAX_IMAGE_SIZE:  # PIL and memory fail far past this with a traceback
        raise ValueError(f"must be at most {MAX_IMAGE_SIZE}")
    return value


MAX_IMAGE_SIZE = 8192


@dataclass(frozen=True)
class Option:
    name: str
    parse: object          # str -> value; raises ValueError
    default: object
    help: str
    commands: tuple = ("train",)
    choices: tuple = None
    flag: bool = False     # --name / --no-name
    metavar: str = None


T, E, P = "train", "eval", "predict"
OPTIONS = [
    Option("data", str, None, "the images (train: training data; eval: the test set): a list "
           "file ('path label' lines), a folder with real/ and fake/, a FaceForensics++-style "
           "tree, or 'builtin'", (T, E), metavar="DATA"),
    Option("val_data", str, None, "validation data (same forms as --data); default: a seeded "
           "--val-fraction of --data is held out (whole identities for a FaceForensics++ tree)",
           metavar="DATA"),
    Option("out", str, None, "output folder (train, eval) or CSV file (predict; - for "
           "standard output, with the log on standard error)", (T, E, P),
           metavar="PATH"),
    Option("checkpoint", str, None, "our checkpoint (last.pt/best.pt or a run folder) or a "
           "published best.pkl", (E, P), metavar="CKPT"),
    Option("arch", str, None, "network (default sfi_resnet26; eval/predict: the checkpoint's)",
           (T, E, P), choices=("sfi_resnet26", "sfi_resnet50", "sfi_resnet101",
                               "sfi_resnet152")),
    Option("epochs", _positive_int, 20, "training epochs"),
    Option("batch_size", _positive_int, 64, "images per optimizer step, over all processes "
           "(train); images per forward pass (eval, predict)", (T, E, P), metavar="B"),
    Option("accum_steps", _positive_int, 1, "split each batch into this many accumulated "
           "micro-batches (same optimizer step, less memory)", metavar="K"),
    Option("image_size", _optional_size, 256, "train: side of the square training images. "
           "eval/predict: resize to this side (default: native, the published test transform; "
           f"images smaller than {MIN_INPUT_SIZE} px are skipped and counted)", (T, E, P),
           metavar="S"),
    Option("lr", _positive_float, 1e-4, "Adam learning rate (betas 0.9/0.999)"),
    Option("weight_decay", _non_negative_float, 0.0, "Adam weight decay"),
    Option("lr_schedule", str, "cosine", "cosine: decay to 0 over the run (default). "
           "published: halve every epoch (StepLR step 1, gamma 0.5), which leaves almost no "
           "learning rate after a few epochs. constant", choices=SCHEDULES),
    Option("device", str, "auto", "cpu, cuda or auto (cuda if available)", (T, E, P)),
    Option("cpu_malloc", str, "cache", "CPU runs: how large tensors are kept from being "
           "mapped and page-faulted in again every step. cache: the compiled extension's cache "
           "of freed large blocks, on for this run only (training: about 15%% faster than "
           "glibc's defaults with less peak memory than reuse; eval/predict: as fast as reuse, "
           "less memory with images of many sizes; falls back to reuse where it cannot run). "
           "reuse: glibc's heap setting (the process keeps what it frees, see "
           "sficonv_ext/cpu_allocator.py). default: glibc's own behaviour, the least memory",
           (T, E, P), choices=CPU_MALLOC_CHOICES),
    Option("amp", str, "none", "mixed precision: bf16, fp16 (training: with a grad scaler) or "
           "none",
           (T, E, P), choices=("bf16", "fp16", "none")),
    Option("channels_last", bool, False, "also hand the model its input batches (and keep its "
           "weights) in channels_last; the sfi_resnet models compute in channels_last either "
           "way, converting each batch as it enters", (T, E, P), flag=True),
    Option("compile", bool, False, "torch.compile the model", (T, E, P), flag=True),
    Option("fuse", bool, False, "score with sficonv_ext.models.fuse_for_inference: BatchNorm "
           "folded into the convolutions (on a float32 CPU run without --amp or --compile, "
           "also the residual add as a oneDNN post-op, ReLU in place after it); faster, scores "
           "equal up to float32 rounding", (E, P), flag=True),
    Option("resume", str, None, "resume from a run folder (its last.pt) or a checkpoint file",
           metavar="DIR|CKPT"),
    Option("overwrite", bool, False, "reuse an output folder that holds another run",
           flag=True),
    Option("seed", _seed, 7, "seed for initialisation, data order, augmentation, "
           "hold-out"),
    Option("deterministic", bool, False, "deterministic algorithms only (bit-exact reruns and "
           "resumes; can be slower)", flag=True),
    Option("workers", _workers, None, "data-loading processes per process of this command "
           "(default: auto; 0 loads in the main process)", (T, E, P), metavar="W"),
    Option("augment", str, "published", "published: flip, rotation +-10 degrees, random "
           "perspective (as the paper); these resample every real image and can erase the very "
           "high-frequency traces a detector needs. light: flips and crops only. none",
           choices=AUGMENTS),
    Option("val_fraction", _fraction, 0.1, "share of --data held out when --val-data is not "
           "given"),
    Option("best_metric", str, "acc", "validation metric that picks best.pt (acc as published)",
           choices=BEST_METRICS),
    Option("save_every_steps", _non_negative_int, 0, "also save last.pt every N optimizer "
           "steps (0: off)", metavar="N"),
    Option("save_every_minutes", _non_negative_float, 10.0, "also save last.pt every M minutes "
           "within an epoch (default 10; 0: off)", metavar="M"),
    Option("strict", bool, False, "stop at the first missing or unreadable image instead of "
           "skipping it", (T, E, P), flag=True),
    Option("export_published", str, "none", "at the end, also write best.pt's weights in a "
           "published layout: wrapper (best.pkl keys) or bare",
           choices=("wrapper", "bare", "none")),
    Option("mcs_learnable", bool, False, "learn the constrained MCSConv filter (published: "
           "frozen)", flag=True),
    Option("mcs_init", str, "published", "MCSConv initialisation", choices=("published",
                                                                            "stable")),
    Option("builtin_images", _positive_int, 2000, "size of the built-in data set", (T, E),
           metavar="N"),
    Option("cache_dir", str, None, "where the built-in data set is cached (default "
           "$SFICONV_CACHE_DIR, else $XDG_CACHE_HOME/sficonv_ext, else "
           "~/.cache/sficonv_ext)", (T, E), metavar="DIR"),
    Option("progress", bool, None, "progress bars (default: when standard error is a "
           "terminal, so captured logs hold no bar redraws)", (T, E, P), flag=True),
]
BY_NAME = {o.name: o for o in OPTIONS}

# Changing these on resume would silently make a different run (best_metric: best.pt and the
# recorded best would compare one metric's value with another's).
FIXED_ON_RESUME = ("data", "val_data", "arch", "batch_size", "accum_steps", "image_size", "lr",
                   "weight_decay", "lr_schedule", "seed", "augment", "val_fraction",
                   "mcs_learnable", "mcs_init", "builtin_images", "amp", "best_metric")
# Options naming files or folders: a run records them as absolute paths, so that it resumes
# from any working directory, and compares them as such.
PATH_OPTIONS = ("data", "val_data", "cache_dir")
# Paths where "~" means the home folder too, from a YAML file or a quoted argument ("-" for
# predict's standard output is not a path).
TILDE_OPTIONS = PATH_OPTIONS + ("out", "checkpoint", "resume")


def absolute_path_option(name, value):
    """``value`` of option ``name`` with a relative path made absolute (``builtin`` and unset
    values as they are)."""
    if name not in PATH_OPTIONS or value in (None, "builtin", ""):
        return value  # "" stays empty, for the "needs --data" error (not the current folder)
    return os.path.abspath(os.path.expanduser(value))


def options_for(command):
    return [o for o in OPTIONS if command in o.commands]


def default_values(command):
    values = {o.name: o.default for o in options_for(command)}
    if command == "train":
        values["arch"] = "sfi_resnet26"
    else:
        values["image_size"] = None  # eval/predict: native size unless asked
    return values


def convert(option, value, where):
    """Validate a value from YAML (or an earlier checkpoint) with the option's parser, as the
    command line would parse its text (so 1.9 is not silently an integer 1)."""
    if isinstance(value, (list, tuple, dict)):
        raise UserError(f"{where}: {option.name} takes one value, not a "
                        f"{'mapping' if isinstance(value, dict) else 'list'}: {value!r}")
    if value is None:
        # null means "not set" only where that is the option's default, or a native size.
        if option.default is None or option.parse is _optional_size:
            return None
        raise UserError(f"{where}: {option.name} cannot be null (default: {option.default!r})")
    if option.flag:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {option.name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool):
        raise UserError(f"{where}: {option.name} takes a value, not {str(value).lower()}")
    try:
        parsed = option.parse(str(value) if isinstance(value, (int, float)) else value) \
            if option.parse is not str else str(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: bad value {value!r} for {option.name}: {exc}") from None
    if option.choices and parsed not in option.choices:
        raise UserError(f"{where}: {option.name} must be one of {', '.join(option.choices)}, "
                        f"got {parsed!r}")
    return parsed


def read_yaml(path, command):
    try:
        import yaml
    except ImportError as exc:
        raise UserError("--config needs PyYAML (pip install pyyaml)") from exc
    try:
        with open(path, encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path} is not UTF-8 text: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {exc}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    known = {o.name: o for o in options_for(command)}
    values = {}
    defaults, seen = default_values(command), set()
    for key, value in content.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UserError(f"config file {path}: unknown option {key!r} for '{command}' "
                            f"(known: {', '.join(sorted(known))})")
        if name in seen:  # image_size and image-size: which one wins would be a guess
            raise UserError(f"config file {path}: {name} is given twice (as {key!r} and "
                            f"another spelling)")
        seen.add(name)
        if value is None and defaults.get(name) is not None and known[name].default is None:
            continue  # null for an option this command defaults (train's arch): the default
        values[name] = convert(known[name], value, f"config file {path}")
    return values


def resolve(command, explicit, yaml_values=None):
    """Merge defaults, the built-in data set's defaults, YAML and command-line values."""
    values = default_values(command)
    given = dict(yaml_values or {})
    given.update(explicit)
    data = given.get("data", values.get("data"))
    if command == "train" and data == "builtin":
        values.update(BUILTIN_DEFAULTS)
    values.update(given)
    for name in TILDE_OPTIONS:  # "~" from a YAML file or a quoted "--out=~/x", every command
        if isinstance(values.get(name), str) and values[name] not in ("builtin", "-"):
            values[name] = os.path.expanduser(values[name])
    if "progress" in values and values["progress"] is None:
        values["progress"] = sys.stderr.isatty()
    return values
