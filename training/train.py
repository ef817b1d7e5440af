"""Train a detector (best.pt, last.pt, metrics.json, history.csv, roc.png in --out).

``python training/train.py ARGS`` is ``sficonv train ARGS`` (``--help`` lists the options).
"""
import sys

from _command import run

if __name__ == "__main__":
    sys.exit(run("train"))
