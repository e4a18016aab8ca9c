"""``python -m dera_fast <command>``: see :mod:`dera_fast.cli`."""
from dera_fast.cli import entry

if __name__ == "__main__":
    entry()
