"""Study tables and plots: trials.parquet, pareto.parquet, pareto.png, pareto.html.

The tables are built from Optuna's frozen trials (the source of truth). Columns:

* ``number``, ``state``, ``datetime_start``, ``datetime_complete``, ``duration_s``
* ``params.<name>`` for every parameter of the space (fixed ones included; null where a
  conditional parameter was inactive), stored as strings when a parameter mixes types
* ``values.<metric>`` for each objective, ``metrics.<name>`` for every float metric
* ``constraints.<key>`` (violation, <= 0 is feasible), ``feasible``, ``pareto`` (a
  parameter set on the front more than once is marked on its first trial only),
  ``baseline`` (a spec ``enqueue`` point)
* ``fail_reason``, ``info`` (the non-float evaluator outputs as JSON)

Plots (pareto.png, pareto.html, :func:`write_artifacts`): a panel per pair of objectives.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from optuna.trial import FrozenTrial, TrialState

from tracking.info import BASELINE_ATTR, StudyInfo

#: column types that do not depend on the values (an empty study still has typed columns)
_TYPES = {
    "number": pa.int64(), "state": pa.string(), "datetime_start": pa.timestamp("us"),
    "datetime_complete": pa.timestamp("us"), "duration_s": pa.float64(), "feasible": pa.bool_(),
    "pareto": pa.bool_(), "baseline": pa.bool_(), "fail_reason": pa.string(), "info": pa.string(),
}
_FLOAT_PREFIXES = ("values.", "metrics.", "constraints.")


def _column(name: str, values: list[Any]) -> pa.Array:
    """One column: its fixed type, float64 for numbers, else inferred (strings when the
    values mix types; strings when there are no values to infer from)."""
    typ = _TYPES.get(name) or (pa.float64() if name.startswith(_FLOAT_PREFIXES) else None)
    if typ is None and all(v is None for v in values):
        typ = pa.string()
    try:
        return pa.array(values, type=typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def trials_table(
    trials: Sequence[FrozenTrial], info: StudyInfo, front: Collection[int] | None = None
) -> pa.Table:
    """One row per trial (every state), columns as in the module docstring. ``front``: the
    numbers of ``info.front(trials)`` when the caller has them already."""
    front = {t.number for t in info.front(trials)} if front is None else set(front)
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
    for k in ("feasible", "pareto", "baseline", "fail_reason", "info"):
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
            v = metrics.get(m)  # non-finite values are kept as strings ("nan", "inf")
            cols[f"metrics.{m}"].append(float(v) if isinstance(v, (int, float, str)) and _is_number(v) else None)
        cons = t.constraints
        for k in con_keys:
            cols[f"constraints.{k}"].append(cons.get(k))
        cols["feasible"].append(done and info.is_feasible(t))
        cols["pareto"].append(t.number in front)
        cols["baseline"].append(bool(t.user_attrs.get(BASELINE_ATTR, False)))
        cols["fail_reason"].append(t.user_attrs.get("fail_reason"))
        extra = t.user_attrs.get("info")
        cols["info"].append(json.dumps(extra) if extra else None)
    return pa.table({k: _column(k, v) for k, v in cols.items()})


def _is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


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


# ----------------------------------------------------------------------------- plots

#: metric-name suffix -> unit shown on an axis (``ttft_s`` -> s, ``area_mm2`` -> mm²)
UNITS = {
    "s": "s", "ms": "ms", "us": "µs", "ns": "ns", "mm2": "mm²", "um2": "µm²", "w": "W",
    "mw": "mW", "j": "J", "mj": "mJ", "uj": "µJ", "nj": "nJ", "pj": "pJ", "bytes": "bytes",
    "kb": "kB", "mb": "MB", "gb": "GB", "bits": "bits", "hz": "Hz", "mhz": "MHz", "ghz": "GHz",
    "cycles": "cycles", "pct": "%", "percent": "%", "tops": "TOPS", "gops": "GOPS",
}
LOG_RATIO = 100.0  # an axis whose positive values span this factor or more is drawn in log scale
MAX_TOOLTIPS = 300  # HTML: front points beyond this many get no hover text of their own
MAX_TABLE_ROWS = 300  # HTML: rows of the front table


def metric_unit(metric: str) -> str:
    """The unit a metric name carries (``""`` for none): its last ``_``-part from
    :data:`UNITS`, divided by what follows ``_per_`` (``energy_per_token_j`` -> ``J/token``,
    ``tokens_per_s`` -> ``tokens/s``, ``images_per_s_per_dsp`` -> ``images/s/dsp``)."""
    parts = metric.lower().split("_")
    if len(parts) < 2:
        return ""
    if parts[-1] in UNITS and parts[-2] != "per":
        unit, rest = UNITS[parts[-1]], "_".join(parts[:-1])
        per = rest.split("_per_")[1:]
        return "/".join([unit, *per])
    if "_per_" in metric.lower():
        num, *per = metric.lower().split("_per_")
        return "/".join([num.split("_")[-1], *(UNITS.get(p, p) for p in per)])
    return ""


def axis_label(metric: str, direction: str, axis: str = "x") -> str:
    """``metric (unit)`` and an arrow pointing the better way along ``axis`` (``"x"``: left
    or right; ``"y"``: the label is read bottom-up, so ``→`` points up)."""
    unit = metric_unit(metric)
    text = f"{metric} ({unit})" if unit else metric
    return f"← better   {text}" if direction == "minimize" else f"{text}   better →"


@dataclass
class _Points:
    """The COMPLETE trials of a table, split the way the plots draw them."""

    names: list[str]  # objective metrics
    directions: list[str]
    values: np.ndarray  # (n, n_objectives)
    number: np.ndarray  # trial numbers
    kind: list[str]  # "pareto" | "dominated" | "infeasible"
    baseline: np.ndarray  # bool
    param_values: dict[str, list[Any]]  # parameter -> its value at each point (None: inactive)

    def params(self, r: int) -> dict[str, Any]:
        """The active parameters of point ``r``, in space order."""
        return {k: v[r] for k, v in self.param_values.items() if v[r] is not None}


def _points(table: pa.Table, info: StudyInfo) -> _Points:
    names = [o.metric for o in info.objectives]
    cols = table.select(["number", "state", "feasible", "pareto", "baseline", *(f"values.{n}" for n in names)])
    d = cols.to_pydict()
    vals = [d[f"values.{n}"] for n in names]
    keep = [i for i, state in enumerate(d["state"]) if state == "COMPLETE"
            and all(v[i] is not None and math.isfinite(v[i]) for v in vals)]
    return _Points(
        names=names,
        directions=[o.direction for o in info.objectives],
        values=np.array([[v[i] for v in vals] for i in keep], dtype=float).reshape(-1, len(names)),
        number=np.array([d["number"][i] for i in keep], dtype=int),
        kind=["pareto" if d["pareto"][i] else ("dominated" if d["feasible"][i] else "infeasible") for i in keep],
        baseline=np.array([bool(d["baseline"][i]) for i in keep], dtype=bool),
        param_values={c.removeprefix("params."): [col[i] for i in keep] for c, col in
                      ((c, table.column(c).to_pylist()) for c in table.column_names if c.startswith("params."))},
    )


def _log_scale(v: np.ndarray) -> bool:
    """Whether values span :data:`LOG_RATIO` or more and are all positive."""
    return len(v) > 1 and bool(np.all(v > 0)) and float(v.max() / v.min()) >= LOG_RATIO


def _fmt(v: Any) -> str:
    """A value for reading: floats with 4 significant digits, anything else as it is."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _decade(v: float, _pos: Any = None) -> str:
    """A log axis's tick label: ``10⁻²`` at a power of ten (unicode superscripts, which
    need no mathtext parsing, a third of a plot's time), ``""`` elsewhere."""
    if v <= 0 or not math.isfinite(v):
        return ""
    e = round(math.log10(v))
    return f"10{str(e).translate(_SUPERSCRIPT)}" if math.isclose(v, 10.0**e, rel_tol=1e-9) else ""


