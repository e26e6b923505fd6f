"""Turn a reproduction study's trials into the table and plot of docs/reproductions.md.

    python examples/reproduce/report.py STUDY [--dir runs] [--out DIR] [--table trials.parquet]

STUDY is one of the specs in this folder (its ``[study] name``). The trials come from the
study's storage under ``--dir`` (the same rows as ``dse export STUDY --out trials.parquet``)
or from an exported Parquet file (``--table``). Writes ``<out>/<study>.md`` (a Markdown
table) and ``<out>/<study>.png`` (the plot), default ``<dir>/<study>/report/``, and prints
the table.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

Row = dict[str, Any]


def m(row: Row, name: str) -> float:
    """Metric ``name`` of a trial row (NaN when absent)."""
    v = row.get(f"metrics.{name}")
    return float("nan") if v is None else float(v)


def p(row: Row, name: str) -> Any:
    """Parameter ``name`` of a trial row (None when the trial did not set it)."""
    return row.get(f"params.{name}")


def f(x: float, spec: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


@dataclass
class Report:
    """How one study (or several, ``studies``) becomes a table (header + row function) and a
    plot. Rows of several studies carry their study's name under ``"study"``."""

    header: list[str]
    row: Callable[[Row, list[Row]], list[str]]
    plot: Callable[[list[Row], Any], None]
    select: Callable[[list[Row]], list[Row]] = lambda rows: rows
    studies: tuple[str, ...] = ()


# ---------------------------------------------------------------- PLENA iso-resources
def _wl(r: Row) -> str:
    o = p(r, "workload.output_len")
    return (f"{p(r, 'workload.model')} ({p(r, 'workload.batch')}, "
            f"{p(r, 'workload.prompt_len') // 1024}k, {o // 1024 if o >= 1024 else o}"
            f"{'k' if o >= 1024 else ''})")


def _plena_plot(rows: list[Row], ax: Any) -> None:
    cols = [("speedup_vs_a100_iso", "A100-iso"), ("speedup_vs_tpu_v6e_iso", "TPU-iso serial"),
            ("speedup_vs_tpu_v6e_piped", "TPU-iso pipelined"),
            ("speedup_vs_a100_iso_mx", "A100-iso, MX formats")]
    w = 0.8 / len(cols)
    for i, (c, label) in enumerate(cols):
        ax.bar([j + i * w for j in range(len(rows))], [m(r, c) for r in rows], w, label=label)
    ax.axhline(2.2, color="k", ls="--", lw=1, label="paper: 2.2x A100")
    ax.axhspan(3.9, 4.7, color="grey", alpha=0.2, label="paper: 3.9-4.7x TPU v6e")
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(rows))], [_wl(r) for r in rows],
                  rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("PLENA throughput / baseline")
    ax.set_yscale("log")


PLENA_ISO = Report(
    ["workload (batch, S, O)", "PLENA tok/s", "vs A100-iso", "vs TPU-iso (serial folds)",
     "vs TPU-iso (pipelined folds)", "vs A100-iso in MX formats"],
    lambda r, _: [_wl(r), f(m(r, "tokens_per_s"), ".0f"),
                  *(f(m(r, c), ".2f") + "x" for c in (
                      "speedup_vs_a100_iso", "speedup_vs_tpu_v6e_iso",
                      "speedup_vs_tpu_v6e_piped", "speedup_vs_a100_iso_mx"))],
    _plena_plot)


# ---------------------------------------------------------------- BitDecoding
def _kv_label(r: Row) -> str:
    lay = "K/channel" if p(r, "quant.kv_k_layout") == "channel" else "K/token"
    win = p(r, "quant.kv_window") or 0
    return f"{p(r, 'quant.kv')} {lay}" + (f" +window {win}" if win else "")


def _bf16(rows: list[Row]) -> Row:
    return next(r for r in rows if p(r, "quant.kv") == "bf16")


