"""Study tables and plots: trials.parquet, pareto.parquet, pareto.png, pareto.html.

The tables are built from Optuna's frozen trials (the source of truth). Columns:

* ``number``, ``state``, ``datetime_start``, ``datetime_complete``, ``duration_s``
* ``params.<name>`` for every parameter of the space (fixed ones included; null where a
  conditional parameter was inactive), stored as strings when a parameter mixes types
* ``values.<metric>`` for each objective, ``metrics.<name>`` for every float metric
* ``constraints.<key>`` (violation, <= 0 is feasible), ``feasible``, ``pareto``
* ``fail_reason``, ``info`` (the non-float evaluator outputs as JSON)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from optuna.trial import FrozenTrial, TrialState

from tracking.info import StudyInfo


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def trials_table(trials: Sequence[FrozenTrial], info: StudyInfo) -> pa.Table:
    """One row per trial (every state), columns as in the module docstring."""
    front = {t.number for t in info.front(trials)}
    param_names = info.param_names
    metric_names: list[str] = []
    con_keys = list(info.constraint_keys)
    for t in trials:
        for k in t.user_attrs.get("metrics", {}) or {}:
            if k not in metric_names:
                metric_names.append(k)
    cols: dict[str, list[Any]] = {
        "number": [], "state": [], "datetime_start": [], "datetime_complete": [], "duration_s": [],
    }
    for n in param_names:
        cols[f"params.{n}"] = []
    for o in info.objectives:
        cols[f"values.{o.metric}"] = []
    for m in metric_names:
        cols[f"metrics.{m}"] = []
    for k in con_keys:
        cols[f"constraints.{k}"] = []
    for k in ("feasible", "pareto", "fail_reason", "info"):
        cols[k] = []
    for t in trials:
        cols["number"].append(t.number)
        cols["state"].append(t.state.name)
        cols["datetime_start"].append(t.datetime_start)
        cols["datetime_complete"].append(t.datetime_complete)
        cols["duration_s"].append(t.duration.total_seconds() if t.duration is not None else None)
        params = info.complete_params(t.params)
        for n in param_names:
            cols[f"params.{n}"].append(params.get(n))
        done = t.state == TrialState.COMPLETE and t.values is not None
        for i, o in enumerate(info.objectives):
            cols[f"values.{o.metric}"].append(t.values[i] if done else None)
        metrics = t.user_attrs.get("metrics", {}) or {}
        for m in metric_names:
            cols[f"metrics.{m}"].append(metrics.get(m))
        cons = t.constraints
        for k in con_keys:
            cols[f"constraints.{k}"].append(cons.get(k))
        cols["feasible"].append(done and info.is_feasible(t))
        cols["pareto"].append(t.number in front)
        cols["fail_reason"].append(t.user_attrs.get("fail_reason"))
        extra = t.user_attrs.get("info")
        cols["info"].append(json.dumps(extra) if extra else None)
    return pa.table({k: _column(v) for k, v in cols.items()})


def pareto_table(trials: Sequence[FrozenTrial], info: StudyInfo) -> pa.Table:
    """The rows of :func:`trials_table` on the feasible Pareto front."""
    table = trials_table(trials, info)
    return table.filter(table.column("pareto"))


def write_table(table: pa.Table, out: str | Path) -> Path:
    """Write ``table`` as Parquet, or CSV when ``out`` ends in ``.csv``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, out)
    else:
        pq.write_table(table, out)
    return out


def _plot_data(table: pa.Table, info: StudyInfo) -> tuple[list[str], dict[str, list[list[float]]]]:
    names = [o.metric for o in info.objectives][:3]
    rows = table.to_pylist()
    groups: dict[str, list[list[float]]] = {"pareto": [], "feasible": [], "infeasible": []}
    for r in rows:
        if r["state"] != "COMPLETE":
            continue
        pt = [r[f"values.{n}"] for n in names]
        if len(names) == 1:
            pt = [r["number"], pt[0]]
        key = "pareto" if r["pareto"] else ("feasible" if r["feasible"] else "infeasible")
        groups[key].append(pt)
    if len(names) == 1:
        names = ["trial", names[0]]
    return names, groups


_STYLE = {"pareto": ("tab:red", "o"), "feasible": ("tab:blue", "."), "infeasible": ("tab:gray", "x")}


def plot_png(table: pa.Table, info: StudyInfo, out: str | Path) -> Path:
    """Scatter of the objectives (2-D, or 3-D for 3+ objectives: the first three).

    Pareto members, other feasible trials and infeasible trials are marked differently.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, groups = _plot_data(table, info)
    fig = plt.figure(figsize=(6, 5))
    ax: Any = fig.add_subplot(111, projection="3d") if len(names) == 3 else fig.add_subplot(111)
    for key, pts in groups.items():
        if not pts:
            continue
        color, marker = _STYLE[key]
        cols = list(zip(*pts, strict=True))
        ax.scatter(*cols, c=color, marker=marker, label=f"{key} ({len(pts)})", s=14)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    if len(names) == 3:
        ax.set_zlabel(names[2])
    ax.set_title(f"{info.name}: Pareto front")
    if any(groups.values()):
        ax.legend(loc="best", fontsize=8)
    out = Path(out)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_html(table: pa.Table, info: StudyInfo, out: str | Path) -> Path:
    """Interactive plotly scatter (self-contained HTML, works offline); hover shows the trial."""
    import plotly.graph_objects as go

    names, groups = _plot_data(table, info)
    fig = go.Figure()
    for key, pts in groups.items():
        if not pts:
            continue
        cols = list(zip(*pts, strict=True))
        color = _STYLE[key][0].removeprefix("tab:")
        if len(names) == 3:
            fig.add_trace(go.Scatter3d(x=cols[0], y=cols[1], z=cols[2], mode="markers", name=key,
                                       marker={"size": 3, "color": color}))
        else:
            fig.add_trace(go.Scatter(x=cols[0], y=cols[1], mode="markers", name=key,
                                     marker={"color": color}))
    if len(names) == 3:
        fig.update_layout(scene={"xaxis_title": names[0], "yaxis_title": names[1], "zaxis_title": names[2]})
    else:
        fig.update_layout(xaxis_title=names[0], yaxis_title=names[1])
    fig.update_layout(title=f"{info.name}: Pareto front")
    out = Path(out)
    fig.write_html(str(out), include_plotlyjs=True, full_html=True)
    return out


def write_artifacts(trials: Sequence[FrozenTrial], info: StudyInfo, out_dir: str | Path) -> list[Path]:
    """Write trials.parquet, pareto.parquet, pareto.png and pareto.html into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = trials_table(trials, info)
    paths = [
        write_table(table, out_dir / "trials.parquet"),
        write_table(table.filter(table.column("pareto")), out_dir / "pareto.parquet"),
        plot_png(table, info, out_dir / "pareto.png"),
        plot_html(table, info, out_dir / "pareto.html"),
    ]
    return paths
