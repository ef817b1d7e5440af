"""Write a checkpoint in a published layout (best.pkl).

``python training/export.py ARGS`` is ``sficonv export ARGS`` (``--help`` lists the options).
"""
import sys

from _command import run

if __name__ == "__main__":
    sys.exit(run("export"))
