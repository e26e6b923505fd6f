"""Registry of evaluators a study spec can name in `[[evaluators]]`.

An *evaluator* here is anything that turns a candidate's parameters into metrics: an
accuracy evaluator (a real model on real data), a performance simulator, or a built-in
benchmark problem. The libraries (`evaluators/`, `simulators/`, `quant/`) know nothing of
this registry; thin adapters in `dse/plugins/` wrap them and register themselves here.

Contract
--------
A factory is called once per Ray actor (models load once, stay warm)::

    factory(options: dict[str, Any], ctx: EvalContext) -> Evaluator

and the evaluator is called once per trial::

    evaluator.evaluate(params, upstream) -> dict[str, Any]

* ``params``: the trial's flat parameter dict with dotted names (``quant.weights``,
  ``hw.mlen``, ...). Each evaluator reads the names it understands and ignores the rest.
* ``upstream``: the metrics returned by the evaluators listed before this one in the spec
  for the same trial (so a simulator can consume, e.g., sparsity measured by an accuracy
  evaluator). Read-only.
* Return value: metric name -> value. ``int``/``float``/``bool`` values are metrics
  (units in the name: ``ttft_s``, ``area_mm2``); any other JSON-able value (a dict of
  per-layer sparsity, a string naming the fidelity level) is kept as trial information,
  not as a metric. A NaN metric or a raised exception fails the trial with a reason.
* Bad options raise ``ValueError`` with a one-line message naming the option and what was
  expected; the spec validator calls ``validate_options`` (if the factory has it) up front.

Built-in names are resolved lazily (``"module:attribute"``) so that importing the registry
never imports torch or a model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class EvalContext:
    """What a factory learns about the study it serves.

    Attributes:
        study_dir: the study's directory (``<dir>/<study>/``); evaluator caches live under
            ``study_dir / "cache" / <evaluator name>``.
        seed: the study seed; every random choice an evaluator makes derives from it.
        num_threads: torch/BLAS threads for this actor (default 1 on CPU).
        name: the evaluator's registered name, as written in the spec.
    """

    study_dir: Path
    seed: int = 0
    num_threads: int = 1
    name: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def cache_dir(self) -> Path:
        """Directory for this evaluator's on-disk result cache (created on demand)."""
        return self.study_dir / "cache" / (self.name or "default")


class Evaluator(Protocol):
    """One warm evaluator held by a Ray actor."""

    def evaluate(
        self, params: Mapping[str, Any], upstream: Mapping[str, Any]
    ) -> dict[str, Any]: ...


Factory = Callable[[dict[str, Any], EvalContext], Evaluator]

# name -> "module:attribute" of a factory; resolved on first use.
_BUILTIN: dict[str, str] = {}
_LOADED: dict[str, Factory] = {}


def register(name: str, target: str | Factory) -> None:
    """Register an evaluator factory under ``name``.

    Args:
        name: the name a study spec uses in ``[[evaluators]] name = ...``.
        target: a factory, or ``"package.module:attribute"`` resolved lazily.
    """
    if isinstance(target, str):
        _BUILTIN[name] = target
        _LOADED.pop(name, None)
    else:
        _LOADED[name] = target


def names() -> list[str]:
    """All registered evaluator names, sorted."""
    return sorted(set(_BUILTIN) | set(_LOADED))


def get(name: str) -> Factory:
    """Return the factory registered under ``name``.

    Raises:
        KeyError: with a one-line message listing the registered names.
    """
    if name in _LOADED:
        return _LOADED[name]
    if name not in _BUILTIN:
        raise KeyError(f"unknown evaluator {name!r}; expected one of: {', '.join(names())}")
    module_name, _, attr = _BUILTIN[name].partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    _LOADED[name] = factory
    return factory


# Built-in evaluators. Each plugin module owns its entries; add yours here in one line.
register("zdt1", "dse.plugins.benchmarks:zdt1")
register("zdt2", "dse.plugins.benchmarks:zdt2")
register("dtlz2", "dse.plugins.benchmarks:dtlz2")
register("dataflow", "dse.plugins.dataflow:dataflow")
register("plena", "dse.plugins.plena:plena")
register("gpu", "dse.plugins.plena:gpu")
register("tpu", "dse.plugins.plena:tpu")
register("char_lm", "dse.plugins.lm:char_lm")
register("smollm2", "dse.plugins.lm:smollm2")
register("hf_lm", "dse.plugins.lm:hf_lm")
register("glyph_cnn", "dse.plugins.vision:glyph_cnn")
register("glyph_vit", "dse.plugins.vision:glyph_vit")
register("digits", "dse.plugins.vision:digits")
