"""``python -m sficonv_ext.train ...`` is the ``sficonv`` command (and what torchrun runs)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
