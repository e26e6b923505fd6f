"""Hypervolume against Optuna's independent implementation; tables, plots, MLflow tracker."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pyarrow.parquet as pq
import pytest
from optuna._hypervolume import compute_hypervolume
from optuna.trial import TrialState

from dse.pareto import (
    FrontTracker,
    hypervolume,
    nondominated_mask,
    pareto_trials,
    study_hypervolume,
)
from dse.spec import load_spec, parse_spec, sample_params, study_info
from tests.net import free_port
from tracking import default_uri
from tracking.artifacts import trials_table, write_artifacts
from tracking.mlflow_tracker import (
    NAMES_TAG,
    TRIAL_TAG,
    MlflowLink,
    Tracker,
    mlflow_key,
    study_run_path,
)

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
[study]
name = "t"
sampler = "random"
[[objectives]]
metric = "a"
[[objectives]]
metric = "b"
direction = "maximize"
[[constraints]]
metric = "c"
op = "<="
bound = 0.8
[space.p]
x = { type = "float", low = 0.0, high = 1.0 }
k = { choices = ["u", "v"] }
y = { type = "int", low = 1, high = 4, when = { "p.k" = ["v"] } }
f = { value = "fixed" }
[[evaluators]]
name = "zdt1"
[tracking]
artifact_every = 5
"""


@pytest.mark.parametrize("dim", [2, 3, 4])
def test_hypervolume_matches_optuna(dim: int) -> None:
    rng = np.random.default_rng(dim)
    for _ in range(5):
        pts = rng.random((40, dim))
        ref = np.full(dim, 1.1)
        front = pts[nondominated_mask(pts)]
        ours = hypervolume(pts, ref)
        theirs = compute_hypervolume(front, ref, assume_pareto=True)
        assert ours == pytest.approx(theirs, rel=1e-12)


def test_nondominated_mask_brute_force() -> None:
    rng = np.random.default_rng(0)
    pts = rng.random((60, 3))
    brute = np.array([
        not any(np.all(q <= p) and np.any(q < p) for q in pts) for p in pts
    ])
    assert (nondominated_mask(pts) == brute).all()


def test_ties_kept_and_tracker_agrees() -> None:
    """Identical objective vectors are all on the front, in the mask and in the tracker."""
    rng = np.random.default_rng(1)
    pts = np.round(rng.random((50, 2)), 1)  # coarse grid: many exact ties
    pts = np.vstack([pts, pts[:10]])
    brute = np.array([
        not any(np.all(q <= p) and np.any(q < p) for q in pts) for p in pts
    ])
    assert (nondominated_mask(pts) == brute).all()
    tracker = FrontTracker(parse_spec(SPEC, source="t.toml", check_options=False))
    for a, b in pts:
        tracker.add([a, -b])  # b is maximised: the tracker takes directional values
    assert tracker.size == int(brute.sum())


def test_points_outside_reference_ignored() -> None:
    assert hypervolume(np.array([[2.0, 0.0]]), [1.0, 1.0]) == 0.0
    assert hypervolume(np.array([[0.5, 0.5], [2.0, 0.0]]), [1.0, 1.0]) == pytest.approx(0.25)


def _study(n: int = 30) -> tuple[optuna.Study, object]:
    spec = parse_spec(SPEC, check_options=False)
    study = optuna.create_study(directions=spec.directions, sampler=spec.make_sampler())
    rng = np.random.default_rng(1)
    for i in range(n):
        t = study.ask()
        p = sample_params(t, spec)
        if i % 10 == 9:
            t.set_user_attr("fail_reason", "boom")
            study.tell(t, state=TrialState.FAIL)
            continue
        a, b, c = p["p.x"], float(rng.random()), float(rng.random())
        t.set_user_attr("metrics", {"a": a, "b": b, "c": c})
        t.set_user_attr("info", {"layers": [1, 2]})
        t.set_constraint(spec.constraints[0].key, spec.constraints[0].violation(c))
        study.tell(t, [a, b])
    return study, spec


