"""Score images (probability of fake) into a CSV.

``python training/predict.py ARGS`` is ``sficonv predict ARGS`` (``--help`` lists the options).
"""
import sys

from _command import run

if __name__ == "__main__":
    sys.exit(run("predict"))
