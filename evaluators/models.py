"""The small models the project trains and ships (weights in ``evaluators/weights``).

* :class:`CharGPT`: a character-level causal transformer (pre-LN, learned positions).
* :class:`GlyphCNN`: a small CNN for 16x16 (or 8x8) single-channel images.
* :class:`GlyphViT`: a small vision transformer (4x4 patches, mean-pooled tokens).

The attention matmuls go through ``quant.QMatmul`` (``q @ k^T`` and ``p @ v``) and the
K/V tensors through ``quant.KVQuant`` (identity until ``quant.quantize_model`` configures
them with ``quant.attn`` / ``quant.kv``), so a candidate's attention and KV-cache formats
reach these models exactly as they would reach a Hugging Face model.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import KVQuant, QMatmul, kv_attention

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class Attention(nn.Module):
    """Multi-head self-attention with quantizable matmuls and K/V.

    Args:
        d_model: width; n_heads: heads (d_model % n_heads == 0); causal: mask future keys.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model must be a multiple of n_heads, got {d_model}, {n_heads}")
        self.n_heads = n_heads
        self.causal = causal
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.qk = QMatmul()
        self.pv = QMatmul()
        self.k_cache = KVQuant()
        self.v_cache = KVQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        mask = (torch.ones(t, t, dtype=torch.bool, device=x.device).triu_(1) if self.causal
                else None)
        y = kv_attention(self, split(self.q(x)), split(self.k(x)), split(self.v(x)),
                         scale=1.0 / math.sqrt(d // h), mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)); x + mlp(ln(x)), GELU MLP of width 4d."""

    def __init__(self, d_model: int, n_heads: int, causal: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, causal)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """Character-level causal language model.

    Args:
        vocab_size: number of characters (index 0 is the unknown character).
        d_model, n_layers, n_heads: transformer shape; context: maximum sequence length.
    """

    def __init__(
        self, vocab_size: int, d_model: int = 128, n_layers: int = 4, n_heads: int = 4,
        context: int = 128,
    ) -> None:
        super().__init__()
        self.config = {"vocab_size": vocab_size, "d_model": d_model, "n_layers": n_layers,
                       "n_heads": n_heads, "context": context}
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, causal=True) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token indices (B, T), T <= context."""
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class GlyphCNN(nn.Module):
    """Small CNN: three 3x3 convs (2x2 max-pool after the first two), a 1x1 conv, global mean, linear.

    Args:
        n_classes: output classes; widths: channels of the three 3x3 convs and the 1x1 conv.
    """

    def __init__(self, n_classes: int = 36, widths: tuple[int, int, int, int] = (16, 32, 32, 64)):
        super().__init__()
        c1, c2, c3, c4 = widths
        self.config = {"n_classes": n_classes, "widths": list(widths)}
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c3, c4, 1), nn.ReLU(),
        )
        self.classifier = nn.Linear(c4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes) for images (N, 1, H, W) in [0, 1]."""
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class GlyphViT(nn.Module):
    """Small ViT: 4x4 patches, learned positions, pre-LN blocks, mean-pooled tokens."""

    def __init__(
        self, n_classes: int = 36, image_px: int = 16, patch_px: int = 4, d_model: int = 64,
        n_layers: int = 2, n_heads: int = 4,
    ) -> None:
        super().__init__()
        self.config = {"n_classes": n_classes, "image_px": image_px, "patch_px": patch_px,
                       "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads}
        self.patch_px = patch_px
        n_tokens = (image_px // patch_px) ** 2
        self.embed = nn.Linear(patch_px * patch_px, d_model)
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads, causal=False) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes) for images (N, 1, H, W) in [0, 1]."""
        p = F.unfold(x, self.patch_px, stride=self.patch_px).transpose(1, 2)  # (N, L, p*p)
        h = self.embed(p) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h).mean(dim=1))


MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "CharGPT": CharGPT, "GlyphCNN": GlyphCNN, "GlyphViT": GlyphViT,
}


def state_digest(model: nn.Module) -> str:
    """sha256 (hex) over a model's state dict: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_model(model: nn.Module, path: Path, meta: dict[str, Any] | None = None) -> None:
    """Save weights as safetensors with the class name, config and ``meta`` as JSON metadata."""
    import json

    from safetensors.torch import save_file

    md = {"class": type(model).__name__, "config": json.dumps(getattr(model, "config", {}))}
    for k, v in (meta or {}).items():
        md[k] = json.dumps(v)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=md)


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model saved by :func:`save_model`; returns ``(model in eval mode, meta)``."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        md = dict(f.metadata() or {})
    cls = MODEL_CLASSES.get(md.get("class", ""))
    if cls is None:
        raise ValueError(f"weights file {path}: unknown model class {md.get('class')!r}")
    config = json.loads(md.pop("config"))
    if "widths" in config:
        config["widths"] = tuple(config["widths"])
    model = cls(**config)
    model.load_state_dict(load_file(str(path)), strict=False)
    missing = set(model.state_dict()) - set(load_file(str(path)))
    learned = {n for n, _ in model.named_parameters()}
    if missing & learned:
        raise ValueError(f"weights file {path}: missing parameters {sorted(missing & learned)}")
    meta = {k: json.loads(v) for k, v in md.items() if k != "class"}
    return model.eval(), meta
