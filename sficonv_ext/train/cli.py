"""The ``sficonv`` command: ``train``, ``eval``, ``predict`` and ``export``.

Every option may also come from a YAML file (``--config``); the command line overrides it.
Exit status: 0 done, 2 bad input or options, 3 a non-finite loss or score, 130 interrupted.
"""
import argparse
import os
import re
import sys

from .architectures import ARCHS
from .config import default_values, options_for, read_yaml, resolve
from .errors import NonFiniteError, UserError

DESCRIPTION = """\
Train, evaluate and apply SFIConv deepfake detectors.

  sficonv train --data builtin --out runs/demo
  sficonv eval --checkpoint runs/demo/best.pt --data builtin --out runs/demo/eval
  sficonv predict --checkpoint runs/demo/best.pt photos/ --out scores.csv
  sficonv export --checkpoint runs/demo/best.pt --out best.pkl

Run under torchrun for several GPUs or nodes (DistributedDataParallel; NCCL on GPU, gloo on
CPU): torchrun --nproc-per-node 2 -m sficonv_ext.train train ...

Exit status: 0 done; 2 bad input or options (one "error:" line); 3 a non-finite loss or score;
130 interrupted (Ctrl-C); 1 an internal error (a traceback: please report it).
"""

TRAIN_EPILOG = """\
Defaults follow the published recipe (Adam lr 1e-4, betas 0.9/0.999, batch 64, 20 epochs, 256 px,
seed 7, cross-entropy, best.pt by validation accuracy) except the learning-rate schedule: the
published StepLR halves the rate every epoch, leaving ~2e-10 by epoch 20, so the default is a
cosine decay; --lr-schedule published restores it. --data builtin uses its own defaults (epochs 8,
image size 64, batch 32, lr 5e-4, augment light) so it finishes in minutes on a CPU; explicit
options still win.

--augment: 'published' (flip, rotation, perspective) resamples every real image, which can erase
the very high-frequency traces a detector needs; 'light' keeps flips and crops only.

A run folder holds last.pt (full resume state, also saved mid-epoch), metrics.json,
history.csv, train.log and config.yaml, and with a validation set best.pt and roc.png.
Resume with --resume DIR.
"""


def _add_option(parser, option, default=None):
    flag = "--" + option.name.replace("_", "-")
    # The default in the help (argparse cannot show it: SUPPRESS keeps unset options out of
    # the parsed values, so that YAML and the built-in data set's defaults can apply).
    shown = option.help
    if default is not None and "default" not in option.help:
        shown = f"{option.help} (default: {default})"
    if option.flag:
        parser.add_argument(flag, dest=option.name, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=shown)
        return
    kwargs = dict(dest=option.name, default=argparse.SUPPRESS, help=shown,
                  metavar=option.metavar)
    if option.choices:
        kwargs["choices"] = option.choices
    if option.parse is not str:
        kwargs["type"] = _argparse_type(option)
    parser.add_argument(flag, **kwargs)


def _argparse_type(option):
    def parse(text):
        try:
            return option.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    parse.__name__ = option.name
    return parse


def build_parser():
    parser = argparse.ArgumentParser(prog="sficonv", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {"train": "train a detector", "eval": "metrics of a checkpoint on a data set",
             "predict": "score images (probability of fake) into a CSV"}
    for name in ("train", "eval", "predict"):
        sub = commands.add_parser(name, help=helps[name], description=helps[name],
                                  epilog=TRAIN_EPILOG if name == "train" else None,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "predict":
            sub.add_argument("inputs", nargs="+", metavar="INPUT",
                             help="images or folders (searched recursively)")
        defaults = default_values(name)
        for option in options_for(name):
            _add_option(sub, option, defaults.get(option.name))
        sub.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE.yaml",
                         help="YAML file of options (the command line overrides it)")
    export = commands.add_parser(
        "export", help="write a checkpoint in a published layout",
        description="Write a checkpoint (ours, or a published file in either layout) as a "
                    "state_dict the published code loads with strict=True.")
    export.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="our checkpoint (last.pt/best.pt or a run folder) or a published "
                             "best.pkl / bare-network file")
    export.add_argument("--out", required=True, metavar="FILE.pkl", help="the file to write")
    export.add_argument("--layout", choices=("wrapper", "bare"), default="wrapper",
                        help="wrapper: the published training script's best.pkl keys; bare: "
                             "the network alone")
    export.add_argument("--arch", choices=tuple(ARCHS), default=None,
                        help="the network of a published file (default: sfi_resnet26; our "
                             "checkpoints record their own)")
    parser.commands = commands.choices  # name -> its parser, for errors in its own words
    return parser


