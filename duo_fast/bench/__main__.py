"""``python -m duo_fast.bench``: ``duo-fast bench`` (also the measuring subprocesses' entry)."""

import sys

from .cli import main

sys.exit(main())
