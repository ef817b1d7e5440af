"""Errors the command line reports as a message and an exit status, not as a traceback."""


class UserError(Exception):
    """Bad input or a bad option: the message says what is wrong and where."""


class DataError(UserError):
    """A data set that cannot be used: malformed list file, bad label, nothing to train on."""


class NonFiniteError(Exception):
    """The model produced NaN or infinite numbers (exit status 3)."""


class NonFiniteLossError(NonFiniteError):
    """Training produced a NaN or infinite loss; the message names the step."""


class NonFiniteScoreError(NonFiniteError):
    """Scoring produced NaN or infinite logits; the message names the images."""