def _front_steps(x: np.ndarray, y: np.ndarray, sx: float, sy: float) -> tuple[np.ndarray, np.ndarray]:
    """The 2-D non-dominated points of (x, y) sorted along x (signs ``sx``, ``sy``: +1
    minimise, -1 maximise), for a step line."""
    order = np.lexsort((sy * y, sx * x))
    keep, best = [], math.inf
    for i in order:
        if sy * y[i] < best:
            keep.append(i)
            best = sy * y[i]
    return x[keep], y[keep]


_STYLE: dict[str, dict[str, Any]] = {
    "pareto": {"c": "tab:red", "marker": "o", "s": 22, "alpha": 0.95, "zorder": 3, "edgecolors": "darkred",
               "linewidths": 0.5},
    "dominated": {"c": "tab:blue", "marker": "o", "s": 10, "alpha": 0.22, "zorder": 2, "linewidths": 0},
    "infeasible": {"c": "tab:gray", "marker": "x", "s": 10, "alpha": 0.3, "zorder": 1, "linewidths": 0.8},
}
_LABEL = {"pareto": "Pareto front", "dominated": "dominated", "infeasible": "infeasible"}


#: figure margins in inches (a fixed layout: MLflow's constrained layout was half the cost
#: of a plot): left of a panel its y tick labels and label, below it its x tick labels
#: and label, above the panels the title, below them the legend
_MARGIN_IN = {"left": 0.95, "right": 0.25, "top": 0.45, "bottom": 0.95, "wspace": 1.05, "hspace": 0.8}
_TIP = re.compile(r'<a xlink:href="#(dse-(?:pt|base)-\d+-\d+)" target="_blank">(.*?)</a>', re.DOTALL)