def _bitdecoding_plot(rows: list[Row], ax: Any) -> None:
    base = _bf16(rows) if any(p(r, "quant.kv") == "bf16" for r in rows) else rows[0]
    xs = [m(r, "kv_bits") for r in rows]
    ax.scatter(xs, [m(base, "tpot_s") / m(r, "tpot_s") for r in rows], label="PLENA")
    ax.scatter(xs, [m(base, "a100_tpot_s") / m(r, "a100_tpot_s") for r in rows], marker="s",
               label="A100")
    ax.set_xlabel("KV bits per element")
    ax.set_ylabel("decode speed-up vs bf16 KV")
    ax2 = ax.twinx()
    ax2.scatter(xs, [m(r, "perplexity") for r in rows], marker="x", color="k",
                label="char_lm perplexity")
    ax2.set_ylabel("char_lm perplexity (x)")


def _bitdecoding_row(r: Row, rows: list[Row]) -> list[str]:
    b = _bf16(rows) if any(p(x, "quant.kv") == "bf16" for x in rows) else r
    return [_kv_label(r), f(m(r, "kv_bits"), ".2f"), f(m(r, "perplexity"), ".3f"),
            f(m(r, "kl_to_fp_nats"), ".3f"), f(m(r, "tpot_s") * 1e3, ".2f"),
            f(m(b, "tpot_s") / m(r, "tpot_s"), ".2f") + "x",
            f(m(r, "a100_tpot_s") * 1e3, ".2f"),
            f(m(b, "a100_tpot_s") / m(r, "a100_tpot_s"), ".2f") + "x"]


BITDECODING = Report(
    ["KV format, layout", "kv_bits", "char_lm ppl", "KL nats", "PLENA TPOT ms",
     "PLENA vs bf16 KV", "A100 TPOT ms", "A100 vs bf16 KV"], _bitdecoding_row,
    _bitdecoding_plot)


# ---------------------------------------------------------------- LQER
def _lqer_row(r: Row, rows: list[Row]) -> list[str]:
    fp = [x for x in rows if p(x, "quant.weights") == "fp32"]
    plain = [x for x in rows if p(x, "quant.weights") == p(r, "quant.weights")
             and not p(x, "quant.lqer.rank")]
    closed = "-"
    if fp and plain and p(r, "quant.weights") != "fp32":
        gap = m(plain[0], "perplexity") - m(fp[0], "perplexity")
        if gap > 0:
            closed = f"{100 * (m(plain[0], 'perplexity') - m(r, 'perplexity')) / gap:.0f} %"
    return [f"W {p(r, 'quant.weights')} / A {p(r, 'quant.acts')}",
            str(p(r, "quant.lqer.rank") or 0), f(m(r, "avg_weight_bits"), ".2f"),
            f(m(r, "perplexity"), ".3f"), f(m(r, "kl_to_fp_nats"), ".4f"), closed]


def _lqer_plot(rows: list[Row], ax: Any) -> None:
    for w in sorted({p(r, "quant.weights") for r in rows} - {"fp32"}):
        sel = sorted((r for r in rows if p(r, "quant.weights") == w),
                     key=lambda r: p(r, "quant.lqer.rank") or 0)
        ax.plot([m(r, "avg_weight_bits") for r in sel], [m(r, "perplexity") for r in sel],
                "o-", label=f"{w} weights, mxint8 acts, rank 0..32")
    for r in rows:
        if p(r, "quant.weights") == "fp32":
            ax.axhline(m(r, "perplexity"), color="k", ls="--", lw=1, label="fp32")
    ax.set_xlabel("average weight bits (LQER factors included)")
    ax.set_ylabel("char_lm perplexity")


LQER = Report(["formats", "LQER rank", "avg_weight_bits", "perplexity", "KL nats",
               "gap to fp32 closed"], _lqer_row, _lqer_plot)


