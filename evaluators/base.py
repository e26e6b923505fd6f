"""Shared machinery of the accuracy evaluators: candidate transform, caching, fidelity.

An evaluator holds one model (loaded once, never mutated) and, per candidate, builds a
transformed copy through ``quant`` (``apply_sparsity`` then ``quantize_model``), measures
it, and caches the result on disk under a key of the candidate's ``quant.*`` and
``sparsity.*`` parameters plus the evaluator's identity.

Fidelity levels:

* ``proxy``: weight SQNR and the metrics on one small batch (seconds-cheap);
* ``full``: the metrics on the full budget;
* ``gated``: the proxy first; the full run only when the proxy's KL to the unquantized
  model is at most ``gate_kl_nats`` (a hopeless candidate keeps its proxy numbers).

The result's ``fidelity`` entry (a string, kept as trial information) says which level
produced the metrics.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from evaluators.cache import ResultCache, cache_key, software_params
from evaluators.kinds import FIDELITIES
from evaluators.sparsity_stats import effective_weight, quantized_input, weighted_modules
from quant import LQERCache, QLinear

#: SQNR reported when a weight is reproduced exactly (fp32): a finite stand-in for +inf.
SQNR_CAP_DB = 300.0


class EvaluationError(RuntimeError):
    """A candidate produced no usable metric (NaN/inf); the message gives the reason."""


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, restoring the previous count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def check_options(fidelity: str, gate_kl_nats: float, num_threads: int) -> None:
    """Validate the options every evaluator shares (one-line ``ValueError`` naming it)."""
    if fidelity not in FIDELITIES:
        raise ValueError(f"fidelity: expected one of {', '.join(FIDELITIES)}, got {fidelity!r}")
    if not (isinstance(gate_kl_nats, int | float) and gate_kl_nats >= 0):
        raise ValueError(f"gate_kl_nats: expected a number >= 0, got {gate_kl_nats!r}")
    if not (isinstance(num_threads, int) and num_threads >= 1):
        raise ValueError(f"num_threads: expected an integer >= 1, got {num_threads!r}")


def weight_signal(ref: nn.Module) -> dict[str, float]:
    """Per-layer ``||W||^2`` (float64 sum of float32 squares) of every Linear/Conv2d weight;
    the signal term of :func:`weight_sqnr_db`, computed once per unquantized model."""
    out: dict[str, float] = {}
    for name, m in weighted_modules(ref).items():
        out[name] = _sum_sq(m.weight.detach().float())
    return out


def _sum_sq(t: torch.Tensor) -> float:
    """Sum of squares of a float32 tensor: float32 sums per row, then a float64 sum of
    the rows (within ~1e-9 relative of an all-float64 sum, 2-3x faster)."""
    sq = t.pow(2) if t.dim() < 2 else t.pow(2).flatten(1).sum(-1)
    return sq.sum(dtype=torch.float64).item()


def weight_sqnr_db(
    ref: nn.Module, cand: nn.Module, signal: Mapping[str, float] | None = None
) -> tuple[float, dict[str, float]]:
    """Signal-to-quantization-noise ratio of the candidate's weights, in dB.

    Overall: 10 log10(sum ||W||^2 / sum ||W - Wq||^2) over every Linear/Conv2d weight
    (capped at :data:`SQNR_CAP_DB`); also per layer. ``signal``: the reference's
    :func:`weight_signal`, when already known (an evaluator keeps it). A candidate layer
    that still holds the reference's own weight tensor (and no LQER factors) has zero
    noise without computing it.
    """
    rw = weighted_modules(ref)
    cw = weighted_modules(cand)
    sig_of = signal if signal is not None else weight_signal(ref)
    sig = noise = 0.0
    per: dict[str, float] = {}
    for name, m in rw.items():
        if name not in cw:
            continue
        cm = cw[name]
        if cm.weight is m.weight and getattr(cm, "lqer_A", None) is None:
            e = 0.0
        else:
            e = _sum_sq(effective_weight(cm).float() - m.weight.detach().float())
        s = sig_of[name]
        sig += s
        noise += e
        per[name] = SQNR_CAP_DB if e == 0 else min(SQNR_CAP_DB, 10 * math.log10(s / e))
    overall = SQNR_CAP_DB if noise == 0 else min(SQNR_CAP_DB, 10 * math.log10(sig / noise))
    return overall, per


class ActSparsityMeter:
    """Counts exact-zero inputs of every Linear/Conv2d while attached (forward pre-hooks)."""

    def __init__(self, model: nn.Module) -> None:
        self.zeros: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self._handles = []
        for name, m in weighted_modules(model).items():
            self._handles.append(m.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            # a QLinear keeps the quantized input for its own forward (no second quantize)
            x = (mod.quantized_input(args[0]) if isinstance(mod, QLinear)
                 else quantized_input(mod, args[0]))
            self.zeros[name] = (self.zeros.get(name, 0) + x.numel()
                                - int(torch.count_nonzero(x)))
            self.total[name] = self.total.get(name, 0) + x.numel()

        return hook

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def per_layer(self) -> dict[str, float]:
        """Share of exact-zero input activations per layer (fraction in [0, 1])."""
        return {n: self.zeros[n] / self.total[n] for n in self.total if self.total[n]}

    def overall(self) -> float:
        """Share of exact-zero input activations over all layers (element-weighted)."""
        t = sum(self.total.values())
        return sum(self.zeros.values()) / t if t else 0.0


def weight_sparsity(model: nn.Module) -> tuple[float, dict[str, float]]:
    """Share of exact-zero effective weights: overall (parameter-weighted) and per layer."""
    per: dict[str, float] = {}
    z = n = 0
    for name, m in weighted_modules(model).items():
        w = effective_weight(m)
        zi = w.numel() - int(torch.count_nonzero(w))
        per[name] = zi / w.numel()
        z += zi
        n += w.numel()
    return (z / n if n else 0.0), per


class AccuracyEvaluator:
    """Base class: subclasses provide data and :meth:`_measure`.

    Args:
        model: the unquantized model (moved to eval mode, gradients off; never mutated).
        identity: what, besides the parameters, determines a result (model digest, data
            digest, budget ...); part of every cache key.
        cache_dir: result cache directory (``None``: no cache).
        fidelity: ``proxy`` | ``full`` | ``gated``; gate_kl_nats: the gate of ``gated``.
        num_threads: torch threads while evaluating (default 1).
        seed: seed of every random choice (random salience).
    """

    name = "base"

    def __init__(
        self, model: nn.Module, identity: Mapping[str, Any], cache_dir: str | os.PathLike[str] | None,
        fidelity: str = "full", gate_kl_nats: float = 1.0, num_threads: int = 1, seed: int = 0,
    ) -> None:
        check_options(fidelity, gate_kl_nats, num_threads)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.fidelity = fidelity
        self.gate_kl_nats = float(gate_kl_nats)
        self.num_threads = num_threads
        self.seed = seed
        self._identity = {**identity, "fidelity": fidelity, "seed": seed,
                          **({"gate_kl_nats": self.gate_kl_nats} if fidelity == "gated" else {})}
        self.cache = ResultCache(cache_dir)
        # LQER: each layer's SVD once per (weights, format, scaling), reused across ranks and
        # candidates, in memory and beside the results (<cache_dir>/lqer/)
        self.lqer_cache = LQERCache(Path(cache_dir) / "lqer" if cache_dir is not None else None)
        self._input_scales: dict[str, torch.Tensor] | None = None
        self._finetune_info: dict[str, float] | None = None
        self._names = [n for n, _ in self.model.named_modules() if n]
        self._weight_signal: dict[str, float] | None = None

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict[str, Any]:
        """The evaluator identity that enters every cache key."""
        return dict(self._identity)

    def key(self, params: Mapping[str, Any]) -> str:
        """Cache key of ``params`` for this evaluator."""
        return cache_key(params, self._identity)

    # ------------------------------------------------------------------ checks
    def check_params(self, params: Mapping[str, Any]) -> None:
        """Reject a candidate naming layers this model does not have.

        Raises:
            ValueError: ``quant.layer.<pattern>.*`` / ``sparsity.layer.<pattern>.*`` whose
                pattern matches no module of the model.
        """
        from fnmatch import fnmatchcase

        for key in params:
            for prefix in ("quant.layer.", "sparsity.layer."):
                if key.startswith(prefix):
                    pattern = key[len(prefix):].rpartition(".")[0]
                    if not any(fnmatchcase(n, pattern) for n in self._names):
                        examples = ", ".join(self._names[:4])
                        raise ValueError(
                            f"{key}: layer pattern {pattern!r} matches no module of "
                            f"{self.name} (module names look like: {examples}, ...)"
                        )

    # ------------------------------------------------------------------ transform
    def calibration_inputs(self) -> list[Any]:
        """Calibration batches for the transforms (salience, LQER scales, act statistics).

        Drawn from a calibration split disjoint from every evaluated window / image (see
        docs/evaluators.md, "Calibration split"); the same list object on every call.
        """
        raise NotImplementedError

    def calibration_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Differentiable loss of ``model`` on one calibration batch (for salience)."""
        raise NotImplementedError

    def finetune_batches(self, n: int) -> list[Any]:
        """``n`` deterministic fine-tuning batches from the calibration (training) split,
        never from evaluated data."""
        raise NotImplementedError

    def finetune_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Differentiable training loss of ``model`` on one fine-tuning batch."""
        raise NotImplementedError

    def transform(self, params: Mapping[str, Any]) -> tuple[nn.Module, Any, Any]:
        """A transformed copy of the model for ``params``: ``(model, quant_report, sparsity_report)``.

        The evaluator's own model is left untouched.
        """
        import quant

        self.check_params(params)
        qcfg = quant.QuantConfig.from_params(params, seed=self.seed)
        scfg = quant.SparsityConfig.from_params(params, seed=self.seed)
        calib = self.calibration_inputs()
        fcfg = quant.FinetuneConfig.from_params(params, seed=self.seed)
        model, srep = self.model, None
        if scfg != quant.SparsityConfig(seed=self.seed):  # a no-op mask needs no copy
            with torch.enable_grad():
                model, srep = quant.apply_sparsity(self.model, scfg, calib=calib,
                                                   loss_fn=self.calibration_loss)
        self._finetune_info = None
        if fcfg.steps > 0:  # trains a copy, never the evaluator's model
            import copy

            if model is self.model:
                model = copy.deepcopy(self.model)
            batches = self.finetune_batches(fcfg.steps)
            self._finetune_info = quant.finetune(model, fcfg, batches, self.finetune_loss,
                                                 calib=batches[: len(calib)])
        scales = None
        need = qcfg.lqer_rank > 0 or (qcfg.ratio is not None and qcfg.ratio_rule == "sensitivity")
        if need and model is self.model:  # no mask: the calibration scales never change
            if self._input_scales is None:
                lay = {n for n, m in self.model.named_modules()
                       if isinstance(m, nn.Linear | nn.Conv2d)}
                self._input_scales = quant.calibrate_input_scales(self.model, calib, lay)
            scales = self._input_scales
        model, qrep = quant.quantize_model(model, qcfg, calib=calib, input_scales=scales,
                                           lqer_cache=self.lqer_cache)
        if model is self.model:
            raise RuntimeError("quant returned the evaluator's own model; a copy was expected")
        return model.eval(), qrep, srep

    # ------------------------------------------------------------------ measure
    def _measure(self, model: nn.Module, level: str) -> dict[str, Any]:
        """Metrics of ``model`` at ``level`` (``proxy`` or ``full``); subclass hook."""
        raise NotImplementedError

    def _finish_candidate(self) -> None:
        """Release per-candidate state after an evaluation (subclass hook)."""

    def _extra_info(self, model: nn.Module) -> dict[str, Any]:
        """Non-float results of the transformed ``model`` (subclass hook)."""
        return {}

    def evaluate(
        self, params: Mapping[str, Any], upstream: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Metrics of the candidate ``params`` (``upstream`` is ignored).

        Returns float metrics (see docs/evaluators.md) plus trial information:
        ``fidelity`` (str) and ``layers`` (per-layer dict).

        Raises:
            ValueError: a bad parameter (unknown layer, unknown format, density outside
                [0, 1]), naming it.
            EvaluationError: a NaN/inf metric, with the reason.
        """
        key = self.key(params)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        try:
            with torch_threads(self.num_threads), torch.no_grad():
                result = self._evaluate_uncached(params)
        finally:
            self._finish_candidate()
        self.cache.put(key, result, params)
        return result

    def _evaluate_uncached(self, params: Mapping[str, Any]) -> dict[str, Any]:
        model, qrep, srep = self.transform(params)
        if self._weight_signal is None:  # the unquantized weights never change
            self._weight_signal = weight_signal(self.model)
        sqnr, sqnr_layers = weight_sqnr_db(self.model, model, self._weight_signal)
        proxy = self._measure(model, "proxy")
        level = "proxy"
        metrics = proxy
        if self.fidelity == "full" or (
            self.fidelity == "gated" and proxy["kl_to_fp_nats"] <= self.gate_kl_nats
        ):
            metrics = self._measure(model, "full")
            level = "full"
        info_layers: dict[str, dict[str, Any]] = {}
        act_layers = metrics.pop("_act_sparsity_layers", {})
        proxy.pop("_act_sparsity_layers", None)
        w_sp, w_layers = weight_sparsity(model)
        per_quant = _json_layers(getattr(qrep, "per_layer", {}))
        for name in w_layers:
            entry = dict(per_quant.get(name, {}))
            entry.update(weight_sparsity=w_layers[name], weight_sqnr_db=sqnr_layers.get(name),
                         act_sparsity=act_layers.get(name, 0.0))
            info_layers[name] = entry
        for name, entry in per_quant.items():
            info_layers.setdefault(name, dict(entry))
        for name, entry in _json_layers(getattr(srep, "per_layer", {})).items():
            if name in info_layers:
                info_layers[name]["density_target"] = entry.get("density_target")
                info_layers[name]["act_threshold"] = entry.get("act_threshold")
        avg_w = float(qrep.avg_weight_bits)
        result: dict[str, Any] = {
            **{k: v for k, v in metrics.items() if not k.startswith("_")},
            "proxy_kl_nats": float(proxy["kl_to_fp_nats"]),
            "weight_sqnr_db": float(sqnr),
            "avg_weight_bits": avg_w,
            "avg_act_bits": float(qrep.avg_act_bits),
            "kv_bits": float(qrep.kv_bits),
            "quant_ratio_params": float(qrep.quant_ratio_params),
            "quant_ratio_matmuls": float(qrep.quant_ratio_matmuls),
            "memory_density": 32.0 / avg_w if avg_w > 0 else float("nan"),
            "weight_sparsity": float(w_sp),
            "fidelity": level,
            "layers": info_layers,
            **self._extra_info(model),
            **({"finetune": dict(self._finetune_info)} if self._finetune_info else {}),
        }
        if "act_sparsity" not in result:
            result["act_sparsity"] = 0.0
        for k, v in result.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise EvaluationError(
                    f"{self.name}: metric {k} is {v} for {software_params(params)} "
                    "(the transformed model produced non-finite outputs)"
                )
        return result


def _json_layers(per_layer: Any) -> dict[str, dict[str, Any]]:
    """Per-layer report entries made JSON-able (dataclasses/objects -> dicts of scalars)."""
    import dataclasses

    out: dict[str, dict[str, Any]] = {}
    if not isinstance(per_layer, Mapping):
        return out
    for name, entry in per_layer.items():
        if dataclasses.is_dataclass(entry) and not isinstance(entry, type):
            entry = dataclasses.asdict(entry)
        if isinstance(entry, Mapping):
            out[str(name)] = {str(k): (v if isinstance(v, int | float | str | bool) or v is None
                                       else str(v)) for k, v in entry.items()}
    return out