def preload() -> None:
    """Import and warm up what the plots use (matplotlib, its Agg and SVG backends, the
    font cache): 0.6-0.75 s once per process. The logging process calls it once
    connected, so the first artifact step (in a short run the final one, while the driver
    waits) does not pay it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().scatter([0.0], [1.0])
    for fmt in ("png", "svg"):
        fig.savefig(io.BytesIO(), format=fmt, dpi=20)


def _figure(pts: _Points, info: StudyInfo) -> tuple[Any, dict[str, str]]:
    """The Pareto views of a study: one panel per pair of objectives (the trial number
    against the objective for a single one), one figure for both the PNG and the SVG of
    the HTML page. Returns the figure and a map from the id of each front point and
    baseline to its hover text: each such point carries ``#<id>`` as its URL, which only
    the SVG writes (as a link around the point, :func:`_svg_with_tips` turns it into a
    group with a title); in the SVG, dominated and infeasible points are one image."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import (
        FuncFormatter,
        LogLocator,
        MaxNLocator,
        NullFormatter,
        ScalarFormatter,
    )

    n_obj = len(pts.names)
    if n_obj == 1:
        pairs: list[tuple[int, int]] = [(-1, 0)]
    else:
        shown = min(n_obj, 5)  # 10 panels at most
        pairs = [(i, j) for i in range(shown) for j in range(i + 1, shown)]
    ncols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    width_in, height_in = max(6.0, 4.6 * ncols), 4.0 * nrows + 0.7
    m = _MARGIN_IN
    panel_w = (width_in - m["left"] - m["right"] - (ncols - 1) * m["wspace"]) / ncols
    panel_h = (height_in - m["top"] - m["bottom"] - (nrows - 1) * m["hspace"]) / nrows
    fig = Figure(figsize=(width_in, height_in), dpi=100)
    fig.subplots_adjust(left=m["left"] / width_in, right=1 - m["right"] / width_in,
                        bottom=m["bottom"] / height_in, top=1 - m["top"] / height_in,
                        wspace=m["wspace"] / panel_w, hspace=m["hspace"] / panel_h)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    tips: dict[str, str] = {}
    kinds = np.array(pts.kind, dtype=object)
    log_axis = [_log_scale(pts.values[:, k]) for k in range(n_obj)]
    sign = [1.0 if d == "minimize" else -1.0 for d in pts.directions]
    bases = np.flatnonzero(pts.baseline)

    def tip(r: int) -> str:
        vals = ", ".join(f"{n} = {_fmt(v)}" for n, v in zip(pts.names, pts.values[r], strict=True))
        prm = ", ".join(f"{k} = {_fmt(v)}" for k, v in pts.params(r).items())
        base = " (baseline)" if pts.baseline[r] else ""
        return f"trial {pts.number[r]}{base}: {vals}; {prm}"

    def with_tips(prefix: str, rows: np.ndarray) -> list[str]:
        ids = [f"{prefix}-{pts.number[r]}" for r in rows]
        for gid, r in zip(ids, rows, strict=True):
            tips[gid] = tip(r)
        return [f"#{gid}" for gid in ids]

    for p, (i, j) in enumerate(pairs):
        ax = axes[p]
        x = pts.number.astype(float) if i < 0 else pts.values[:, i]
        y = pts.values[:, j]
        for kind in ("infeasible", "dominated", "pareto"):
            sel = kinds == kind
            if not sel.any():
                continue
            hover = kind == "pareto" and sel.sum() <= MAX_TOOLTIPS
            coll = ax.scatter(x[sel], y[sel], label=f"{_LABEL[kind]} ({int(sel.sum())})", rasterized=not hover,
                              **_STYLE[kind])  # SVG: an image, or a point each with its hover text
            if hover:
                coll.set_urls(with_tips(f"dse-pt-{p}", np.flatnonzero(sel)))
        if i >= 0 and n_obj == 2:
            feas = kinds != "infeasible"
            if feas.any():
                fx, fy = _front_steps(x[feas], y[feas], sign[i], sign[j])
                ax.plot(fx, fy, drawstyle="steps-post", color="tab:red", lw=0.8, alpha=0.6, zorder=2)
        elif i < 0 and len(y):
            best = np.minimum.accumulate(sign[j] * np.where(kinds != "infeasible", y, np.inf)) * sign[j]
            ok = np.isfinite(best)
            ax.plot(x[ok], best[ok], drawstyle="steps-post", color="tab:red", lw=0.8, label="best so far")
        if len(bases):
            coll = ax.scatter(x[bases], y[bases], marker="*", s=180, c="gold", edgecolors="black", linewidths=0.8,
                              zorder=4, label="baseline")
            coll.set_urls(with_tips(f"dse-base-{p}", bases))
        ax.set_xlabel("trial" if i < 0 else axis_label(pts.names[i], pts.directions[i], "x"))
        ax.set_ylabel(axis_label(pts.names[j], pts.directions[j], "y"))
        for axis, k in ((ax.xaxis, i), (ax.yaxis, j)):
            if k >= 0 and log_axis[k]:
                (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
                axis.set_major_formatter(FuncFormatter(_decade))  # plain text: no mathtext to parse
                axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))  # fewer ticks to build and draw
                axis.set_minor_formatter(NullFormatter())
            else:
                axis.set_major_locator(MaxNLocator(nbins=5))
                fmt = ScalarFormatter(useOffset=False)  # 12.002, not "+1.2e1" and 0.002
                fmt.set_powerlimits((-3, 4))
                axis.set_major_formatter(fmt)
        ax.grid(True, lw=0.4, alpha=0.4)
    n_front = int((kinds == "pareto").sum())
    fig.suptitle(f"{info.name}: {len(pts.number)} complete trials, {n_front} on the Pareto front"
                 + (f" (first 5 of {n_obj} objectives)" if n_obj > 5 else ""), fontsize=11,
                 y=1 - 0.12 / height_in, va="top")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.02 / height_in),
                   ncols=min(5 if ncols > 1 else 3, len(handles)), fontsize=8, frameon=False)
    if not len(pts.number):
        axes[0].text(0.5, 0.5, "no complete trials yet", ha="center", va="center", transform=axes[0].transAxes)
    return fig, tips


