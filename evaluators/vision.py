"""Image-classification evaluators: the shipped glyph CNN / ViT and the digits CNN.

Metrics: ``accuracy`` (top-1, fraction), ``loss_nats`` (mean cross entropy, nats/image),
``kl_to_fp_nats`` (mean KL(p_fp || p_candidate) of the class distributions, nats),
``act_sparsity``; beside them ``layer_sparsity`` (per Conv2d/Linear zero-product
statistics on calibration images, see :mod:`evaluators.sparsity_stats`) for the
dataflow simulator.

Data: the committed glyph test set (fonts never seen in training) or the digits test
split. Calibration images (LQER scales, gradient saliences, ``layer_sparsity``) come only
from a disjoint split of the training distribution: ``glyph_calib.npz`` (training fonts,
a rendering seed unused in training) / the digits training split; never a test image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluators.base import AccuracyEvaluator, ActSparsityMeter, torch_threads
from evaluators.data import WEIGHTS_DIR, digits_splits, glyph_test_set
from evaluators.kinds import VISION_KINDS
from evaluators.models import load_model, state_digest
from evaluators.sparsity_stats import layer_sparsity

DEFAULT_BUDGET_IMAGES = 576


def _digest(*arrays: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class VisionEvaluator(AccuracyEvaluator):
    """A shipped image classifier on its held-out test images.

    Args:
        kind: ``glyph_cnn`` | ``glyph_vit`` | ``digits``.
        weights: override of the shipped ``.safetensors`` file.
        budget_images: test images at the ``full`` level (default 576 of the 1152 glyph
            test images, all 540 digits test images; a fixed permutation of the test set
            is used, so any prefix covers every font and class); proxy_images: images at
            the ``proxy`` level (default 128).
        sparsity_images: calibration images for ``layer_sparsity`` and the transforms
            (default 32); calib_batches: batches the calibration images are split into
            (default 4; the gradient saliences average over them); batch: images per
            forward pass.
        Other arguments: see :class:`evaluators.base.AccuracyEvaluator`.
    """

    def __init__(
        self, kind: str = "glyph_cnn", weights: str | os.PathLike[str] | None = None, *,
        budget_images: int | None = None, proxy_images: int = 128, sparsity_images: int = 32,
        calib_batches: int = 4, batch: int = 512, cache_dir: str | os.PathLike[str] | None = None,
        fidelity: str = "full", gate_kl_nats: float = 1.0, num_threads: int = 1, seed: int = 0,
    ) -> None:
        if kind not in VISION_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(VISION_KINDS)}, got {kind!r}")
        self.name = kind
        wfile, data = VISION_KINDS[kind]
        path = Path(weights) if weights is not None else WEIGHTS_DIR / wfile
        if not path.is_file():
            raise ValueError(f"weights: no such file {path}")
        model, _ = load_model(path)
        if data == "glyphs":
            x, y = glyph_test_set("test")
            cx, cy = glyph_test_set("calib")
        else:
            cx, cy, x, y = digits_splits(seed=0)
        # A fixed permutation so that any prefix (the proxy, a smaller budget) covers all
        # fonts and classes (the committed set is stored font-major).
        perm = np.random.default_rng(0).permutation(len(y))
        x, y = x[perm], y[perm]
        n_max = len(y)
        if budget_images is None:
            budget_images = min(n_max, DEFAULT_BUDGET_IMAGES)
        budget = budget_images
        for opt, v, hi in (("budget_images", budget, n_max), ("proxy_images", proxy_images, n_max),
                           ("sparsity_images", sparsity_images, len(cy)),
                           ("calib_batches", calib_batches, sparsity_images),
                           ("batch", batch, 1 << 20)):
            if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi):
                raise ValueError(f"{opt}: expected an integer in [1, {hi}], got {v!r}")
        proxy = min(proxy_images, budget)
        identity = {"evaluator": kind, "model": state_digest(model)[:16],
                    "data": f"{data}:{_digest(x, y)}", "budget_images": budget,
                    "proxy_images": proxy, "sparsity_images": sparsity_images,
                    "calib": f"{data}-calib:{_digest(cx, cy)}", "calib_batches": calib_batches}
        super().__init__(model, identity, cache_dir, fidelity, gate_kl_nats, num_threads, seed)
        self.images = torch.from_numpy(x[:budget])
        self.labels = torch.from_numpy(y[:budget])
        self.calib_images = torch.from_numpy(cx[:sparsity_images])
        self.calib_labels = torch.from_numpy(cy[:sparsity_images])
        self._ft_data = (cx, cy)  # the whole calibration split: fine-tuning data
        # contiguous, near-equal chunks; labels found by the batch object itself
        self._calib = list(torch.tensor_split(self.calib_images, calib_batches))
        labels = torch.tensor_split(self.calib_labels, calib_batches)
        self._calib_labels = {id(b): y for b, y in zip(self._calib, labels, strict=True)}
        self.n_images = {"proxy": proxy, "full": budget}
        self.batch = batch
        self._act: tuple[float, dict[str, float]] = (0.0, {})
        with torch_threads(num_threads), torch.no_grad():
            self._ref_logp = self._logp(self.model, budget)

    def calibration_inputs(self) -> list[torch.Tensor]:
        return self._calib

    def calibration_loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        y = self._calib_labels.get(id(batch))
        if y is None:
            raise ValueError("calibration_loss: batch is not one of calibration_inputs()")
        return F.cross_entropy(model(batch), y)

    def finetune_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` batches of 64 images of the calibration split (training fonts / digits
        training split), in seeded epoch permutations."""
        x, y = (torch.from_numpy(a) for a in self._ft_data)
        g = torch.Generator().manual_seed(self.seed)
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        while len(out) < n:
            perm = torch.randperm(len(y), generator=g)
            for i in range(0, len(y) - 63, 64):
                idx = perm[i : i + 64]
                out.append((x[idx], y[idx]))
        return out[:n]

    def finetune_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
                      ) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    def _logp(self, model: nn.Module, n: int) -> torch.Tensor:
        parts = [model(self.images[i : min(n, i + self.batch)]).float().log_softmax(-1)
                 for i in range(0, n, self.batch)]
        return torch.cat(parts)

    def _measure(self, model: nn.Module, level: str) -> dict[str, Any]:
        n = self.n_images[level]
        if level == "proxy":  # act sparsity is measured on the proxy images only
            meter = ActSparsityMeter(model)
            try:
                lq = self._logp(model, n)
            finally:
                meter.close()
            self._act = (meter.overall(), meter.per_layer())
        else:
            lq = self._logp(model, n)
        lp = self._ref_logp[:n]
        y = self.labels[:n]
        return {
            "accuracy": float((lq.argmax(-1) == y).double().mean()),
            "loss_nats": float(-lq.gather(1, y[:, None]).mean()),
            "kl_to_fp_nats": max(0.0, float((lp.exp() * (lp - lq)).sum(-1).mean())),
            "act_sparsity": self._act[0],
            "_act_sparsity_layers": self._act[1],
        }

    def _extra_info(self, model: nn.Module) -> dict[str, Any]:
        return {"layer_sparsity": layer_sparsity(model, self.calib_images)}
