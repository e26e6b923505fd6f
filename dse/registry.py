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
* A factory that is a :class:`dse.schema.Plugin` carries its :class:`~dse.schema.EvaluatorSchema`
  (options, parameters read, metrics returned): the spec validator checks a spec against
  it up front, and the plugin checks its options before building.

Where names come from, in this order:

1. built-ins registered below and :func:`register` calls (a notebook, a test);
2. installed packages: entry points in the group ``dse.evaluators`` (entry-point name =
   evaluator name, value = ``"package.module:factory"``);
3. a spec name of the form ``"package.module:factory"``: that module is imported and the
   factory called, i.e. the spec runs that code (as any plugin does).

Names are resolved lazily (``"module:attribute"``) so that importing the registry never
imports torch or a model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from dse.schema import EvaluatorSchema, schema_of
from evaluators.kinds import VISION_KINDS


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


ENTRY_POINT_GROUP = "dse.evaluators"
_SCANNED = False


def _scan_entry_points() -> None:
    """Register the ``dse.evaluators`` entry points of installed packages (once)."""
    global _SCANNED
    if _SCANNED:
        return
    _SCANNED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _BUILTIN and ep.name not in _LOADED:
            _BUILTIN[ep.name] = ep.value


def is_import_path(name: str) -> bool:
    """Whether ``name`` has the form ``"package.module:attribute"`` (run as code)."""
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr.isidentifier()
                and all(p.isidentifier() for p in module.split(".")))


def names() -> list[str]:
    """All registered evaluator names (built-in, registered, entry points), sorted."""
    _scan_entry_points()
    return sorted(set(_BUILTIN) | set(_LOADED))


def _resolve(target: str, name: str) -> Factory:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise KeyError(f"evaluator {name!r}: cannot import {module_name!r}: {e}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise KeyError(f"evaluator {name!r}: {module_name!r} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]


def get(name: str) -> Factory:
    """Return the factory registered under ``name`` (or named by ``"package.module:attr"``).

    Raises:
        KeyError: with a one-line message listing the registered names, or saying why an
            import path does not resolve.
    """
    if name in _LOADED:
        return _LOADED[name]
    _scan_entry_points()
    if name in _BUILTIN:
        factory = _resolve(_BUILTIN[name], name)
        _LOADED[name] = factory
        return factory
    if is_import_path(name):  # not cached in _LOADED: workers import it themselves
        return _resolve(name, name)
    raise KeyError(f"unknown evaluator {name!r}; expected one of: {', '.join(names())} "
                   "or 'package.module:factory'")


def schema(name: str) -> EvaluatorSchema | None:
    """The schema of evaluator ``name`` (``None``: a plain factory without one)."""
    return schema_of(get(name))


# Built-in evaluators. Each plugin module owns its entries; add yours here in one line
# (or, outside this repository, as a ``dse.evaluators`` entry point).
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
for _kind in VISION_KINDS:
    register(_kind, f"dse.plugins.vision:{_kind}")
