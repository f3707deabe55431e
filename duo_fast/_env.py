"""The ``DUO_FAST_*`` environment variables that duo_fast reads at run time, with
their accepted values. ``check()`` runs at import (``duo_fast/__init__.py``):
a malformed value raises a ValueError naming the variable and the accepted
values. The C++ side reads some of them again at every call (tests and users
may change them): ``csrc/checks.h`` ``env_choice`` and ``csrc/cpu/grad_cache.cpp``
apply the same rules there, so a value set after import raises at its first use
with the same kind of message.

Build-time variables (``DUO_FAST_CUDA``, ``DUO_FAST_CUDA_ARCHS``, ...) are
checked by ``setup.py`` / ``CMakeLists.txt``; ``DUO_FAST_FUZZ_PROFILE`` by
``tests/conftest.py``.
"""

from __future__ import annotations

import os
import re
from typing import Callable

_MAX_MIB = 1 << 40  # csrc/cpu/grad_cache.cpp read_limit


def _choice(*values: str) -> Callable[[str], bool]:
    return lambda v: v in values


VARIABLES: dict[str, tuple[str, Callable[[str], bool]]] = {
    # name: (accepted values, in words; the test of a set value). Empty counts as unset
    # for the variables with a set of choices (as env_choice).
    "DUO_FAST_GRAD_CACHE_MB": (
        f"a whole number of MiB in [0, {_MAX_MIB}) (default 4096; 0 turns the gradient cache off)",
        lambda v: re.fullmatch(r"[0-9]+", v) is not None and int(v) < _MAX_MIB,
    ),
    "DUO_FAST_TOPK_BAG": ("sorted, token or auto (or unset: auto)", _choice("", "sorted", "token", "auto")),
    "DUO_FAST_CUDA_SYNC_CHECKS": ("0 or 1 (or unset: 0)", _choice("", "0", "1")),
    "DUO_FAST_EMBED_PORTABLE": ("0 or 1 (or unset: 0)", _choice("", "0", "1")),
    "DUO_FAST_BENCH_REFERENCE": ("auto, duo or eager (or unset: auto)",
                                 lambda v: v.lower() in ("", "auto", "duo", "eager")),
}


def check(*names: str) -> None:
    """Raise ValueError for the first of ``names`` (default: every variable above)
    that is set to a value it does not accept."""
    for name in names or VARIABLES:
        accepted, ok = VARIABLES[name]
        value = os.environ.get(name)
        if value is not None and not ok(value):
            raise ValueError(f"duo_fast: the environment variable {name} must be {accepted}, got {value!r}")


def get(name: str, default: str) -> str:
    """The checked value of ``name`` (``default`` when unset or empty)."""
    check(name)
    return os.environ.get(name) or default
