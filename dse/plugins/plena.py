"""The ``plena``, ``gpu`` and ``tpu`` evaluators: LLM inference performance simulators.

``plena`` prices the candidate's PLENA design point (``hw.*`` parameters over the ``hw``
option's defaults) running a workload (``workload.*`` parameters over the options) with
the operand formats ``quant.weights``, ``quant.acts``, ``quant.kv``. Metrics: ``ttft_s``,
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
earlier evaluator returned ``tokens_per_s``. Options: see docs/simulators.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from dse.registry import EvalContext
from simulators.baselines import PRESETS, GpuSpec, TpuSpec, simulate_baseline
from simulators.plena import Numerics, PlenaHardware, Workload, load_model_config, simulate
from simulators.plena.engine import InferenceResult

_COMMON = {"model": "llama-3.1-8b", "batch": 1, "prompt_len": 2048, "output_len": 256,
           "hw": {}, "quant": {}}
_PLENA = {**_COMMON, "causal_skip": True, "breakdown": False}
_BASE = {**_COMMON, "preset": None, "iso": False, "follow_quant": False, "prefix": None,
         "pipelined_folds": False}
_BF16 = {"weights": "bf16", "acts": "bf16", "kv": "bf16"}


def _check(options: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """Validate ``options`` of evaluator ``kind``; return them with defaults filled in."""
    allowed = _PLENA if kind == "plena" else _BASE
    for key in options:
        if key not in allowed:
            raise ValueError(f"{kind} option {key!r} is unknown; expected one of "
                             f"{', '.join(allowed)}")
    o = {**allowed, **options}
    load_model_config(str(o["model"]))
    Workload.of(str(o["model"]), o["batch"], o["prompt_len"], o["output_len"])
    allowed_keys = {"hw": [f.name for f in dataclasses.fields(PlenaHardware)],
                    "quant": ["weights", "acts", "kv"]}
    for key, names in allowed_keys.items():
        if not isinstance(o[key], Mapping):
            raise ValueError(f"{kind} option {key}: expected a table, got {o[key]!r}")
        for sub in o[key]:
            if sub not in names:
                raise ValueError(f"{kind} option {key}.{sub} is unknown; expected one of "
                                 f"{', '.join(names)}")
    PlenaHardware(**dict(o["hw"]))
    if kind != "plena":
        presets = [p for p, s in PRESETS.items() if isinstance(s, GpuSpec) == (kind == "gpu")]
        o["preset"] = o["preset"] or presets[0]
        if o["preset"] not in presets:
            raise ValueError(f"{kind} option preset: expected one of {', '.join(presets)}, "
                             f"got {o['preset']!r}")
        if o["prefix"] is None:
            o["prefix"] = o["preset"].replace("-", "_") + ("_iso" if o["iso"] else "") + "_"
        if not isinstance(o["prefix"], str):
            raise ValueError(f"{kind} option prefix: expected a string, got {o['prefix']!r}")
        o["quant"] = {**_BF16, **dict(o["quant"])}
    Numerics(**dict(o["quant"]))
    for key in ("causal_skip", "breakdown", "iso", "follow_quant", "pipelined_folds"):
        if key in o and not isinstance(o[key], bool):
            raise ValueError(f"{kind} option {key}: expected true or false, got {o[key]!r}")
    return o


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
        self.o = _check(options, "plena")

    def evaluate(self, params: Mapping[str, Any], upstream: Mapping[str, Any]
                 ) -> dict[str, Any]:
        """Metrics of the candidate's PLENA point (see module docstring)."""
        hw = PlenaHardware.from_params(params, self.o["hw"])
        if hw.shape != ():
            raise ValueError(f"hw.*: expected scalar parameters, got shape {hw.shape}")
        numerics = Numerics.from_params(params, self.o["quant"])
        res = simulate(hw, _workload(self.o, params), numerics,
                       causal_skip=self.o["causal_skip"])
        out: dict[str, Any] = dict(res.metrics())
        out["plena_bottleneck"] = _bottleneck(res)
        if self.o["breakdown"]:
            out["plena_ops"] = res.breakdown()
        return out


class BaselineEvaluator:
    """GPU or TPU baseline priced on the same op graph (metrics prefixed)."""

    def __init__(self, options: Mapping[str, Any], kind: str) -> None:
        self.kind = kind
        self.o = _check(options, kind)

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


def plena(options: dict[str, Any], ctx: EvalContext) -> PlenaEvaluator:
    """Factory of the ``plena`` evaluator."""
    return PlenaEvaluator(options, ctx)


def gpu(options: dict[str, Any], ctx: EvalContext) -> BaselineEvaluator:
    """Factory of the ``gpu`` evaluator (A100 / H100 presets)."""
    return BaselineEvaluator(options, "gpu")


def tpu(options: dict[str, Any], ctx: EvalContext) -> BaselineEvaluator:
    """Factory of the ``tpu`` evaluator (TPU v6e preset)."""
    return BaselineEvaluator(options, "tpu")


plena.validate_options = lambda options: _check(options, "plena")  # type: ignore[attr-defined]
gpu.validate_options = lambda options: _check(options, "gpu")  # type: ignore[attr-defined]
tpu.validate_options = lambda options: _check(options, "tpu")  # type: ignore[attr-defined]