# ---------------------------------------------------------------- block quantization
def _family(fmt: str) -> str:
    return "MXINT" if fmt.startswith("mxint") else "BFP" if fmt.startswith("bfp") else \
        "per-tensor int" if fmt.startswith("int") else fmt


def _blockquant_row(r: Row, _: list[Row]) -> list[str]:
    from quant import multiplier_cost

    fmt = str(p(r, "quant.weights"))
    return [fmt, _family(fmt), f(m(r, "avg_weight_bits"), ".2f"), f(m(r, "perplexity"), ".3f"),
            f(m(r, "kl_to_fp_nats"), ".4f"), f(m(r, "memory_density"), ".2f"),
            f(1.0 / multiplier_cost(fmt, fmt), ".2f")]


def _blockquant_plot(rows: list[Row], ax: Any) -> None:
    for fam in ("per-tensor int", "MXINT", "BFP"):
        sel = sorted((r for r in rows if _family(str(p(r, "quant.weights"))) == fam),
                     key=lambda r: m(r, "avg_weight_bits"))
        ax.plot([m(r, "avg_weight_bits") for r in sel], [m(r, "perplexity") for r in sel],
                "o-", label=fam)
    for r in rows:
        if p(r, "quant.weights") == "fp32":
            ax.axhline(m(r, "perplexity"), color="k", ls="--", lw=1, label="fp32")
    ax.set_xlabel("bits per weight (scales included)")
    ax.set_ylabel("char_lm perplexity (weights and activations)")
    ax.set_yscale("log")


BLOCKQUANT = Report(["format (W and A)", "family", "avg_weight_bits", "perplexity", "KL nats",
                     "memory density", "arithmetic density (int8 = 1)"],
                    _blockquant_row, _blockquant_plot)


# ---------------------------------------------------------------- SPEFT
def _speft_label(r: Row) -> str:
    if not p(r, "finetune.steps"):
        return "no fine-tune"
    if p(r, "finetune.params") == "masked":
        return "all kept weights"
    return f"{100 * p(r, 'finetune.density'):g} % by {p(r, 'finetune.salience')}"


def _speft_plot(rows: list[Row], ax: Any) -> None:
    ax.bar(range(len(rows)), [m(r, "accuracy") for r in rows])
    ax.set_xticks(range(len(rows)), [_speft_label(r) for r in rows], rotation=20, ha="right",
                  fontsize=8)
    ax.set_ylabel("glyph CNN top-1, density 0.5")
    ax.set_ylim(0, 1)


SPEFT = Report(["what is fine-tuned (100 steps)", "top-1", "loss nats", "KL nats"],
               lambda r, _: [_speft_label(r), f(100 * m(r, "accuracy"), ".1f") + " %",
                             f(m(r, "loss_nats"), ".3f"), f(m(r, "kl_to_fp_nats"), ".3f")],
               _speft_plot)


# ---------------------------------------------------------------- MXInt ViT
def _vit_plot(rows: list[Row], ax: Any) -> None:
    for fam in ("per-tensor int", "MXINT"):
        sel = sorted((r for r in rows if _family(str(p(r, "quant.weights"))) == fam),
                     key=lambda r: m(r, "avg_weight_bits"))
        ax.plot([m(r, "avg_weight_bits") for r in sel], [m(r, "accuracy") for r in sel],
                "o-", label=fam)
    for r in rows:
        if p(r, "quant.weights") == "fp32":
            ax.axhline(m(r, "accuracy"), color="k", ls="--", lw=1, label="fp32")
    ax.set_xlabel("bits per weight (scales included)")
    ax.set_ylabel("glyph ViT top-1")


MXINT_VIT = Report(
    ["format (W and A)", "avg_weight_bits", "top-1", "KL nats", "images/s", "DSP",
     "images/s/DSP", "fits ZCU102"],
    lambda r, _: [str(p(r, "quant.weights")), f(m(r, "avg_weight_bits"), ".2f"),
                  f(100 * m(r, "accuracy"), ".1f") + " %", f(m(r, "kl_to_fp_nats"), ".3f"),
                  f(m(r, "images_per_s"), ",.0f"), f(m(r, "dsp"), ".0f"),
                  f(m(r, "images_per_s_per_dsp"), ",.1f"),
                  "yes" if m(r, "fits_device") >= 1 else "no"],
    _vit_plot)


