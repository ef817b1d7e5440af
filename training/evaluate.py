"""Metrics of a checkpoint on a data set (AUC, accuracy, EER, ROC).

``python training/evaluate.py ARGS`` is ``sficonv eval ARGS`` (``--help`` lists the options).
"""
import sys

from _command import run

if __name__ == "__main__":
    sys.exit(run("eval"))
