"""``python -m qins quantize SRC DST ...``: the :mod:`qins.cli` command line."""
import sys

from .cli import main

sys.exit(main())