# ---------------------------------------------------------------- HASS
def _hass_select(rows: list[Row]) -> list[Row]:
    front = sorted((r for r in rows if r.get("pareto") and r["number"] != 0),
                   key=lambda r: -m(r, "accuracy"))
    return [r for r in rows if r["number"] == 0] + front


def _hass_plot(rows: list[Row], ax: Any) -> None:
    ax.scatter([m(r, "images_per_s_per_dsp") for r in rows], [m(r, "accuracy") for r in rows],
               s=8, color="grey", label="all trials")
    front = _hass_select(rows)
    ax.scatter([m(r, "images_per_s_per_dsp") for r in front],
               [m(r, "accuracy") for r in front], color="C1", label="baseline + front")
    ax.set_xlabel("images/s per DSP (ZCU102)")
    ax.set_ylabel("glyph CNN top-1")


HASS = Report(
    ["design", "weights", "top-1", "DSP", "BRAM18", "images/s", "images/s/DSP",
     "zero-product share"],
    lambda r, _: ["baseline (densities 1, thresholds 0)" if r["number"] == 0 else "front",
                  str(p(r, "quant.weights")), f(100 * m(r, "accuracy"), ".1f") + " %",
                  f(m(r, "dsp"), ".0f"), f(m(r, "bram18"), ".0f"),
                  f(m(r, "images_per_s"), ",.0f"), f(m(r, "images_per_s_per_dsp"), ",.0f"),
                  f(m(r, "zero_product_share"), ".2f")],
    _hass_plot, _hass_select)


# ---------------------------------------------------------------- quantization ratio
SIZES = {"ratio_s": "char_lm_s (0.43 M)", "ratio_m": "char_lm_m (1.8 M)",
         "ratio_l": "char_lm_l (6.4 M)"}
#: a ratio "tolerated" when perplexity is at most this much above the all-bf16 model
RATIO_TOLERANCE = 0.02


def _ratio_base(r: Row, rows: list[Row]) -> float:
    return next(m(x, "perplexity") for x in rows
                if x["study"] == r["study"] and not p(x, "quant.ratio"))


def _ratio_select(rows: list[Row]) -> list[Row]:
    return [r for r in rows if p(r, "quant.ratio")]


def _ratio_row(r: Row, rows: list[Row]) -> list[str]:
    base = _ratio_base(r, rows)
    ok = [p(x, "quant.ratio") for x in rows if x["study"] == r["study"]
          and p(x, "quant.weights") == p(r, "quant.weights") and p(x, "quant.ratio")
          and m(x, "perplexity") <= base * (1 + RATIO_TOLERANCE)]
    return [SIZES.get(r["study"], r["study"]), str(p(r, "quant.weights")),
            f(p(r, "quant.ratio"), "g"), f(m(r, "quant_ratio_params"), ".2f"),
            f(m(r, "perplexity"), ".3f"),
            f(100 * (m(r, "perplexity") / base - 1), "+.1f") + " %",
            f(m(r, "kl_to_fp_nats"), ".3f"), f(max(ok), "g") if ok else "0"]


