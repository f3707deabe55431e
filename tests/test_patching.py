"""duo_fast.integrations._patching.Patch, the replace-and-undo of the integrations
(issue 24): undo() restores by identity only what is still duo_fast's replacement,
warns about (and keeps) what the user reassigned or deleted since; an attribute
held by a Patch is never wrapped twice; a context manager."""

from __future__ import annotations

import types
import warnings

import pytest

from duo_fast.integrations._patching import Patch, is_patched


def _code():
    class Base:
        def f(self):
            "Base.f"
            return "f"

        def g(self):
            return "g"

    class Child(Base):
        pass

    mod = types.ModuleType("their_module")
    mod.h = lambda: "h"
    return Base, Child, mod


def _new(tag):
    def fn(*args):
        return tag

    return fn


def test_undo_restores_the_originals_by_identity():
    Base, Child, mod = _code()
    before = dict(vars(Base)), dict(vars(Child)), dict(vars(mod))
    with Patch("their code", tag="tests") as p:
        p.replace_all({(Base, "f"): _new("F"), (Child, "g"): _new("G"), (mod, "h"): _new("H")})
        assert Base().f() == "F" and Child().g() == "G" and Base().g() == "g" and mod.h() == "H"
        assert is_patched(Base, "f") and Base.f.__wrapped_original__ is before[0]["f"]
        assert "Base.f" in Base.f.__doc__ and "[patched by tests]" in Base.f.__doc__
        assert sorted(p.replaced) == sorted([f"{__name__}._code.<locals>.Base.f",
                                             f"{__name__}._code.<locals>.Child.g", "their_module.h"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.undo()  # idempotent, nothing to warn about
    assert vars(Base)["f"] is before[0]["f"] and vars(mod)["h"] is before[2]["h"]
    assert "g" not in vars(Child)  # it was inherited: undo deletes the replacement
    assert not p.active and "undone" in repr(p)


def test_undo_leaves_what_the_user_reassigned_and_warns():
    """undo() used to overwrite (or delete) the user's objects."""
    Base, Child, mod = _code()
    original_g = vars(Base)["g"]
    p = Patch("their code").replace_all({(Base, "f"): _new("F"), (Base, "g"): _new("G"), (Child, "f"): _new("CF"),
                                         (mod, "h"): _new("H")})
    mine = _new("mine")
    Base.f = mine  # reassigned by the user
    del Child.f  # deleted by the user
    with pytest.warns(RuntimeWarning, match=r"undo\(\) left 2 attribute\(s\) alone: expected duo_fast's replacement "
                                            r"there, got an object assigned since \(or none\): .*Base\.f, .*Child\.f"):
        p.undo()
    assert vars(Base)["f"] is mine and "f" not in vars(Child)  # the user's state, untouched
    assert vars(Base)["g"] is original_g and mod.h() == "h"  # the rest restored


def test_a_patched_attribute_is_never_wrapped_twice():
    Base, _, mod = _code()
    p = Patch("their code").replace_all({(Base, "f"): _new("F")})
    with pytest.raises(RuntimeError, match=r"already patched: .*Base\.f; call undo\(\) on the earlier Patch first"):
        Patch("again").replace_all({(mod, "h"): _new("H2"), (Base, "f"): _new("F2")})
    assert mod.h() == "h" and Base().f() == "F"  # nothing changed by the refused call
    p.undo()
    with Patch("again").replace_all({(Base, "f"): _new("F2")}):
        assert Base().f() == "F2"
    assert Base().f() == "f"