def test_front_and_tables() -> None:
    study, spec = _study()
    trials = study.trials
    front = pareto_trials(trials, spec)
    assert front
    feas = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs["metrics"]["c"] <= 0.8]
    pts = np.array([[t.values[0], -t.values[1]] for t in feas])
    mask = nondominated_mask(pts)
    assert {t.number for t, m in zip(feas, mask, strict=True) if m} == {t.number for t in front}
    # incremental tracker agrees with the batch computation
    ft = FrontTracker(spec)
    for t in feas:
        ft.add(t.values)
    assert ft.size == len(front)
    assert ft.hypervolume() == pytest.approx(study_hypervolume(trials, spec))
    table = trials_table(trials, study_info(spec, "."))
    assert table.num_rows == 30
    rows = table.to_pylist()
    assert rows[9]["state"] == "FAIL" and rows[9]["fail_reason"] == "boom"
    for r, t in zip(rows, trials, strict=True):
        assert r["params.p.f"] == "fixed"
        assert (r["params.p.y"] is None) == (t.params["p.k"] == "u")
        assert r["pareto"] == (t.number in {f.number for f in front})


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    b = path.read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR"
    return int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")


def _check_html(path: Path, n_front: int, n_rows: int | None = None) -> str:
    """A small self-contained page: inline SVG, no script, nothing fetched, a hover text
    per front point, the front (and baselines: ``n_rows``) as a table."""
    import re

    page = path.read_text(encoding="utf-8")
    assert path.stat().st_size < 1_000_000
    assert "<svg" in page and "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing to load
    assert len(re.findall(r'<g id="dse-pt-0-\d+"><title>trial \d+', page)) == n_front
    assert page.count("<tr") == 1 + (n_front if n_rows is None else n_rows)  # header + rows
    return page


def test_write_artifacts(tmp_path: Path) -> None:
    study, spec = _study()
    info = study_info(spec, tmp_path)
    paths = write_artifacts(study.trials, info, tmp_path)
    assert [p.name for p in paths] == ["trials.parquet", "pareto.parquet", "pareto.png", "pareto.html"]
    assert pq.read_table(tmp_path / "trials.parquet").num_rows == 30
    front = pareto_trials(study.trials, spec)
    assert pq.read_table(tmp_path / "pareto.parquet").column("pareto").to_pylist() == [True] * len(front)
    w, h = _png_size(tmp_path / "pareto.png")
    assert 500 <= w <= 700 and 400 <= h <= 600  # one panel (two objectives)
    page = _check_html(tmp_path / "pareto.html", len(front))
    assert "← better   a" in page and "b   better →" in page  # a minimised, b maximised
    # the same trials give the same bytes: unchanged artifacts are not uploaded again
    before = {p.name: p.read_bytes() for p in paths}
    assert {p.name: p.read_bytes() for p in write_artifacts(study.trials, info, tmp_path)} == before


def test_artifacts_of_an_empty_study(tmp_path: Path) -> None:
    """No trials: typed empty tables and plots that say so (pa.array([]) has no type)."""
    spec = parse_spec(SPEC, check_options=False)
    paths = write_artifacts([], study_info(spec, tmp_path), tmp_path)
    table = pq.read_table(paths[0])
    assert table.num_rows == 0 and table.schema.field("pareto").type == "bool"
    assert table.schema.field("values.a").type == "double" and table.schema.field("params.p.x").type == "string"
    assert pq.read_table(paths[1]).num_rows == 0
    assert "no complete trials yet" in paths[3].read_text() and _png_size(paths[2])[0] > 0


