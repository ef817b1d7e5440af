"""Runs one ``sficonv`` subcommand for the scripts in this folder.

The harness itself is the package's ``sficonv_ext.train`` (installed with the package, so the
``sficonv`` console script and ``torchrun -m sficonv_ext.train`` work anywhere); these scripts
are the same commands, runnable from a checkout by path.
"""
import os
import sys


def run(command):
    """``python training/<script>.py ARGS`` runs ``sficonv <command> ARGS``; returns its exit
    status."""
    try:
        from sficonv_ext.train.cli import main
    except ImportError as exc:
        script = os.path.join("training", os.path.basename(sys.argv[0]))
        print(f"{script}: error: the sficonv_ext package is not importable ({exc}); "
              "install it first: make install, or pip install -e . --no-build-isolation",
              file=sys.stderr)
        return 2
    return main([command, *sys.argv[1:]])