def _save_png(fig: Any, out: Path) -> Path:
    """pareto.png: the panels of :func:`_figure` (the better direction arrowed on each axis,
    units from the metric names, the front in red, dominated points faded, infeasible ones
    grey, baselines as stars, log axes where values span 100x), 100 dpi."""
    fig.savefig(out, format="png", dpi=100, metadata={"Software": None})
    return out


def _svg_with_tips(fig: Any, tips: dict[str, str]) -> str:
    """The figure as inline SVG (the ``<svg>`` element), each point with a hover text
    (its ``<a xlink:href="#id">`` from :func:`_figure`) a ``<g id="id">`` with a title."""
    import html

    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dse"}):
        fig.savefig(buf, format="svg", dpi=72, metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    return _TIP.sub(lambda mt: f'<g id="{mt[1]}"><title>{html.escape(tips[mt[1]])}</title>{mt[2]}</g>', svg)


def _save_html(pts: _Points, info: StudyInfo, svg: str, out: Path) -> Path:
    """pareto.html, a small self-contained page (no script, no external file: it renders
    offline and in MLflow's sandboxed artifact preview): the study's description, the
    panels as inline SVG (:func:`_svg_with_tips`: dominated and infeasible points as one
    image, each front point and baseline with its trial, objectives and parameters as
    hover text), and the front (and baselines) as a table."""
    import html

    front = [r for r in range(len(pts.number)) if pts.kind[r] == "pareto" or pts.baseline[r]]
    front.sort(key=lambda r: tuple(s * v for s, v in zip(
        [1.0 if d == "minimize" else -1.0 for d in pts.directions], pts.values[r], strict=True)))
    pnames = [n for n in info.param_names if any(pts.param_values[n][r] is not None for r in front)]
    head = ["trial"] + [
        f"{n} ({metric_unit(n)}) {'↓' if d == 'minimize' else '↑'}" if metric_unit(n) else
        f"{n} {'↓' if d == 'minimize' else '↑'}" for n, d in zip(pts.names, pts.directions, strict=True)
    ] + pnames
    rows = []
    for r in front[:MAX_TABLE_ROWS]:
        cells = [f"{pts.number[r]}{' (baseline)' if pts.baseline[r] else ''}"]
        cells += [_fmt(v) for v in pts.values[r]] + [_fmt(pts.params(r).get(k, "")) for k in pnames]
        cls = ' class="base"' if pts.baseline[r] else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    more = (f"<p>{len(front) - MAX_TABLE_ROWS} more rows in pareto.parquet.</p>"
            if len(front) > MAX_TABLE_ROWS else "")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(info.name)}: Pareto front</title>
