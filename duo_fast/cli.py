"""The ``duo-fast`` command (also ``python -m duo_fast``).

    duo-fast demo [--quick] [...]        the main job: train, distill, sample, measure (duo_fast.demo)
    duo-fast duo [--parts ...] main.py   run the Duo codebase's main.py patched (duo_fast.integrations.duo)
    duo-fast bench [--tiny|--full] [...] duo_fast vs the Duo code: table, CSV, plots (duo_fast.bench)
"""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("duo_fast.demo", "train a small Duo model, distill it (DCD), sample it in 1-64 steps, measure exactly"),
    "duo": ("duo_fast.integrations.duo", "run the Duo codebase's unmodified main.py with duo_fast patched in"),
    "bench": ("duo_fast.bench.cli", "benchmark duo_fast against the Duo code (eager and torch.compile): "
                                    "markdown table, CSV, plots"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: duo-fast <command> [options]", "", "commands:"]
        lines += [f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items()]
        lines += ["", "duo-fast <command> --help for its options"]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nduo-fast: unknown command {argv[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        return
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    rc = module.main(argv[1:])
    if isinstance(rc, int) and rc != 0:
        raise SystemExit(rc)


if __name__ == "__main__":
    main()
