"""Train a member of the ``char_lm`` family on ``pydoc_data.topics`` (seeded, deterministic on CPU).

Usage::

    python -m evaluators.train.train_char_lm                  # char_lm_s -> weights/char_lm.safetensors
    python -m evaluators.train.train_char_lm --size char_lm_m  # -> weights/char_lm_m.safetensors
    python -m evaluators.train.train_char_lm --size char_lm_l  # -> weights/char_lm_l.safetensors

The sizes (shape, learning rate, storage dtype) are :data:`evaluators.models.CHAR_LM_FAMILY`;
every size uses the same recipe (500 steps, batch 32, context 64, seed 0). Members stored
as float16 are rounded to float16 before the held-out loss is measured, so the recorded
loss is that of the committed weights.

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
from evaluators.kinds import CHAR_LM_FAMILY
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
    store_dtype: str = "float32",
) -> tuple[CharGPT, dict]:
    """Train from scratch; returns ``(model in eval mode, meta)``.

    ``store_dtype``: ``float16`` rounds every parameter to float16 (kept as float32 values)
    after training, so that what is measured is what :func:`save_model` will store.
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
    if store_dtype == "float16":
        with torch.no_grad():
            for t in model.parameters():
                t.copy_(t.half().float())
    elif store_dtype != "float32":
        raise ValueError(f"store_dtype: expected 'float32' or 'float16', got {store_dtype!r}")
    held = encode(held_text, vocab)
    n_win = min(16, (held.numel() - 1) // context)
    with torch.no_grad():
        x = held[: n_win * context + 1]
        inp = x[:-1].view(n_win, context)
        tgt = x[1:].view(n_win, context)
        held_loss = F.cross_entropy(model(inp).flatten(0, 1), tgt.flatten()).item()
    meta = {"vocab": vocab, "seed": seed, "steps": steps, "batch": batch, "lr": lr,
            "heldout_loss_nats": held_loss}
    if store_dtype != "float32":
        meta["store_dtype"] = store_dtype
    return model, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(CHAR_LM_FAMILY), default="char_lm_s")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None,
                    help="peak learning rate (default: the size's, CHAR_LM_FAMILY)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output file (default: the size's file in evaluators/weights)")
    args = ap.parse_args()
    size = CHAR_LM_FAMILY[args.size]
    out = args.out if args.out is not None else WEIGHTS_DIR / size.file
    t0, c0 = time.perf_counter(), time.process_time()
    model, meta = train(steps=args.steps, seed=args.seed, d_model=size.d_model,
                        n_layers=size.n_layers, n_heads=size.n_heads,
                        lr=size.lr if args.lr is None else args.lr,
                        log_every=25, store_dtype=size.dtype)
    meta["train_wall_s"] = round(time.perf_counter() - t0, 1)
    meta["train_cpu_s"] = round(time.process_time() - c0, 1)
    if size.dtype == "float16":
        model = model.half()
    save_model(model, out, meta)
    print(f"{args.size}: {sum(p.numel() for p in model.parameters())} parameters; held-out "
          f"loss {meta['heldout_loss_nats']:.4f} nats/char (perplexity "
          f"{math.exp(meta['heldout_loss_nats']):.3f}); wall {meta['train_wall_s']} s, CPU "
          f"{meta['train_cpu_s']} s; sha256 {state_digest(model.float())[:16]}; -> {out}")


if __name__ == "__main__":
    main()