<style>
body {{ font: 13px sans-serif; margin: 12px; color: #222; }}
svg {{ max-width: 100%; height: auto; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
th {{ background: #f3f3f3; position: sticky; top: 0; }}
tr.base td {{ background: #fff6cc; }}
</style></head><body>
<p>{html.escape(info.description or info.name)} Hover a red point (front) or a star
(baseline) for its trial and parameters.</p>
{svg}
<h3>Pareto front ({sum(pts.kind[r] == "pareto" for r in front)} trials) and baselines</h3>
<table><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}</tr></thead><tbody>
{"".join(rows)}
</tbody></table>{more}
</body></html>
"""
    out = Path(out)
    out.write_text(page, encoding="utf-8")
    return out


PLOTS = ("pareto.png", "pareto.html")


def write_artifacts(
    trials: Sequence[FrozenTrial], info: StudyInfo, out_dir: str | Path, *, plots: bool = True,
    front: Collection[int] | None = None,
) -> list[Path]:
    """Write trials.parquet, pareto.parquet and (``plots``, or when missing) pareto.png and
    pareto.html into ``out_dir``; returns the four paths. ``front``: as for :func:`trials_table`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = trials_table(trials, info, front)
    paths = [
        write_table(table, out_dir / "trials.parquet"),
        write_table(table.filter(table.column("pareto")), out_dir / "pareto.parquet"),
    ]
    png, page = (out_dir / name for name in PLOTS)
    if plots or not png.exists() or not page.exists():  # one figure for both (as plot_png and plot_html draw it)
        pts = _points(table, info)
        fig, tips = _figure(pts, info)
        _save_png(fig, png)
        _save_html(pts, info, _svg_with_tips(fig, tips), page)
    return [*paths, png, page]
