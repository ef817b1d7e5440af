"""Argument checks shared by the layers and ops."""
import operator


def as_int(value, what):
    """``value`` as an int: Python and NumPy integers pass, bool and float do not (a float size
    would fail later inside torch with an error that does not name the argument)."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{what} must be an int, got {value!r}")
