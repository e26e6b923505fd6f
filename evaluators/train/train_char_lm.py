"""Train the character-level GPT on ``pydoc_data.topics`` (seeded, deterministic on CPU).

Usage::

    python -m evaluators.train.train_char_lm            # writes evaluators/weights/char_lm.safetensors

Deterministic: one torch thread, a seeded generator for batches and initialisation, a
fixed number of steps (no wall-clock stopping). Same seed -> same weights (bit for bit)
on the same torch build.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from evaluators.data import WEIGHTS_DIR, text_splits
from evaluators.models import CharGPT, save_model, state_digest


def build_vocab(text: str) -> str:
    """Characters of ``text`` sorted; index 0 is reserved for unknown characters."""
    return "".join(sorted(set(text)))


def encode(text: str, vocab: str) -> torch.Tensor:
    """int64 indices; a character outside ``vocab`` maps to 0 (unknown)."""
    table = {c: i + 1 for i, c in enumerate(vocab)}
    return torch.tensor([table.get(c, 0) for c in text], dtype=torch.int64)


def train(
    steps: int = 500, seed: int = 0, batch: int = 32, context: int = 64, d_model: int = 128,
    n_layers: int = 2, n_heads: int = 4, lr: float = 1e-2, log_every: int = 0,
) -> tuple[CharGPT, dict]:
    """Train from scratch; returns ``(model in eval mode, meta)``.

    ``meta`` holds the vocabulary, the hyper-parameters and the held-out loss (nats/char)
    on the first 16 windows of the held-out text.
    """
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    train_text, held_text = text_splits()
    vocab = build_vocab(train_text + held_text)
    data = encode(train_text, vocab)
    model = CharGPT(len(vocab) + 1, d_model, n_layers, n_heads, context)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    model.train()
    for step in range(steps):
        frac = step / max(1, steps - 1)
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(context + 1)
        chunk = data[idx]
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and step % log_every == 0:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    model.eval()
    held = encode(held_text, vocab)
    n_win = min(16, (held.numel() - 1) // context)
    with torch.no_grad():
        x = held[: n_win * context + 1]
        inp = x[:-1].view(n_win, context)
        tgt = x[1:].view(n_win, context)
        held_loss = F.cross_entropy(model(inp).flatten(0, 1), tgt.flatten()).item()
    meta = {"vocab": vocab, "seed": seed, "steps": steps, "batch": batch, "lr": lr,
            "heldout_loss_nats": held_loss}
    return model, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR / "char_lm.safetensors")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, meta = train(steps=args.steps, seed=args.seed, log_every=25)
    meta["train_wall_s"] = round(time.perf_counter() - t0, 1)
    save_model(model, args.out, meta)
    print(f"held-out loss {meta['heldout_loss_nats']:.4f} nats/char "
          f"(perplexity {math.exp(meta['heldout_loss_nats']):.3f}); "
          f"wall {meta['train_wall_s']} s; sha256 {state_digest(model)[:16]}; -> {args.out}")


if __name__ == "__main__":
    main()