def test_identical_parameter_sets_appear_once_on_the_front(tmp_path: Path) -> None:
    """A baseline run twice and a duplicate sample are one design: once on the front (as
    its first trial), in the table, the plots and the driver's front size alike."""
    from dse.listeners import Front

    spec = parse_spec(SPEC, check_options=False)
    study = optuna.create_study(directions=spec.directions, sampler=spec.make_sampler())
    points = [(0.1, "u", 0.5), (0.1, "u", 0.5), (0.9, "u", 0.9), (0.1, "u", 0.5), (0.5, "v", 0.2)]
    for i, (x, k, b) in enumerate(points):
        params = {"p.x": x, "p.k": k} | ({"p.y": 2} if k == "v" else {})
        study.enqueue_trial(params, user_attrs={"dse:baseline": True} if i == 0 else {})
        t = study.ask()
        sample_params(t, spec)
        t.set_user_attr("metrics", {"a": x, "b": b, "c": 0.0})
        t.set_constraint(spec.constraints[0].key, spec.constraints[0].violation(0.0))
        study.tell(t, [x, b])
    front = pareto_trials(study.trials, spec)
    assert [t.number for t in front] == [0, 2]  # trials 1 and 3 repeat trial 0; 4 is dominated
    assert Front(spec, study.trials).size == 2
    info = study_info(spec, tmp_path)
    table = trials_table(study.trials, info)
    assert table.column("pareto").to_pylist() == [True, False, True, False, False]
    assert table.column("baseline").to_pylist() == [True, False, False, False, False]
    write_artifacts(study.trials, info, tmp_path)
    page = _check_html(tmp_path / "pareto.html", 2, n_rows=2)  # the baseline is on the front
    assert '<g id="dse-base-0-0"><title>trial 0 (baseline)' in page


@pytest.mark.parametrize(("metric", "unit"), [
    ("ttft_s", "s"), ("area_mm2", "mm²"), ("tokens_per_s", "tokens/s"), ("energy_per_token_j", "J/token"),
    ("images_per_s_per_dsp", "images/s/dsp"), ("hbm_bytes", "bytes"), ("clock_mhz", "MHz"),
    ("perplexity", ""), ("f1", ""), ("zero_product_share", ""),
])
def test_metric_units(metric: str, unit: str) -> None:
    from tracking.artifacts import axis_label, metric_unit

    assert metric_unit(metric) == unit
    label = axis_label(metric, "minimize")
    assert label.startswith("← better") and (f"({unit})" in label) == bool(unit)


@pytest.mark.slow
def test_plots_of_a_large_study(tmp_path: Path) -> None:
    """2,000 trials, 4 objectives spanning decades: 6 panels in one PNG, log axes where
    the values span 100x, an HTML page under 1 MB."""
    import re

    text = SPEC.replace('[[constraints]]', '[[objectives]]\nmetric = "ttft_s"\n'
                        '[[objectives]]\nmetric = "tokens_per_s"\ndirection = "maximize"\n[[constraints]]')
    spec = parse_spec(text, check_options=False)
    study = optuna.create_study(directions=spec.directions, sampler=spec.make_sampler())
    rng = np.random.default_rng(3)
    for _ in range(2000):
        t = study.ask()
        x = sample_params(t, spec)["p.x"]
        w = rng.dirichlet(np.ones(4)) * (1 + 0.1 * x)  # a wide front: most points trade off
        vals = [float(w[0]), 1 - float(w[1]), 10 ** (4 * float(w[2])) * 1e-3, 100 * (2 - float(w[3]))]
        c = float(rng.random())
        t.set_user_attr("metrics", dict(zip(["a", "b", "ttft_s", "tokens_per_s"], vals, strict=True)) | {"c": c})
        t.set_constraint(spec.constraints[0].key, spec.constraints[0].violation(c))
        study.tell(t, vals)
    info = study_info(spec, tmp_path)
    paths = write_artifacts(study.trials, info, tmp_path)
    w, h = _png_size(paths[2])
    assert 1300 <= w <= 1500 and 800 <= h <= 950  # 3 x 2 panels
    assert paths[2].stat().st_size < 1_000_000
    n_front = len(pareto_trials(study.trials, spec))
    assert n_front > 300  # more than get hover texts: the front is drawn as one image
    page = paths[3].read_text(encoding="utf-8")
    assert paths[3].stat().st_size < 1_000_000 and "<script" not in page
    assert "ttft_s (s)   " not in page and "← better   ttft_s (s)" in page
    assert "tokens_per_s (tokens/s)   better →" in page
    assert len(re.findall(r"<tr>", page)) == 300 + 1 and f"{n_front - 300} more rows" in page


