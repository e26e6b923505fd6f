"""Image-classification accuracy evaluators for studies: ``glyph_cnn``, ``glyph_vit``,
``digits``.

Thin adapters over :class:`evaluators.VisionEvaluator`. Besides the metrics
(``accuracy``, ``loss_nats``, ``kl_to_fp_nats``, bits, sparsity), each result carries
``layer_sparsity`` (trial information) in the contract the ``dataflow`` evaluator
consumes as ``upstream`` (docs/dataflow.md).

Options (all optional): ``budget_images`` (test images at the ``full`` level; default
576 glyph / all 540 digits test images), ``proxy_images`` (default 128), ``sparsity_images`` (calibration images for
``layer_sparsity``, default 32; from the training distribution, never test images),
``calib_batches`` (batches those images are split into, default 4), ``fidelity`` (``full``/``proxy``/``gated``),
``gate_kl_nats`` (1.0), ``cache`` (true), ``weights`` (a ``.safetensors`` written by
``evaluators.train.train_vision``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dse.plugins.lm import _bool, _gate, _int, _str
from dse.registry import EvalContext

OPTIONS: dict[str, Callable[[Any], None]] = {
    "budget_images": _int("budget_images", 1),
    "proxy_images": _int("proxy_images", 1),
    "sparsity_images": _int("sparsity_images", 1),
    "calib_batches": _int("calib_batches", 1),
    "fidelity": _str("fidelity", ("full", "proxy", "gated")),
    "gate_kl_nats": _gate,
    "cache": _bool("cache"),
    "weights": _str("weights"),
}


def check_options(kind: str, options: Mapping[str, Any]) -> None:
    """Validate ``options`` without loading a model (one-line ``ValueError``)."""
    for k, v in options.items():
        if k not in OPTIONS:
            raise ValueError(f"{kind} option {k!r} is unknown; expected one of "
                             f"{', '.join(sorted(OPTIONS))}")
        OPTIONS[k](v)


def _make(kind: str, options: Mapping[str, Any], ctx: EvalContext) -> Any:
    from evaluators.vision import VisionEvaluator

    check_options(kind, options)
    kw = {k: options[k]
          for k in ("budget_images", "proxy_images", "sparsity_images", "calib_batches")
          if k in options}
    return VisionEvaluator(
        kind, options.get("weights"),
        cache_dir=ctx.cache_dir if options.get("cache", True) else None,
        fidelity=options.get("fidelity", "full"),
        gate_kl_nats=float(options.get("gate_kl_nats", 1.0)),
        num_threads=ctx.num_threads, seed=ctx.seed, **kw,
    )


def glyph_cnn(options: dict[str, Any], ctx: EvalContext) -> Any:
    """Factory of ``glyph_cnn``: the shipped 36-class glyph CNN on unseen fonts."""
    return _make("glyph_cnn", options, ctx)


def glyph_vit(options: dict[str, Any], ctx: EvalContext) -> Any:
    """Factory of ``glyph_vit``: the shipped 36-class glyph ViT on unseen fonts."""
    return _make("glyph_vit", options, ctx)


def digits(options: dict[str, Any], ctx: EvalContext) -> Any:
    """Factory of ``digits``: the shipped CNN on scikit-learn's 8x8 digits (test split)."""
    return _make("digits", options, ctx)


glyph_cnn.validate_options = lambda options: check_options("glyph_cnn", options)  # type: ignore[attr-defined]
glyph_vit.validate_options = lambda options: check_options("glyph_vit", options)  # type: ignore[attr-defined]
digits.validate_options = lambda options: check_options("digits", options)  # type: ignore[attr-defined]
