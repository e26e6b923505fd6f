"""Every reproduction spec (examples/reproduce/*.toml) runs at a tiny budget through the
inline pool, and its report script turns the trials into a table and a plot."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest

import dse

REPRO = Path(__file__).resolve().parents[1] / "examples" / "reproduce"
SPECS = sorted(REPRO.glob("*.toml"))
TRIALS = 2  # (the ratio reports need a trial beside the baseline)

#: budgets shrunk for the test: (pattern, replacement)
SHRINK = (
    (r"budget_tokens = \d+", "budget_tokens = 256"),
    (r"budget_images = \d+", "budget_images = 128"),
    (r'"finetune.steps" = [1-9]\d*', '"finetune.steps" = 2'),
    (r"(steps = \{ choices = \[0, )\d+", r"\g<1>2"),
)


def _report_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("repro_report", REPRO / "report.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["repro_report"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_every_spec_has_a_report_and_a_doc_section() -> None:
    report = _report_module()
    names = {tomllib.loads(p.read_text())["study"]["name"] for p in SPECS}
    covered = {s for r in report.REPORTS for s in report.study_names(r)}
    assert names == covered
    doc = (REPRO.parents[1] / "docs" / "reproductions.md").read_text()
    for p in SPECS:
        assert f"examples/reproduce/{p.name}" in doc, p.name


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_reproduction_runs_tiny_and_reports(path: Path, tmp_path: Path) -> None:
    text = path.read_text()
    data = tomllib.loads(text)
    assert data["ray"]["address"] == "inline" and data["tracking"]["enabled"] is False
    for pattern, repl in SHRINK:
        text = re.sub(pattern, repl, text)
    name = data["study"]["name"]
    n = min(TRIALS, len(data["study"].get("enqueue", [])) or TRIALS)
    res = dse.run(text, root=tmp_path, n_trials=n)
    complete = [t for t in res.study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == n
    report = _report_module()
    key = next(r for r in report.REPORTS if name in report.study_names(r))
    out = tmp_path / "report"
    assert report.main([key, "--dir", str(tmp_path), "--out", str(out)]) == 0
    table = (out / f"{key}.md").read_text().splitlines()
    header = report.REPORTS[key].header
    assert table[0] == "| " + " | ".join(header) + " |"
    rows = table[2:]
    assert 1 <= len(rows) <= n and all(r.count(" | ") == len(header) - 1 for r in rows)
    assert "nan" not in "\n".join(rows)
    assert (out / f"{key}.png").stat().st_size > 1000


def test_plena_anchor_script_our_side(capsys: pytest.CaptureFixture[str]) -> None:
    """The anchor comparison script runs without the anchor checkout (our side only)."""
    spec = importlib.util.spec_from_file_location("plena_anchor", REPRO / "plena_anchor.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", "qwen3-32b", "--batch", "1", "--prompt-len", "1024",
                     "--output-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "head_dim: ours 128, anchor 80" in out
    assert "| flash_attention | - |" in out and "| pipelined |" in out
