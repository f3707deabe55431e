"""The command lines (issue 24, classes 2 and 3): no lost output (`duo-fast bench
--out` checked before measuring and written after every case; `duo-fast demo`
refuses an --out holding a checkpoint without --resume or --force; devices that
cannot be timed are refused), every size / count / step / thread argument checked
when parsed, and a bad checkpoint named in one message. Nothing here trains or
measures: the work is replaced by stubs that fail the test if reached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from duo_fast import demo
from duo_fast.bench import cli, common


def _parse_error(parse, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# duo-fast bench
# ---------------------------------------------------------------------------------------


@pytest.fixture
def no_measuring(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("measured before checking where the results go")

    monkeypatch.setattr(common, "copy_bandwidth", fail)
    monkeypatch.setattr(common, "run_case", fail)


def test_bench_out_that_cannot_be_a_folder_fails_before_measuring(tmp_path, no_measuring):
    f = tmp_path / "a-file"
    f.write_text("mine")
    with pytest.raises(SystemExit, match=f"--out '{f}' exists and is not a folder: expected a folder to write into"):
        cli.main(["--tiny", "--ops", "sample_zt", "--out", str(f)])
    with pytest.raises(SystemExit, match=r"--out '.*a-file/sub': expected a folder duo_fast can create and write "
                                         r"into, got NotADirectoryError"):
        cli.main(["--tiny", "--ops", "sample_zt", "--out", str(f / "sub")])
    with pytest.raises(SystemExit, match="--json .* is a folder: expected a file path"):
        cli.main(["--tiny", "--ops", "sample_zt", "--out", str(tmp_path / "o"), "--json", str(tmp_path)])
    with pytest.raises(SystemExit, match="--out"):
        cli.main(["--merge", str(tmp_path), "--out", str(f)])
    assert f.read_text() == "mine"


def test_bench_writes_every_case_as_it_goes(tmp_path, monkeypatch):
    """A failure after the first case keeps the first case's rows (they were lost:
    the files were written only at the end)."""
    cases, _ = common.discover_cases("tiny", "cpu", ["sample_zt"], [])
    assert len(cases) >= 2
    done = []

    def run_case(case, *args, **kwargs):
        if done:
            raise RuntimeError("the machine went away")
        done.append(case.id)
        return {"id": case.id, "op": case.op, "size": case.size, "duo": {"median_ms": 1.5, "peak_mib": 2.0}}

    monkeypatch.setattr(common, "copy_bandwidth", lambda *a: {"gbps": 10.0})
    monkeypatch.setattr(common, "run_case", run_case)
    out, js = tmp_path / "out", tmp_path / "run.json"
    with pytest.raises(RuntimeError, match="went away"):
        cli.main(["--tiny", "--ops", "sample_zt", "--out", str(out), "--json", str(js), "--no-plots"])
    for payload in (json.loads((out / "results.json").read_text()), json.loads(js.read_text())):
        assert payload["complete"] is False and [r["id"] for r in payload["results"]] == done
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and done[0] in rows[1]  # the header and the one case
    assert "partial: 1 case(s) so far" in (out / "report.md").read_text()
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("device", ["meta", "gpu", "cuda:x", "xla"])
def test_bench_refuses_devices_that_cannot_be_timed(device, capsys, no_measuring):
    err = _parse_error(cli.main, ["--tiny", "--device", device], capsys)
    assert f"argument --device: expected cpu, cuda or cuda:N (a device whose work can be timed), got '{device}'" in err


@pytest.mark.parametrize("argv,want", [
    (["--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
    (["--threads", "two"], "argument --threads: expected an integer >= 1, got 'two'"),
    (["--rounds", "0"], "argument --rounds: expected an integer >= 1, got '0'"),
    (["--rounds", "-3"], "argument --rounds: expected an integer >= 1, got '-3'"),
])
def test_bench_arguments_are_checked_when_parsed(argv, want, capsys):
    assert want in _parse_error(cli.parse_args, argv, capsys)


# ---------------------------------------------------------------------------------------
# duo-fast demo: arguments
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,want", [
    (["--threads", "0"], "--threads: expected an integer >= 1, got '0'"),
    (["--dcd-steps", "0"], "--dcd-steps: expected an integer >= 1, got '0'"),
    (["--steps", "1", "0"], "--steps: expected an integer >= 1, got '0'"),
    (["--n-samples", "0"], "--n-samples: expected an integer >= 1, got '0'"),
    (["--ckpt-every", "0"], "--ckpt-every: expected an integer >= 1, got '0'"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1, got '0'"),
    (["--vocab-size", "1"], "--vocab-size: expected an integer in [2, 16777216], got '1'"),
    (["--length", "1"], "--length: expected an integer >= 2, got '1'"),
    (["--branching", "1"], "--branching: expected an integer >= 2, got '1'"),
    (["--hidden", "0"], "--hidden: expected an integer >= 2, got '0'"),
    (["--n-layers", "0"], "--n-layers: expected an integer >= 1, got '0'"),
    (["--n-heads", "0"], "--n-heads: expected an integer >= 1, got '0'"),
    (["--warmup", "-1"], "--warmup: expected an integer >= 0, got '-1'"),
    (["--curriculum-steps", "-1"], "--curriculum-steps: expected an integer >= 0, got '-1'"),
    (["--dcd-rounds", "-1"], "--dcd-rounds: expected an integer in [0, 62], got '-1'"),
    (["--dcd-t", "0"], "--dcd-t: expected an integer >= 1, got '0'"),
    (["--seed", "-1"], "--seed: expected an integer >= 0, got '-1'"),
    (["--lr", "0"], "--lr: expected a finite number > 0.0, got '0'"),
    (["--lr", "nan"], "--lr: expected a finite number > 0.0, got 'nan'"),
    (["--grad-clip", "-1"], "--grad-clip: expected a finite number > 0.0, got '-1'"),
    (["--chain-eps", "1"], "--chain-eps: expected a finite number in (0.0, 1.0), got '1'"),
    (["--alpha-high", "1.5"], "--alpha-high: expected a finite number in (0.0, 1.0), got '1.5'"),
    (["--tau-log10-start", "inf"], "--tau-log10-start: expected a finite number, got 'inf'"),
    (["--samplers", "euler"], "--samplers: invalid choice: 'euler'"),
])
def test_demo_arguments_are_checked_when_parsed(argv, want, capsys):
    assert "argument " + want in _parse_error(demo.parser().parse_args, argv, capsys)


@pytest.mark.parametrize("argv,want", [
    (["--n-heads", "3"], r"--hidden \(64\) must split into --n-heads \(3\) heads of an even size"),
    (["--vocab-size", "8", "--branching", "9"], r"--branching \(9\) must be <= --vocab-size \(8\)"),
    (["--alpha-low", "0.9", "--alpha-high", "0.5"], r"--alpha-low \(0.9\) must be below --alpha-high \(0.5\)"),
    (["--curriculum-steps", "0", "--elbo-steps", "0"], r"--curriculum-steps \+ --elbo-steps must be >= 1"),
    (["--dcd-rounds", "10", "--dcd-t", "256"], r"--dcd-T \(256\) must be >= 2\^\(--dcd-rounds - 1\) = 512"),
])
def test_demo_field_relations_are_checked_before_any_work(argv, want):
    with pytest.raises(SystemExit, match="duo_fast demo: .*" + want):
        demo.config_from_args(demo.parser().parse_args(argv))


def test_demo_resume_and_force_exclude_each_other(capsys):
    assert "--resume and --force exclude each other" in _parse_error(demo.main, ["--resume", "--force"], capsys)


# ---------------------------------------------------------------------------------------
# duo-fast demo: --out and checkpoints
# ---------------------------------------------------------------------------------------

QUICK = demo.config_from_args(demo.parser().parse_args(["--quick"]))


class _Reached(Exception):
    pass


def test_demo_refuses_an_out_with_a_checkpoint(tmp_path, monkeypatch):
    """It silently overwrote the checkpoint; now --resume continues it and --force
    starts over."""
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"an earlier run")
    with pytest.raises(SystemExit, match=r"checkpoint.pt exists \(an earlier run\): pass --resume to continue it, "
                                         "or --force to start over"):
        demo.run(QUICK, tmp_path, progress=False)
    assert ckpt.read_bytes() == b"an earlier run"

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(demo, "Run", reached)
    with pytest.raises(_Reached):  # --force goes on to the run
        demo.run(QUICK, tmp_path, force=True, progress=False)


def test_demo_out_that_cannot_be_a_folder_fails_before_training(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit, match="--out .* exists and is not a folder"):
        demo.run(QUICK, f, progress=False)


def _valid_checkpoint(out: Path) -> bytes:
    demo.Run(QUICK, out, progress=False).save()
    return (out / "checkpoint.pt").read_bytes()


@pytest.mark.parametrize("kind,want", [
    ("empty", r"expected a checkpoint written by duo-fast demo, got a file torch.load cannot read \(EOFError"),
    ("truncated", "expected a checkpoint written by duo-fast demo, got a file torch.load cannot read"),
    ("garbage", "expected a checkpoint written by duo-fast demo, got a file torch.load cannot read"),
    ("keyless", r"expected a duo-fast demo checkpoint \(a dict with keys .*\), got missing keys \['base_state'"),
    ("list", r"expected a duo-fast demo checkpoint \(a dict with keys .*\), got a list"),
    ("wrong shapes", r"its contents do not fit this run \(RuntimeError: Error\(s\) in loading state_dict"),
])
def test_demo_resume_from_a_bad_checkpoint_names_the_file(tmp_path, kind, want):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / "checkpoint.pt"
    if kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "truncated":
        ckpt.write_bytes(_valid_checkpoint(out)[:2000])
    elif kind == "garbage":
        ckpt.write_bytes(bytes(range(256)) * 4)
    elif kind == "keyless":
        torch.save({"config": {}, "phase": "base"}, ckpt)
    elif kind == "list":
        torch.save([1, 2], ckpt)
    else:
        _valid_checkpoint(out)
        st = torch.load(ckpt, weights_only=False)
        st["model"] = {k: v[..., :1] for k, v in st["model"].items()}
        torch.save(st, ckpt)
    with pytest.raises(SystemExit, match=f"duo_fast demo: cannot resume from {ckpt}: " + want):
        demo.run(QUICK, out, resume=True, progress=False)
