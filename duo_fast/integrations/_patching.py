"""Replacing attributes of another codebase's classes and modules, and undoing it,
for the integrations (duo.py; a DiffusionGemma integration reuses it).

A :class:`Patch` records, per replaced attribute, (owner, name, original,
replacement). ``undo()`` restores an attribute only where it still holds our
replacement (by identity): one that the user reassigned (or deleted) since is the
user's and is left alone, with a warning naming it. A replacement is marked, so
an attribute that an active Patch holds is never wrapped a second time.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

MARK = "__duo_fast_patch__"  # set on every replacement
_ABSENT = object()


@dataclass
class Replaced:
    owner: Any
    name: str
    original: Any
    had_own: bool  # the name was in owner.__dict__ (else it was inherited: undo deletes it)
    replacement: Any = None

    @property
    def label(self) -> str:
        owner = getattr(self.owner, "__qualname__", None) or getattr(self.owner, "__name__", "?")
        module = self.owner.__name__ if isinstance(self.owner, ModuleType) else self.owner.__module__
        return f"{module}.{self.name}" if isinstance(self.owner, ModuleType) else f"{module}.{owner}.{self.name}"


def check_parts(parts, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``parts`` of an integration's patch(): None (all of ``allowed``), one name or an
    iterable of names; a non-empty subset of ``allowed``, returned in its order."""
    if parts is None:
        return allowed
    parts = [parts] if isinstance(parts, str) else list(parts)
    if not parts or any(p not in allowed for p in parts):
        raise ValueError(f"duo_fast: parts must be a non-empty subset of {allowed}, got {parts!r}")
    return tuple(p for p in allowed if p in parts)


def is_patched(owner, name: str) -> bool:
    """Whether ``owner.name`` (its own attribute) is a replacement of some Patch."""
    return bool(getattr(vars(owner).get(name), MARK, False))


class Patch:
    """What was replaced: ``replace_all`` patches, ``undo()`` restores (by identity,
    only what is still ours), and a context manager (``with ...: ``) undoes on exit.
    ``what`` names the patched code in messages."""

    def __init__(self, what: str = "", tag: str = "duo_fast"):
        self.what, self.tag = what, tag
        self._replaced: list[Replaced] = []
        self.active = True

    @property
    def replaced(self) -> list[str]:
        """Qualified names of the replaced objects."""
        return [r.label for r in self._replaced]

    def replace_all(self, targets: dict) -> "Patch":
        """``targets``: {(owner, name): replacement}. Checks them all before changing
        anything: an attribute that a Patch already holds raises (never wraps twice)."""
        already = [Replaced(o, n, None, True).label for (o, n) in targets if is_patched(o, n)]
        if already:
            raise RuntimeError(
                f"duo_fast: already patched: {', '.join(already)}; call undo() on the earlier Patch first"
            )
        for (owner, name), new in targets.items():
            had_own = name in vars(owner)
            original = vars(owner)[name] if had_own else None
            setattr(new, MARK, True)
            new.__wrapped_original__ = original
            if had_own and callable(original):
                new.__doc__ = (original.__doc__ or "") + f"\n\n[patched by {self.tag}]"
                new.__name__ = getattr(original, "__name__", name)
            setattr(owner, name, new)
            self._replaced.append(Replaced(owner, name, original, had_own, new))
        return self

    def undo(self) -> None:
        """Restore every original that is still replaced by ours; warn about (and keep)
        the attributes the user reassigned or deleted since. Idempotent."""
        if not self.active:
            return
        kept = []
        for r in reversed(self._replaced):
            if vars(r.owner).get(r.name, _ABSENT) is not r.replacement:
                kept.append(r.label)
            elif r.had_own:
                setattr(r.owner, r.name, r.original)
            else:
                delattr(r.owner, r.name)
        self.active = False
        log.info("duo_fast: restored %d originals", len(self._replaced) - len(kept))
        if kept:
            warnings.warn(
                f"duo_fast: undo() left {len(kept)} attribute(s) alone: expected duo_fast's replacement there, got "
                f"an object assigned since (or none): {', '.join(reversed(kept))}. They keep what you set; "
                "the originals of these were not restored",
                RuntimeWarning,
                stacklevel=2,
            )

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<duo_fast Patch {state}: {self.what} ({len(self._replaced)} objects)>"
