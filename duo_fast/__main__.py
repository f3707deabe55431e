"""``python -m duo_fast <command>``: see duo_fast.cli."""

from .cli import main

main()