@pytest.mark.slow
def test_tracker_logs_each_complete_trial_once(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    study, spec = _study(20)
    trials = study.trials
    tr = Tracker(study_info(spec, tmp_path, storage_desc="memory"), tmp_path)
    tr.start(trials[:10])
    for t in trials[10:]:
        tr.trial_finished(t)
    tr.log_hypervolume(1, 0.5)
    tr.finish(trials)
    assert tr.error is None
    # a second tracker on the same store (a resumed driver) logs nothing twice
    tr2 = Tracker(study_info(spec, tmp_path), tmp_path)
    tr2.start(trials)
    tr2.finish(trials)
    c = MlflowClient(tracking_uri=default_uri(tmp_path))
    exp = c.get_experiment_by_name("t")
    runs = c.search_runs([exp.experiment_id])
    children = [r for r in runs if "dse.trial_number" in r.data.tags]
    complete = [t.number for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(int(r.data.tags["dse.trial_number"]) for r in children) == complete
    parent = [r for r in runs if r.data.tags.get("dse.role") == "parent"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    hist = c.get_metric_history(parent[0].info.run_id, "hypervolume")
    assert [(m.step, m.value) for m in hist] == [(1, 0.5)]
    one = next(r for r in children if r.data.tags["dse.trial_number"] == "0")
    assert one.data.params["p.f"] == "fixed" and "a" in one.data.metrics
    # the study as the UI shows it: a model-training experiment with a description,
    # the space, objectives and summary on the parent run, the front as a table
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.tags["mlflow.note.content"].startswith("dse study t: minimize a, maximize b subject to c <= 0.8")
    p = parent[0].data
    assert p.params["space.p.x"] == "float [0, 1]" and p.params["space.p.f"] == "fixed 'fixed'"
    assert p.params["space.p.y"] == "int [1, 4] when p.k in ['v']"
    assert p.params["objective.a"] == "minimize" and p.params["objective.b"] == "maximize"
    assert p.params["sampler"] == "random" and p.params["seed"] == "0"
    front = pareto_trials(trials, spec)
    feas = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs["metrics"]["c"] <= 0.8]
    assert p.metrics["pareto_size"] == len(front) and p.metrics["n_complete"] == len(complete)
    assert p.metrics["n_failed"] == sum(t.state == TrialState.FAIL for t in trials) == 2
    assert p.metrics["best.a"] == min(t.values[0] for t in feas)
    assert p.metrics["best.b"] == max(t.values[1] for t in feas)
    tables = json.loads(p.tags["mlflow.loggedArtifacts"])
    assert {"path": "pareto_front.json", "type": "table"} in tables
    assert {"path": "search_space.json", "type": "table"} in tables

    def table(name: str) -> dict[str, list[Any]]:
        doc = json.loads(Path(c.download_artifacts(parent[0].info.run_id, name, str(tmp_path))).read_text())
        return {col: [row[i] for row in doc["data"]] for i, col in enumerate(doc["columns"])}

    assert sorted(table("pareto_front.json")["number"]) == [t.number for t in front]  # replaced, not appended
    assert table("search_space.json")["name"] == ["p.x", "p.k", "p.y", "p.f"]
    assert study_run_path(default_uri(tmp_path), "t") == (
        f"#/experiments/{exp.experiment_id}/runs/{parent[0].info.run_id}?workflowType=machine_learning"
    )
    # artifacts are uploaded when their bytes change, not at every step
    link = MlflowLink(study_info(spec, tmp_path), tmp_path)
    link.connect()
    link.log_artifacts(trials[:15])
    stored = tmp_path / "mlartifacts" / parent[0].info.run_id / "artifacts"
    names = ["trials.parquet", "pareto.parquet", "pareto.png", "pareto.html", "pareto_front.json"]
    first = {n: (stored / n).stat().st_mtime_ns for n in names}
    link.log_artifacts(trials[:15])
    assert {n: (stored / n).stat().st_mtime_ns for n in names} == first
    link.log_artifacts(trials[:15] + [t for t in trials[15:] if t.state == TrialState.FAIL], plots=False)
    again = {n: (stored / n).stat().st_mtime_ns for n in names}
    assert [n for n in names if again[n] != first[n]] == ["trials.parquet"]  # a FAIL changes no front


@pytest.mark.slow
def test_tracker_pareto_only_child_runs(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    study, spec = _study(20)
    spec.child_runs = "pareto"
    tr = Tracker(study_info(spec, tmp_path), tmp_path)
    tr.start([])
    for t in study.trials:
        tr.trial_finished(t)
    tr.finish(study.trials)
    assert tr.error is None
    c = MlflowClient(tracking_uri=default_uri(tmp_path))
    runs = c.search_runs([c.get_experiment_by_name("t").experiment_id])
    logged = sorted(int(r.data.tags["dse.trial_number"]) for r in runs if "dse.trial_number" in r.data.tags)
    assert logged == [t.number for t in pareto_trials(study.trials, spec)]


def _domain_value(p: Any) -> Any:
    return {"categorical": lambda: p.choices[-1], "fixed": lambda: p.value}.get(p.kind, lambda: p.high)()


@pytest.mark.slow
def test_every_example_parameter_round_trips(tmp_path: Path) -> None:
    """Every parameter of every shipped spec (glob names such as ``layer1*`` included) and
    a metric MLflow would reject are logged on a child run and read back under their names."""
    from mlflow.tracking import MlflowClient

    examples = sorted((ROOT / "examples").glob("*.toml"))
    assert len(examples) >= 5
    for path in examples:
        spec = load_spec(path, check_options=False)
        values = {p.name: _domain_value(p) for p in spec.params}
        info = replace(study_info(spec, tmp_path), complete_params=lambda _p, v=values: dict(v))
        link = MlflowLink(info, tmp_path)
        link.connect()
        metrics = {o.metric: 1.0 for o in spec.objectives} | {"acc[top1]*": 0.5}
        t = optuna.trial.create_trial(values=[1.0] * len(spec.objectives), user_attrs={"metrics": metrics})
        assert link.log_trial(t), path.name
        (run,) = MlflowClient(tracking_uri=info.uri).search_runs(
            [link.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{t.number}'"
        )
        names = json.loads(run.data.tags.get(NAMES_TAG, "{}"))
        params = {names.get(k, k): v for k, v in run.data.params.items()}
        assert params == {k: str(v) for k, v in values.items()}, path.name
        assert {names.get(k, k): v for k, v in run.data.metrics.items()} == metrics, path.name
        assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_bulk_child_runs_read_back_as_the_public_api_writes_them(tmp_path: Path) -> None:
    """Child runs written in one SQLite transaction (tracking.mlflow_sql) read back through
    MlflowClient exactly as those logged by MLflow's public API: run info (status, start and
    end times, name, artifact URI), params, tags (parent link, trial number, study identity,
    renamed keys), metrics and their histories (value, timestamp, step; NaN and +-inf)."""
    import copy
    import math

    import mlflow
    from mlflow.tracking import MlflowClient

    from tracking.mlflow_sql import MLFLOW_VERSION

    assert mlflow.__version__ == MLFLOW_VERSION, "the bulk writer is pinned to this MLflow version"
    study, spec = _study(8)
    odd = {"acc[top1]*": 0.5, "nan_m": math.nan, "inf_m": math.inf, "ninf_m": -math.inf}
    trials = [t for t in study.trials if t.state == TrialState.COMPLETE]
    trials[0] = copy.deepcopy(trials[0])
    trials[0].set_user_attr("metrics", {**trials[0].user_attrs["metrics"], **odd})
    read: dict[bool, list[str]] = {}
    for bulk in (False, True):
        spec.name = f"bulk-{bulk}"
        info = study_info(spec, tmp_path, storage_desc="memory", study_uid=f"uid-{bulk}")
        # a spec name MLflow rejects as a key (glob): renamed, the original kept in dse.names
        info = replace(info, complete_params=lambda p, f=info.complete_params: {**f(p), "layer1*.density": 0.5})
        link = MlflowLink(info, tmp_path, bulk=bulk)
        assert (link._bulk is not None) == bulk
        link.connect()
        assert link.log_trials(trials[:3]) == [] and link.log_trials(trials) == []
        assert link.log_trials(trials) == [] and len(link.logged) == len(trials)  # nothing twice
        c = MlflowClient(tracking_uri=info.uri)
        runs = c.search_runs([link.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` != ''", max_results=100)
        out = []
        for r in sorted(runs, key=lambda r: int(r.data.tags[TRIAL_TAG])):
            run = c.get_run(r.info.run_id).to_dictionary()
            assert json.dumps(run, sort_keys=True) == json.dumps(r.to_dictionary(), sort_keys=True)  # NaN
            hist = {k: [(m.value, m.timestamp, m.step) for m in c.get_metric_history(r.info.run_id, k)]
                    for k in r.data.metrics}
            assert run["info"].pop("experiment_id") == link.experiment_id
            text = json.dumps([run, hist], sort_keys=True)  # NaN compares as text
            out.append(text.replace(r.info.run_id, "<run>").replace(link.parent_id, "<parent>")
                       .replace(f"uid-{bulk}", "<uid>"))
        read[bulk] = out
    assert len(read[True]) == len(trials) and read[True] == read[False]
    first = json.loads(read[True][0])[0]
    assert first["info"]["status"] == "FINISHED" and first["data"]["tags"]["mlflow.parentRunId"] == "<parent>"
    assert 0 <= first["info"]["end_time"] - first["info"]["start_time"] < 1000
    assert math.isnan(first["data"]["metrics"]["nan_m"]) and first["data"]["metrics"]["inf_m"] > 1e308
    assert json.loads(first["data"]["tags"][NAMES_TAG])[mlflow_key("layer1*.density")] == "layer1*.density"


@pytest.mark.slow
def test_mlflow_key_is_legal_and_distinct() -> None:
    from mlflow.utils.validation import _validate_param_name

    names = ["a.b", "layer1*.density", "layer1?.density", "layer1[0].density", "x" * 300, "a b/c"]
    keys = [mlflow_key(n) for n in names]
    for k in keys:
        _validate_param_name(k)
        assert len(k) <= 250
    assert len(set(keys)) == len(names)
    assert keys[0] == "a.b" and keys[-1] == "a b/c"  # legal names are kept as they are
    assert keys == [mlflow_key(n) for n in names]  # deterministic


def test_validate_skips_only_the_key_checks_of_keys_found_valid() -> None:
    """The bulk writer's validation rejects what MLflow's log_batch rejects, also for a
    run whose keys an earlier valid run had (only the per-key checks are skipped then)."""
    from mlflow.exceptions import MlflowException

    from tracking.mlflow_sql import FinishedRun, validate

    def run(params: dict[str, str], metrics: dict[str, Any], tags: dict[str, str] | None = None) -> FinishedRun:
        return FinishedRun("r", 0, 1, tags or {"t": "v"}, params, metrics)

    seen: set[tuple[tuple[str, ...], ...]] = set()
    validate(run({"p": "1"}, {"m": 0.5}), seen)
    assert seen == {(("m",), ("p",), ("t",))}
    validate(run({"p": "2"}, {"m": float("nan")}), seen)  # same keys: values checked only
    bad = [run({"p": "1"}, {"m": "high"}), run({"p": "1"}, {"m": True}), run({"p*": "1"}, {"m": 0.5}),
           run({"p": "1"}, {"m//": 0.5})]
    for r in bad:
        with pytest.raises(MlflowException) as e:
            validate(r, seen)
        assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    assert len(seen) == 1


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--tracking-uri > the spec's [tracking] uri > MLFLOW_TRACKING_URI > <study dir>/mlflow.db."""
    spec = parse_spec(SPEC, check_options=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert study_info(spec, tmp_path).uri == default_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert study_info(spec, tmp_path).uri == "http://env:5000"
    spec.tracking_uri = "http://spec:5000"
    assert study_info(spec, tmp_path).uri == "http://spec:5000"
    assert study_info(spec, tmp_path, uri="http://cli:5000").uri == "http://cli:5000"


@pytest.mark.slow
def test_store_killed_while_being_created_is_not_left_half_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL in the middle of MLflow's schema set-up (seconds of migrations, done once per
    machine for the store template) leaves neither a template nor an mlflow.db (both are
    built under temporary names), so the next driver creates a working store; a
    half-migrated one was refused for good before. A store made from the template is
    MLflow's fresh store: the Default experiment as MLflow makes it here and now."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from tracking.mlflow_tracker import _create_sqlite_store, store_template

    db = tmp_path / "mlflow.db"
    cache = tmp_path / "cache"
    code = f"from pathlib import Path; from tracking.mlflow_tracker import _create_sqlite_store as c; c(Path({str(db)!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code],
                            env={**os.environ, "PYTHONPATH": str(ROOT), "DSE_CACHE_DIR": str(cache)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(cache.glob("mlflow/*.init-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the store was built before the test could kill it"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(cache.glob("mlflow/*.init-*")) and not list(cache.glob("mlflow/*.db")) and not db.exists()
    monkeypatch.setenv("DSE_CACHE_DIR", str(cache))
    t0_ms = int(time.time() * 1000)
    _create_sqlite_store(db)
    template = store_template()
    assert template is not None and template.parent == cache / "mlflow"
    c = MlflowClient(tracking_uri=f"sqlite:///{db}")
    c.create_experiment("after-kill")
    assert {e.name for e in c.search_experiments()} == {"Default", "after-kill"}
    (made,) = sqlite3.connect(template).execute("SELECT artifact_location FROM experiments").fetchall()
    default = c.get_experiment("0")
    assert default.artifact_location == made[0] and default.creation_time >= t0_ms


@pytest.mark.slow
def test_a_damaged_store_template_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A truncated store template (a full disk, a crash while the cache was copied) is
    found by its cheap check and rebuilt in place: the next study's store works."""
    import shutil

    from mlflow.tracking import MlflowClient

    from tracking.mlflow_tracker import _create_sqlite_store, _template_problem, store_template

    good = store_template()  # this machine's cache (built once), copied and damaged below
    assert good is not None and _template_problem(good) is None
    cache = tmp_path / "cache"
    (cache / "mlflow").mkdir(parents=True)
    damaged = cache / "mlflow" / good.name
    shutil.copyfile(good, damaged)
    with damaged.open("r+b") as f:
        f.truncate(damaged.stat().st_size // 2)
    assert _template_problem(damaged) is not None
    monkeypatch.setenv("DSE_CACHE_DIR", str(cache))
    with caplog.at_level("WARNING", logger="dse.tracking"):
        _create_sqlite_store(tmp_path / "mlflow.db")
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"MLflow store template {damaged} is damaged"]
    assert _template_problem(damaged) is None and not list(cache.glob("mlflow/*.init-*"))
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = c.create_run(c.create_experiment("after-damage"))
    c.log_metric(run.info.run_id, "a", 1.0)
    assert c.get_run(run.info.run_id).data.metrics == {"a": 1.0}


def test_telemetry_off_unless_the_user_chose() -> None:
    """MLflow's usage telemetry: switched off where the user set neither of its switches."""
    from tracking.info import telemetry_off

    for environ, expected in [({}, {"MLFLOW_DISABLE_TELEMETRY": "true"}),
                              ({"MLFLOW_DISABLE_TELEMETRY": "false"}, {"MLFLOW_DISABLE_TELEMETRY": "false"}),
                              ({"DO_NOT_TRACK": "false"}, {"DO_NOT_TRACK": "false"})]:
        telemetry_off(environ)
        assert environ == expected


TELEMETRY_OF_THE_LOGGING_PROCESS = """
import json, sys
from pathlib import Path
from dse.spec import parse_spec, study_info
from tracking.mlflow_tracker import Tracker
sdir = Path(sys.argv[2])
tr = Tracker(study_info(parse_spec(Path(sys.argv[1]).read_text(), check_options=False), sdir), sdir)
tr.start([])
import time
deadline = time.monotonic() + 30  # /proc/PID/environ is the exec's: wait for the spawn's exec
while b"--multiprocessing-fork" not in Path(f"/proc/{tr._proc.pid}/cmdline").read_bytes():
    assert time.monotonic() < deadline, "the logging process never started"
    time.sleep(0.01)
environ = Path(f"/proc/{tr._proc.pid}/environ").read_bytes().split(b"\\0")
tr.finish([])
print(json.dumps({"error": tr.error, "switches": sorted(e.decode() for e in environ
                  if e.startswith((b"MLFLOW_DISABLE_TELEMETRY=", b"DO_NOT_TRACK=")))}))
"""


@pytest.mark.slow
def test_the_logging_process_runs_without_telemetry(tmp_path: Path) -> None:
    """The MLflow logging process, started by a driver whose user set no telemetry switch,
    runs with MLFLOW_DISABLE_TELEMETRY=true (MLflow 3 would otherwise start its telemetry
    client there). (Outside pytest: under pytest MLflow turns it off by itself.)"""
    import os
    import subprocess
    import sys

    spec = tmp_path / "t.toml"
    spec.write_text(SPEC)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PYTEST_CURRENT_TEST")}
    proc = subprocess.run([sys.executable, "-c", TELEMETRY_OF_THE_LOGGING_PROCESS, str(spec),
                           str(tmp_path)], env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "error": None, "switches": ["MLFLOW_DISABLE_TELEMETRY=true"]}


def _start_mlflow_server(db: Path, port: int, cwd: Path) -> Any:
    """A real ``mlflow server`` (one worker) on 127.0.0.1:port; returns once /health answers."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
         "--artifacts-destination", str(cwd / "mlartifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=cwd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, "mlflow server exited"
        try:
            if opener.open(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    _kill(proc)
    pytest.fail("mlflow server did not start")


def _kill(proc: Any) -> None:
    import os
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_server_killed_and_restarted_mid_run_loses_nothing(tmp_path: Path) -> None:
    """A real MLflow server is SIGKILLed after 15 trials and restarted after 30: every
    COMPLETE trial ends up logged exactly once and the hypervolume history is whole."""
    import time

    from mlflow.tracking import MlflowClient

    from tracking.mlflow_tracker import _create_sqlite_store

    study, spec = _study(40)
    trials = study.trials
    complete = [t.number for t in trials if t.state == TrialState.COMPLETE]
    port = free_port()
    db = tmp_path / "server.db"
    _create_sqlite_store(db)  # a copy of the store template: the server skips the migrations
    uri = f"http://127.0.0.1:{port}"
    server = _start_mlflow_server(db, port, tmp_path)
    tr = Tracker(study_info(spec, tmp_path, uri=uri), tmp_path)
    try:
        tr.start([])
        for t in trials[:15]:
            tr.trial_finished(t)
        tr.log_hypervolume(1, 0.1)
        c = MlflowClient(tracking_uri=uri)
        first = [n for n in complete if n < 15]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            exp = c.get_experiment_by_name("t")
            runs = c.search_runs([exp.experiment_id]) if exp is not None else []
            if len([r for r in runs if TRIAL_TAG in r.data.tags]) == len(first):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the first trials were not logged")
        _kill(server)
        for t in trials[15:30]:
            tr.trial_finished(t)
        tr.log_hypervolume(2, 0.2)
        tr.log_hypervolume(3, 0.3)
        time.sleep(3)  # the tracker meets the dead server
        server = _start_mlflow_server(db, port, tmp_path)
        for t in trials[30:]:
            tr.trial_finished(t)
        tr.log_hypervolume(4, 0.4)
        tr.finish(trials)
        assert tr.error is None
        c = MlflowClient(tracking_uri=uri)
        exp = c.get_experiment_by_name("t")
        runs = c.search_runs([exp.experiment_id], max_results=1000)
        children = sorted(int(r.data.tags[TRIAL_TAG]) for r in runs if TRIAL_TAG in r.data.tags)
        assert children == complete  # each exactly once
        assert all(r.info.status == "FINISHED" for r in runs)
        (parent,) = [r for r in runs if r.data.tags.get("dse.role") == "parent"]
        hist = c.get_metric_history(parent.info.run_id, "hypervolume")
        assert sorted((m.step, m.value) for m in hist) == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    finally:
        _kill(server)
