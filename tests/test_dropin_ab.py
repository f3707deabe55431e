"""duo_fast/bench/dropin_ab.py (the drop-in's fused output layer against its
logits path, interleaved in one process): its arguments, and one round of two
steps at the tiny size on the Duo code's own model, the report written where
asked and nothing overwritten."""

from __future__ import annotations

import json

import pytest

import duo_codebase
from duo_fast.bench import dropin_ab as AB

ref = duo_codebase.ref  # the shared fixture (skips, with the reason, without the Duo code)


@pytest.mark.parametrize("argv,match", [
    (["--rounds", "0"], "--rounds: expected a positive integer, got '0'"),
    (["--threads", "two"], "--threads: expected a positive integer, got 'two'"),
    (["--steps", "elbo,nope"], "--steps: expected a comma-separated subset of elbo, duo-simple"),
    (["--device", "tpu"], "--device: expected cpu or cuda, got 'tpu'"),
])
def test_bad_arguments_name_the_flag(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        AB.main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_out_folder_is_never_overwritten(tmp_path, capsys):
    with pytest.raises(SystemExit):
        AB.main(["--out", str(tmp_path)])
    assert "exists; name a new folder" in capsys.readouterr().err


def test_one_round_at_the_tiny_size(ref, tmp_path, capsys):
    out = tmp_path / "ab"
    assert AB.main(["--config", "tiny", "--rounds", "1", "--steps", "elbo,sample-step", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in data["rows"]] == ["elbo", "sample-step"]
    for r in data["rows"]:
        assert len(r["times_ms"]["fused"]) == len(r["times_ms"]["logits"]) == 1
        assert r["fused_median_ms"] > 0 and r["logits_median_ms"] > 0
        assert r["ratio"] == pytest.approx(r["fused_median_ms"] / r["logits_median_ms"])
    assert "| elbo |" in (out / "report.md").read_text() and "| sample-step |" in capsys.readouterr().out
