"""Train the shipped vision models (seeded, deterministic on CPU).

Usage::

    python -m evaluators.train.train_vision glyph_cnn   # -> weights/glyph_cnn.safetensors
    python -m evaluators.train.train_vision glyph_vit   # -> weights/glyph_vit.safetensors
    python -m evaluators.train.train_vision digits      # -> weights/digits_cnn.safetensors
    python -m evaluators.train.train_vision test_set    # -> weights/glyph_test.npz

Glyph models train on :data:`evaluators.data.GLYPH_TRAIN_FONTS` with random affine
jitter; the test set is rendered from :data:`evaluators.data.GLYPH_TEST_FONTS` (never seen
in training) and committed as uint8 so evaluation does not depend on font versions.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluators.data import (
    GLYPH_TEST_FONTS,
    GLYPH_TRAIN_FONTS,
    WEIGHTS_DIR,
    digits_splits,
    render_glyphs,
)
from evaluators.kinds import VISION_KINDS
from evaluators.models import GlyphCNN, GlyphViT, save_model, state_digest

TEST_SET_SEED = 12345
TEST_PER_GLYPH = 8
CALIB_SEED = 777
CALIB_PER_GLYPH = 1


def make_model(kind: str) -> nn.Module:
    """A freshly initialised model for ``kind`` (glyph_cnn, glyph_vit, digits)."""
    if kind == "glyph_cnn":
        return GlyphCNN(36)
    if kind == "glyph_vit":
        return GlyphViT(36)
    if kind == "digits":
        return GlyphCNN(10, widths=(8, 16, 16, 32))
    raise ValueError(f"model kind must be glyph_cnn, glyph_vit or digits, got {kind!r}")


def train(
    kind: str, epochs: int = 4, seed: int = 0, n_per_glyph: int = 24, batch: int = 128,
    lr: float = 3e-3, max_steps: int | None = None,
) -> tuple[nn.Module, dict]:
    """Train ``kind`` from scratch; returns ``(model in eval mode, meta)``.

    ``max_steps`` stops early (used by the determinism test).
    """
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    if kind == "digits":
        xtr, ytr, _, _ = digits_splits(seed=0)
        epochs = epochs * 25  # 1257 images: more passes, still a few seconds
    else:
        xtr, ytr = render_glyphs(GLYPH_TRAIN_FONTS, n_per_glyph, seed=seed)
    x = torch.from_numpy(xtr)
    y = torch.from_numpy(ytr)
    model = make_model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    total = epochs * ((n + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    step = 0
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            j = perm[i : i + batch]
            loss = F.cross_entropy(model(x[j]), y[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        if max_steps is not None and step >= max_steps:
            break
    model.eval()
    meta = {"kind": kind, "seed": seed, "epochs": epochs, "steps": step, "lr": lr,
            "n_train": int(n)}
    return model, meta


def test_accuracy(model: nn.Module, kind: str) -> float:
    """Top-1 accuracy on the evaluation set of ``kind`` (fraction in [0, 1])."""
    if kind == "digits":
        _, _, xte, yte = digits_splits(seed=0)
    else:
        from evaluators.data import glyph_test_set

        xte, yte = glyph_test_set()
    with torch.no_grad():
        pred = model(torch.from_numpy(xte)).argmax(-1).numpy()
    return float((pred == yte).mean())


def write_test_set(path: Path, calib_path: Path) -> None:
    """Render the held-out-font glyph test set and a calibration set from training fonts
    (a seed unused in training); save both as uint8 ``.npz``."""
    x, y = render_glyphs(GLYPH_TEST_FONTS, TEST_PER_GLYPH, seed=TEST_SET_SEED)
    np.savez_compressed(path, images=np.round(x * 255).astype(np.uint8), labels=y.astype(np.int8),
                        fonts=np.asarray(GLYPH_TEST_FONTS))
    x, y = render_glyphs(GLYPH_TRAIN_FONTS, CALIB_PER_GLYPH, seed=CALIB_SEED)
    perm = np.random.default_rng(CALIB_SEED).permutation(len(y))
    np.savez_compressed(calib_path, images=np.round(x[perm] * 255).astype(np.uint8),
                        labels=y[perm].astype(np.int8), fonts=np.asarray(GLYPH_TRAIN_FONTS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=[*VISION_KINDS, "test_set"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.kind == "test_set":
        write_test_set(WEIGHTS_DIR / "glyph_test.npz", WEIGHTS_DIR / "glyph_calib.npz")
        print(f"wrote glyph_test.npz, glyph_calib.npz in {time.perf_counter() - t0:.1f} s")
        return
    model, meta = train(args.kind, epochs=args.epochs, seed=args.seed)
    meta["train_wall_s"] = round(time.perf_counter() - t0, 1)
    meta["test_accuracy"] = test_accuracy(model, args.kind)
    name = "digits_cnn" if args.kind == "digits" else args.kind
    out = WEIGHTS_DIR / f"{name}.safetensors"
    save_model(model, out, meta)
    print(f"{args.kind}: test accuracy {meta['test_accuracy']:.4f}; wall {meta['train_wall_s']} s; "
          f"sha256 {state_digest(model)[:16]}; -> {out}")


if __name__ == "__main__":
    main()
