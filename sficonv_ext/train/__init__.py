"""Training harness behind the ``sficonv`` command: training, evaluation and prediction for
SFIConv detectors, on one CPU, one GPU or many (torchrun), with a built-in offline data set.

Entry points: :func:`sficonv_ext.train.cli.main` (the command), ``python -m sficonv_ext.train``.
Metric functions live in :mod:`sficonv_ext.train.metrics`.
"""
