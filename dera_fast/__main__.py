"""``python -m dera_fast <command>``: see :mod:`dera_fast.cli`."""
import sys

from dera_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