def _export(args):
    from .checkpoint import export_published
    from .inference import load_model

    if args.out == "-" or os.path.isdir(args.out):
        # A binary state_dict has no standard-output form ("-" would be a file named "-").
        raise UserError(f"export --out must be a file name such as best.pkl, got {args.out!r}")

    model, path = load_model(args.checkpoint, args.arch, __import__("torch").device("cpu"))
    export_published(model, args.out, args.layout)
    print(f"wrote {args.out} ({args.layout} layout of {path})")


def _os_error_line(exc):
    """A file-system error (reading or writing) in the user's terms: the path they gave, not a
    temporary file written beside it, and what is in the way."""
    if not isinstance(exc, OSError) or exc.filename is None:
        return str(exc)
    # Outputs are written to PATH.tmp-<pid> or .NAME.tmp-<pid> beside them, then renamed.
    folder, name = os.path.split(os.fspath(exc.filename))
    temporary = re.fullmatch(r"\.?(.+?)\.tmp-\d+", name)
    path = os.path.join(folder, temporary.group(1)) if temporary else os.fspath(exc.filename)
    if isinstance(exc, FileExistsError):
        return f"cannot make the folder {path}: a file of that name is in the way"
    if isinstance(exc, NotADirectoryError):
        return f"{path}: a part of that path is a file, not a folder"
    return f"{path}: {exc.strerror or exc}"


def _drop_builtin_val_fraction(command, args, yaml_values):
    # The built-in set's split is fixed: a --val-fraction given for it would be silently
    # ignored, and recorded in config.yaml as the run's value. (On --resume the data set is
    # the run's, not known here: a changed value is refused there as a changed recipe.)
    data = args.get("data", yaml_values.get("data"))
    if command != "train" or data != "builtin":
        return
    for given in (args, yaml_values):
        if given.pop("val_fraction", None) is not None:
            print(f"sficonv {command}: warning: --val-fraction does not apply to --data builtin "
                  f"(its validation split is fixed); ignored", file=sys.stderr)


def _resume_hint(command, out, resume):
    if command != "train":
        return ""
    from .checkpoint import LAST
    if out and os.path.isfile(os.path.join(out, LAST)):
        return f"; resume from its last checkpoint with --resume {out}"
    if resume:  # nothing written in OUT yet: the checkpoint resumed from is still there
        return f"; resume again with --resume {resume}"
    return "; no checkpoint was written yet (start the run again)"


def main(argv=None):
    """The ``sficonv`` console script; returns the exit status."""
    parser = build_parser()
    known, unknown = parser.parse_known_args(argv)
    args = vars(known)
    command = args.pop("command")
    if unknown:  # with the command's usage and name, not the top level's "sficonv: error"
        parser.commands[command].error(f"unrecognized arguments: {' '.join(unknown)}")
    out = resume = None  # the output folder and --resume, once known (for the Ctrl-C line)
    try:
        if command == "export":
            _export(argparse.Namespace(**args))
            return 0
        inputs = args.pop("inputs", None)
        config_file = args.pop("config", None)
        yaml_values = ({} if config_file is None
                       else read_yaml(os.path.expanduser(config_file), command))
        _drop_builtin_val_fraction(command, args, yaml_values)
        cfg = resolve(command, args, yaml_values)
        out, resume = cfg.get("out"), cfg.get("resume")
        explicit = dict(yaml_values)
        explicit.update(args)
        if command == "train":
            from .trainer import train
            train(cfg, explicit)
        elif command == "eval":
            from .evaluate import evaluate
            evaluate(cfg, explicit)
        else:
            from .predict import predict
            predict(cfg, inputs)
    except NonFiniteError as exc:
        print(f"sficonv {command}: error: {exc}", file=sys.stderr)
        return 3
    except UserError as exc:
        print(f"sficonv {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (OSError, UnicodeError) as exc:  # an output path that cannot be made or written
        print(f"sficonv {command}: error: {_os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # One line, not a traceback: what was written stays (a training run resumes from its
        # last checkpoint with --resume OUT).
        print(f"sficonv {command}: interrupted" + _resume_hint(command, out, resume), file=sys.stderr)
        return 130
    return 0


def _one_line(exc):
    """The message of ``exc``; for an error raised in a DataLoader worker (which PyTorch
    re-raises with the worker's traceback in the message), the original message alone."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name = type(exc).__name__
        marker = f"{name}: "
        return last.split(marker, 1)[1] if marker in last else last
    return text
