"""The ``plena``, ``gpu`` and ``tpu`` evaluators: LLM inference performance simulators.

``plena`` prices the candidate's PLENA design point (``hw.*`` parameters over the ``hw``
option's defaults) running a workload (``workload.*`` parameters over the options) with
the operand formats ``quant.weights``, ``quant.acts``, ``quant.kv`` and the KV-cache layout
``quant.kv_k_layout``, ``quant.kv_v_layout``, ``quant.kv_window`` (docs/simulators.md). Metrics: ``ttft_s``,
``tpot_s``, ``tokens_per_s``, ``prefill_s``, ``decode_s``, ``utilisation`` (and
``utilisation_prefill|decode|overall``), ``hbm_bytes``, ``energy_j``,
``energy_per_token_j``, ``memory_required_bytes``, ``area_mm2``, ``fits_memory`` (1/0);
trial information ``plena_bottleneck`` (the slowest op and what bounds it) and, with
``breakdown = true``, ``plena_ops`` (per-op totals).

``gpu`` (presets ``a100``, ``h100``) and ``tpu`` (preset ``tpu-v6e``) price the same
workload on a baseline, by default in bf16; with ``iso = true`` the baseline gets the
candidate PLENA point's multiplier count, HBM and SRAM. Their metrics carry a prefix
(default ``a100_``, ``a100_iso_``, ``tpu_v6e_iso_``...) so they sit beside PLENA's in one
trial, plus ``speedup_vs_<name>`` = upstream ``tokens_per_s`` / the baseline's when an
earlier evaluator returned ``tokens_per_s``. Options, parameters and metrics: the
schemas below (``dse evaluators plena``, docs/params.md, docs/simulators.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dse.registry import EvalContext
from dse.schema import (
    EvaluatorSchema,
    Metric,
    Option,
    Param,
    Plugin,
    flag,
    positive_int,
    quant_params,
)
from simulators.baselines import PRESETS, GpuSpec, TpuSpec, simulate_baseline
from simulators.plena import Numerics, PlenaHardware, Workload, load_model_config, simulate
from simulators.plena.engine import InferenceResult
from simulators.plena.hardware import INT_FIELDS, NUMERICS_KEYS

_BF16 = {"weights": "bf16", "acts": "bf16", "kv": "bf16"}
_HW_FIELDS = tuple(f.name for f in dataclasses.fields(PlenaHardware))
_QUANT_KEYS = NUMERICS_KEYS


def _model(v: Any) -> None:
    load_model_config(str(v))


def _keys(table: str, allowed: tuple[str, ...]) -> Any:
    def check(v: Mapping[str, Any]) -> None:
        for sub in v:
            if sub not in allowed:
                raise ValueError(f"{table}.{sub} is unknown; expected one of {', '.join(allowed)}")

    return check


_COMMON_OPTIONS = (
    Option("model", "str", "workload: a shipped config name (simulators/configs) or a "
           "config.json path", default="llama-3.1-8b", check=_model),
    positive_int("batch", "workload: sequences per request", default=1),
    positive_int("prompt_len", "workload: prompt tokens per sequence", default=2048),
    positive_int("output_len", "workload: generated tokens per sequence", default=256),
    Option("hw", "table", "PLENA hardware defaults under the hw.* parameters "
           f"({', '.join(_HW_FIELDS)})", default={}, check=_keys("hw", _HW_FIELDS)),
    Option("quant", "table", "operand-format and KV-layout defaults under the quant.* "
           f"parameters ({', '.join(_QUANT_KEYS)})", default={},
           check=_keys("quant", _QUANT_KEYS)),
)
_WORKLOAD_PARAMS = (
    Param("workload.model", "str", "overrides option model"),
    Param("workload.batch", "int", "overrides option batch", low=1),
    Param("workload.prompt_len", "int", "overrides option prompt_len", low=1),
    Param("workload.output_len", "int", "overrides option output_len", low=1),
)
_HW_DOCS = {"mlen": "reduction length of the flattened systolic array, multipliers",
            "blen": "width of the array, output columns", "vlen": "vector-unit width, "
            "elements per cycle", "hlen": "head slice, elements",
            "matrix_sram_bytes": "matrix (weight/KV) SRAM, bytes",
            "vector_sram_bytes": "vector (activation) SRAM, bytes",
            "hbm_gbps": "HBM bandwidth, GB/s", "hbm_gb": "HBM capacity, GB",
            "clock_ghz": "clock, GHz"}


def _hw_params(when: Any = None, when_doc: str = "") -> tuple[Param, ...]:
    return tuple(Param(f"hw.{f}", "int" if f in INT_FIELDS else "float",
                       _HW_DOCS.get(f, "") + " (> 0)", low=1 if f in INT_FIELDS else None,
                       when=when, when_doc=when_doc) for f in _HW_FIELDS)


_PERF_METRICS = (
    ("ttft_s", "time to first token, s"), ("tpot_s", "time per output token, s"),
    ("tokens_per_s", "generated tokens per second"), ("prefill_s", "prefill time, s"),
    ("decode_s", "decode time, s"), ("utilisation", "= utilisation_overall"),
    ("utilisation_prefill", "matrix-unit utilisation in prefill, fraction"),
    ("utilisation_decode", "matrix-unit utilisation in decode, fraction"),
    ("utilisation_overall", "matrix-unit utilisation over the request, fraction"),
    ("hbm_bytes", "HBM traffic of the request, bytes"), ("energy_j", "energy, J"),
    ("energy_per_token_j", "energy per generated token, J"),
    ("memory_required_bytes", "HBM the request needs (weights, KV cache), bytes"),
    ("fits_memory", "1 if memory_required_bytes fits HBM, else 0"),
)


def _finish(kind: str) -> Any:
    def finish(o: dict[str, Any]) -> dict[str, Any]:
        Workload.of(str(o["model"]), o["batch"], o["prompt_len"], o["output_len"])
        try:
            PlenaHardware(**dict(o["hw"]))
        except ValueError as e:
            raise ValueError(f"{kind} option hw: {e}") from None
        if kind != "plena":
            presets = [p for p, s in PRESETS.items() if isinstance(s, GpuSpec) == (kind == "gpu")]
            o["preset"] = o["preset"] or presets[0]
            if o["preset"] not in presets:
                raise ValueError(f"{kind} option preset: expected one of {', '.join(presets)}, "
                                 f"got {o['preset']!r}")
            if o["prefix"] is None:
                o["prefix"] = o["preset"].replace("-", "_") + ("_iso" if o["iso"] else "") + "_"
            o["label"] = o["prefix"].rstrip("_")
            o["quant"] = {**_BF16, **dict(o["quant"])}
        try:
            Numerics(**dict(o["quant"]))
        except ValueError as e:
            raise ValueError(f"{kind} option quant: {e}") from None
        return o

    return finish


def _baseline_schema(kind: str, doc: str) -> EvaluatorSchema:
    presets = tuple(p for p, s in PRESETS.items() if isinstance(s, GpuSpec) == (kind == "gpu"))
    return EvaluatorSchema(
        kind, doc,
        options=(*_COMMON_OPTIONS,
                 Option("preset", "str", "the baseline", choices=presets, default=presets[0]),
                 flag("iso", "scale the baseline to the candidate PLENA point's multipliers, "
                      "HBM and SRAM (reads hw.*)", False),
                 flag("follow_quant", "price the candidate's quant.weights|acts|kv instead "
                      "of bf16", False),
                 Option("prefix", "str", "metric-name prefix (default <preset>[_iso]_)"),
                 flag("pipelined_folds", "TPU: pipelined folds (optimistic) instead of "
                      "SCALE-Sim's serial fold count", False)),
        params=(*_WORKLOAD_PARAMS,
                *_hw_params(lambda o: bool(o["iso"]), "iso = true"),
                *quant_params(_QUANT_KEYS_PARAMS, lambda o: bool(o["follow_quant"]),
                              "follow_quant = true")),
        metrics=(*(Metric("{prefix}" + n, d) for n, d in _PERF_METRICS),
                 Metric("speedup_vs_{label}", "upstream tokens_per_s / the baseline's",
                        when_doc="an earlier evaluator returns tokens_per_s")),
        info=(Metric("{prefix}bottleneck", "the slowest op and what bounds it"),),
        finish=_finish(kind),
        cheap=True,
    )


_QUANT_KEYS_PARAMS = tuple(f"quant.{k}" for k in _QUANT_KEYS)
SCHEMAS = {
    "plena": EvaluatorSchema(
        "plena", "the PLENA LLM inference accelerator (simulators.plena)",
        options=(*_COMMON_OPTIONS,
                 flag("causal_skip", "skip the masked half of causal attention", True),
                 flag("overlap_vector", "run the vector unit concurrently with the matrix "
                      "unit (pipelined) instead of op after op", False),
                 flag("breakdown", "also return plena_ops (per-op totals)", False)),
        params=(*_hw_params(), *_WORKLOAD_PARAMS, *quant_params(_QUANT_KEYS_PARAMS)),
        metrics=(*(Metric(n, d) for n, d in _PERF_METRICS),
                 Metric("area_mm2", "silicon area of the design point, mm2")),
        info=(Metric("plena_bottleneck", "the slowest op and what bounds it"),
              Metric("plena_ops", "per-op totals", when=lambda o: bool(o["breakdown"]),
                     when_doc="breakdown = true")),
        finish=_finish("plena"),
        cheap=True,
    ),
    "gpu": _baseline_schema("gpu", "GPU baseline (A100 / H100 presets) on the same workload"),
    "tpu": _baseline_schema("tpu", "TPU baseline (TPU v6e) on the same workload"),
}


def _workload(o: Mapping[str, Any], params: Mapping[str, Any]) -> Workload:
    return Workload.of(str(params.get("workload.model", o["model"])),
                       int(params.get("workload.batch", o["batch"])),
                       int(params.get("workload.prompt_len", o["prompt_len"])),
                       int(params.get("workload.output_len", o["output_len"])))


def _bottleneck(res: InferenceResult) -> str:
    best = ("", -1.0, "")
    for phase, t in (("prefill", res.prefill_table), ("decode", res.decode_table)):
        times = np.broadcast_to(t.time_s, (len(t.names),))
        i = int(np.argmax(times))
        if times[i] > best[1]:
            bound = "compute" if float(np.broadcast_to(t.compute_s, times.shape)[i]) >= float(
                np.broadcast_to(t.memory_s, times.shape)[i]) else "memory"
            best = (f"{phase}.{t.names[i]}", float(times[i]), bound)
    return f"{best[0]} ({best[2]}-bound, {best[1]:.4g} s)"


class PlenaEvaluator:
    """Warm PLENA simulator for one actor (construction validates options only)."""

    def __init__(self, options: Mapping[str, Any], ctx: EvalContext | None = None) -> None:
        self.o = SCHEMAS["plena"].check_options(options)

    def evaluate(self, params: Mapping[str, Any], upstream: Mapping[str, Any]
                 ) -> dict[str, Any]:
        """Metrics of the candidate's PLENA point (see module docstring)."""
        hw = PlenaHardware.from_params(params, self.o["hw"])
        if hw.shape != ():
            raise ValueError(f"hw.*: expected scalar parameters, got shape {hw.shape}")
        numerics = Numerics.from_params(params, self.o["quant"])
        res = simulate(hw, _workload(self.o, params), numerics,
                       causal_skip=self.o["causal_skip"],
                       overlap_vector=self.o["overlap_vector"])
        out: dict[str, Any] = dict(res.metrics())
        out["plena_bottleneck"] = _bottleneck(res)
        if self.o["breakdown"]:
            out["plena_ops"] = res.breakdown()
        return out


    def evaluate_batch(self, params: Sequence[Mapping[str, Any]],
                       upstream: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """:meth:`evaluate` of many candidates, vectorised: the candidates sharing operand
        formats and workload are priced in one :func:`simulate` call over their hardware
        points (numpy arrays), each result then read out point by point; equal to the
        scalar results value for value (tests/test_plena.py)."""
        if self.o["breakdown"] or len(params) < 2:
            return [self.evaluate(p, u) for p, u in zip(params, upstream, strict=True)]
        groups: dict[tuple[Any, ...], list[int]] = {}
        hws = [PlenaHardware.from_params(p, self.o["hw"]) for p in params]
        for i, (p, hw) in enumerate(zip(params, hws, strict=True)):
            if hw.shape != ():
                raise ValueError(f"hw.*: expected scalar parameters, got shape {hw.shape}")
            q, w = Numerics.from_params(p, self.o["quant"]), _workload(self.o, p)
            key = (q, w)
            groups.setdefault(key, []).append(i)
        out: list[dict[str, Any]] = [{} for _ in params]
        names = [f.name for f in dataclasses.fields(PlenaHardware)]
        for key, idx in groups.items():
            if len(idx) == 1:  # one point: the scalar path is cheaper
                out[idx[0]] = self.evaluate(params[idx[0]], upstream[idx[0]])
                continue
            q, w = key
            hw = PlenaHardware(**{n: np.array([getattr(hws[i], n) for i in idx]) for n in names})
            res = simulate(hw, w, q, causal_skip=self.o["causal_skip"],
                           overlap_vector=self.o["overlap_vector"])
            for j, i in enumerate(idx):
                r = res.point(j)
                out[i] = dict(r.metrics())
                out[i]["plena_bottleneck"] = _bottleneck(r)
        return out


class BaselineEvaluator:
    """GPU or TPU baseline priced on the same op graph (metrics prefixed)."""

    def __init__(self, options: Mapping[str, Any], kind: str) -> None:
        self.kind = kind
        self.o = SCHEMAS[kind].check_options(options)

    def evaluate(self, params: Mapping[str, Any], upstream: Mapping[str, Any]
                 ) -> dict[str, Any]:
        """Prefixed metrics of the baseline, plus the speedup of the upstream point."""
        spec: GpuSpec | TpuSpec = PRESETS[self.o["preset"]]
        if isinstance(spec, TpuSpec) and self.o["pipelined_folds"]:
            spec = dataclasses.replace(spec, pipelined_folds=True)
        if self.o["iso"]:
            spec = spec.iso_resources(PlenaHardware.from_params(params, self.o["hw"]))
        q = Numerics.from_params(params, self.o["quant"]) if self.o["follow_quant"] \
            else Numerics(**self.o["quant"])
        res = simulate_baseline(spec, _workload(self.o, params), q)
        p = self.o["prefix"]
        out: dict[str, Any] = {f"{p}{k}": v for k, v in res.metrics().items()
                               if not np.isnan(v)}
        tps = upstream.get("tokens_per_s")
        if isinstance(tps, int | float) and not isinstance(tps, bool):
            out[f"speedup_vs_{p.rstrip('_')}"] = float(tps) / out[f"{p}tokens_per_s"]
        out[f"{p}bottleneck"] = _bottleneck(res)
        return out


plena = Plugin(SCHEMAS["plena"], lambda o, ctx: PlenaEvaluator(o, ctx))
gpu = Plugin(SCHEMAS["gpu"], lambda o, ctx: BaselineEvaluator(o, "gpu"))
tpu = Plugin(SCHEMAS["tpu"], lambda o, ctx: BaselineEvaluator(o, "tpu"))