def _ratio_plot(rows: list[Row], ax: Any) -> None:
    for i, study in enumerate(s for s in SIZES if any(r["study"] == s for r in rows)):
        for fmt, ls in (("int4", "-"), ("int3", "--")):
            sel = sorted((r for r in rows if r["study"] == study
                          and (p(r, "quant.weights") == fmt or not p(r, "quant.ratio"))),
                         key=lambda r: m(r, "quant_ratio_params"))
            if not sel:
                continue
            base = _ratio_base(sel[0], rows)
            ax.plot([m(r, "quant_ratio_params") for r in sel],
                    [100 * (m(r, "perplexity") / base - 1) for r in sel], ls, marker="o",
                    color=f"C{i}", label=f"{SIZES[study]}, {fmt}")
    ax.axhline(100 * RATIO_TOLERANCE, color="k", lw=1, ls=":", label="+2 % tolerance")
    ax.set_xlabel("share of weight parameters in the low format")
    ax.set_ylabel("perplexity increase over all-bf16, %")
    ax.set_yscale("symlog", linthresh=1.0)


RATIO = Report(["model", "low format", "quant.ratio", "achieved share", "perplexity",
                "vs all bf16", "KL nats", "largest ratio within +2 %"],
               _ratio_row, _ratio_plot, _ratio_select, studies=tuple(SIZES))


REPORTS: dict[str, Report] = {
    "plena_iso": PLENA_ISO, "bitdecoding": BITDECODING, "lqer": LQER,
    "blockquant": BLOCKQUANT, "speft": SPEFT, "mxint_vit": MXINT_VIT, "hass": HASS,
    "ratio": RATIO,
}


def study_names(report: str) -> tuple[str, ...]:
    """The studies a report reads (its own name unless it lists several)."""
    return REPORTS[report].studies or (report,)


def load_rows(report: str, root: Path, tables: list[Path] | None = None) -> list[Row]:
    """COMPLETE trials of the report's studies (study order, then trial order), as dicts of
    trials.parquet columns plus ``"study"``. ``tables``: exported Parquet files, one per
    study in :func:`study_names` order, instead of the storage under ``root``. Studies not
    run (yet) are skipped."""
    out: list[Row] = []
    for i, study in enumerate(study_names(report)):
        if tables:
            import pyarrow.parquet as pq

            if i >= len(tables):
                break
            rows = pq.read_table(tables[i]).to_pylist()
        else:
            import dse

            if not (root / study).is_dir():
                continue
            rows = dse.load(study, root=root).table().to_pylist()
        done = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: r["number"])
        out += [{**r, "study": study} for r in done]
    return out


def render(study: str, rows: list[Row]) -> str:
    """The study's Markdown table."""
    rep = REPORTS[study]
    lines = ["| " + " | ".join(rep.header) + " |", "|" + "---|" * len(rep.header)]
    for r in rep.select(rows):
        line = "| " + " | ".join(rep.row(r, rows)) + " |"
        if line != lines[-1]:  # trials identical in every reported column: one line
            lines.append(line)
    return "\n".join(lines) + "\n"


def plot(study: str, rows: list[Row], path: Path) -> None:
    """The study's plot as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    REPORTS[study].plot(rows, ax)
    handles, labels = [], []
    for a in fig.axes:
        h, lab = a.get_legend_handles_labels()
        handles += h
        labels += lab
    ax.legend(handles, labels, fontsize=7)
    ax.set_title(study)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study", choices=sorted(REPORTS), help="a report (the ratio report reads "
                    "studies ratio_s, ratio_m, ratio_l)")
    ap.add_argument("--dir", type=Path, default=Path("dse-studies"), help="studies root")
    ap.add_argument("--table", type=Path, nargs="+",
                    help="exported trials.parquet file(s) instead of --dir (one per study)")
    ap.add_argument("--out", type=Path, help="output folder (default <dir>/<study>/report)")
    a = ap.parse_args(argv)
    rows = load_rows(a.study, a.dir, a.table)
    if not rows:
        print(f"report: {a.study}: no COMPLETE trial in {', '.join(study_names(a.study))}",
              file=sys.stderr)
        return 1
    out = a.out or a.dir / a.study / "report"
    out.mkdir(parents=True, exist_ok=True)
    text = render(a.study, rows)
    (out / f"{a.study}.md").write_text(text)
    plot(a.study, rows, out / f"{a.study}.png")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
