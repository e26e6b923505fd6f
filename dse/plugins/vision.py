"""Image-classification accuracy evaluators for studies: one per shipped model
(``evaluators.kinds.VISION_KINDS``: ``glyph_cnn``, ``glyph_vit``, ``digits``).

Thin adapters over :class:`evaluators.VisionEvaluator`. Besides the metrics
(``accuracy``, ``loss_nats``, ``kl_to_fp_nats``, bits, sparsity), each result carries
``layer_sparsity`` (trial information) in the contract the ``dataflow`` evaluator
consumes as ``upstream`` (docs/dataflow.md). Options, parameters and metrics: the schema
below (``dse evaluators glyph_cnn``, docs/params.md).
"""

from __future__ import annotations

from typing import Any

from dse.plugins.lm import ACCURACY_INFO, ACCURACY_METRICS, ACCURACY_PARAMS, common_options
from dse.registry import EvalContext
from dse.schema import EvaluatorSchema, Metric, Option, Plugin, positive_int
from evaluators.kinds import VISION_KINDS

_DOCS = {
    "glyph_cnn": "the shipped 36-class glyph CNN on unseen fonts",
    "glyph_vit": "the shipped 36-class glyph ViT on unseen fonts",
    "digits": "the shipped CNN on scikit-learn's 8x8 digits (test split)",
}


def _schema(kind: str) -> EvaluatorSchema:
    options = (
        *common_options(("budget_images", None, "test images at the full level (default "
                         "576 glyph / all 540 digits test images)"),
                        ("proxy_images", 128, "test images at the proxy level")),
        positive_int("sparsity_images", "calibration images (training distribution, never "
                     "test images) for layer_sparsity and the transforms", default=32),
        Option("weights", "str", "a .safetensors from evaluators.train.train_vision "
               "(default: the shipped one)"),
    )
    return EvaluatorSchema(
        kind, _DOCS.get(kind, f"the shipped {kind} classifier"), options=options,
        params=ACCURACY_PARAMS,
        metrics=(Metric("accuracy", "top-1 accuracy, fraction"), *ACCURACY_METRICS),
        info=(*ACCURACY_INFO, Metric("layer_sparsity", "per-layer zero-product statistics "
                                     "for the dataflow evaluator")),
    )


def _build(kind: str) -> Any:
    def build(o: dict[str, Any], ctx: EvalContext) -> Any:
        from evaluators.vision import VisionEvaluator

        kw = {k: o[k] for k in ("budget_images", "proxy_images", "sparsity_images", "calib_batches")
              if o[k] is not None}
        return VisionEvaluator(kind, o["weights"],
                               cache_dir=ctx.cache_dir if o["cache"] else None,
                               fidelity=o["fidelity"], gate_kl_nats=float(o["gate_kl_nats"]),
                               num_threads=ctx.num_threads, seed=ctx.seed, **kw)

    return build


SCHEMAS = {kind: _schema(kind) for kind in VISION_KINDS}
PLUGINS = {kind: Plugin(SCHEMAS[kind], _build(kind)) for kind in VISION_KINDS}


def __getattr__(name: str) -> Plugin:
    """``dse.plugins.vision:<kind>``: the registry's lazy target of each vision kind."""
    if name in PLUGINS:
        return PLUGINS[name]
    raise AttributeError(f"module 'dse.plugins.vision' has no attribute {name!r}")
