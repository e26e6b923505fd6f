"""Static unstructured weight masks chosen by salience, and HASS-style activation sparsity.

``apply_sparsity(model, config, calib, loss_fn)`` returns a masked deep copy of ``model``
(never mutating it) and a ``SparsityReport`` with the achieved weight and activation
sparsity per layer, which the dataflow simulator consumes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quant.config import SparsityConfig
from quant.model import QConv2d, QLinear, run_batch

__all__ = ["apply_sparsity", "SparsityReport", "ActThreshold", "activation_sparsity",
           "salience_scores", "prunable_modules"]

_PRUNABLE = (nn.Linear, nn.Conv2d, QLinear, QConv2d)


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose weight a mask applies to: Linear, Conv2d and their quantized wrappers."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _PRUNABLE)}


class ActThreshold:
    """Forward pre-hook: zero inputs with ``|a| < threshold`` and count zeros (HASS-style).

    ``zeros`` / ``total`` accumulate the number of exactly-zero input elements (after
    thresholding, so natural zeros such as ReLU outputs count too) and of all elements.
    A threshold of 0 only counts.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)
        self.zeros = 0
        self.total = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        if self.threshold > 0:
            x = torch.where(x.abs() < self.threshold, torch.zeros_like(x), x)
        self.zeros += int((x == 0).sum())
        self.total += x.numel()
        return (x, *args[1:]) if self.threshold > 0 else None

    @property
    def sparsity(self) -> float | None:
        """Share of zero input elements seen so far (None before any forward)."""
        return self.zeros / self.total if self.total else None


def _find_hook(mod: nn.Module) -> ActThreshold | None:
    for h in mod._forward_pre_hooks.values():
        if isinstance(h, ActThreshold):
            return h
    return None


def activation_sparsity(model: nn.Module, reset: bool = False) -> dict[str, float]:
    """Measured input sparsity per layer with an ``ActThreshold`` hook (since the last reset).

    Evaluators call this after their evaluation pass to report the activation sparsity on
    their own data.
    """
    out: dict[str, float] = {}
    for name, mod in model.named_modules():
        h = _find_hook(mod)
        if h is not None and h.sparsity is not None:
            out[name] = h.sparsity
        if h is not None and reset:
            h.zeros = h.total = 0
    return out


def salience_scores(
    model: nn.Module,
    salience: str,
    names: list[str],
    calib: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Salience of every weight of the named modules (higher = keep).

    With ``B`` calibration batches, ``g_b = dL_b/dw`` the gradient of batch ``b``'s loss
    ``L_b = loss_fn(model, batch_b)`` and ``g = (1/B) sum_b g_b`` the gradient of the mean
    calibration loss (the definitions of SPEFT, Liu et al., arXiv 2412.13488, sec. 3):

    * ``magnitude``: ``S = |w|``;
    * ``gradient``: ``S = |g|`` (gradient magnitude);
    * ``snip``: ``S = |w * g|``, SNIP's connection sensitivity ``|dL/dc_j|`` at ``c = 1``
      for ``w_j -> c_j w_j`` (Lee et al., ICLR 2019, eq. 6; the normalisation by
      ``sum_k |.|`` does not change a per-layer ranking and is left out);
    * ``fisher``: ``S = (1/B) sum_b 0.5 (w * g_b)^2``, the loss increase of removing
      ``w_j`` under the diagonal empirical Fisher ``F_jj = (1/B) sum_b g_b,j^2``:
      ``0.5 F_jj w_j^2`` (Theis et al., "Faster gaze prediction with dense networks and
      Fisher pruning", 2018, eq. 3-5; per-batch gradients stand in for per-example ones);
    * ``random``: uniform scores from ``torch.Generator().manual_seed(seed + layer index)``.

    Gradient-based saliences need ``calib`` batches and ``loss_fn(model, batch) -> loss``;
    every batch adds its gradient (``gradient``, ``snip``) or squared product (``fisher``),
    so more batches give a better estimate at one forward and backward pass each.
    """
    mods = dict(model.named_modules())
    weights = [mods[n].weight for n in names]
    if salience == "magnitude":
        return {n: w.detach().abs() for n, w in zip(names, weights, strict=True)}
    if salience == "random":
        out = {}
        for i, (n, w) in enumerate(zip(names, weights, strict=True)):
            g = torch.Generator().manual_seed(seed + i)
            out[n] = torch.rand(w.shape, generator=g).to(w.device)  # same on every device
        return out
    if salience not in ("gradient", "snip", "fisher"):
        raise ValueError(f"sparsity.salience: expected one of magnitude, gradient, snip, "
                         f"fisher, random, got {salience!r}")
    if calib is None or loss_fn is None:
        raise ValueError(f"sparsity.salience={salience}: needs calib batches and a loss_fn")
    req = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    acc = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    nb = 0
    try:
        for batch in calib:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
                if g is None:
                    continue
                g = g.detach().float()
                if salience == "fisher":
                    acc[i] += (w.detach().float() * g).square_().mul_(0.5)
                else:
                    acc[i] += g
            nb += 1
    finally:
        for w, r in zip(weights, req, strict=True):
            w.requires_grad_(r)
    if nb == 0:
        raise ValueError(f"sparsity.salience={salience}: calib yielded no batches")
    if salience == "gradient":
        sc = [(a / nb).abs() for a in acc]
    elif salience == "snip":
        sc = [(w.detach().float() * (a / nb)).abs() for w, a in zip(weights, acc, strict=True)]
    else:
        sc = [a / nb for a in acc]
    return dict(zip(names, sc, strict=True))


@dataclass
class SparsityReport:
    """Achieved sparsity.

    Attributes:
        weight_sparsity: share of zero weights over all prunable layers (element-weighted).
        act_sparsity: share of zero inputs of prunable layers over the calibration batches
            (element-weighted), or None when no ``calib`` was given.
        per_layer: ``{name: {"density_target", "kept", "params", "weight_sparsity",
            "act_threshold", "act_sparsity"}}`` (JSON-able).
    """

    weight_sparsity: float = 0.0
    act_sparsity: float | None = None
    per_layer: dict[str, dict[str, Any]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Scalar metrics (``act_sparsity`` only when measured)."""
        m = {"weight_sparsity": self.weight_sparsity}
        if self.act_sparsity is not None:
            m["act_sparsity"] = self.act_sparsity
        return m


def apply_sparsity(
    model: nn.Module,
    config: SparsityConfig,
    calib: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> tuple[nn.Module, SparsityReport]:
    """Masked deep copy of ``model`` and the achieved sparsity; ``model`` is not touched.

    Per prunable layer (Linear, Conv2d, QLinear, QConv2d) keeps exactly
    ``round(density * numel)`` weights with the highest salience (ties broken by
    ``torch.topk``), zeroes the rest and stores the mask as buffer ``weight_mask``. Layers
    with an activation threshold > 0 get an ``ActThreshold`` forward pre-hook. When
    ``calib`` is given, it is run through the masked model (no grad) to measure activation
    sparsity per layer (and used for gradient saliences with ``loss_fn``).
    """
    new = copy.deepcopy(model)
    mods = prunable_modules(new)
    names = [n for n in mods if config.density_for(n) < 1.0]
    calib_list = list(calib) if calib is not None else None
    scores = salience_scores(new, config.salience, names, calib_list, loss_fn, config.seed) \
        if names else {}
    report = SparsityReport()
    zeros_total = elems_total = 0
    for name, mod in mods.items():
        w = mod.weight
        n = w.numel()
        d = config.density_for(name)
        keep = n
        if name in scores:
            keep = int(round(d * n))
            mask = torch.zeros(n, dtype=torch.bool, device=w.device)
            if keep:
                mask[torch.topk(scores[name].flatten(), keep, sorted=False).indices] = True
            mask = mask.view(w.shape)
            with torch.no_grad():
                w.mul_(mask.to(w.dtype))
            mod.register_buffer("weight_mask", mask)
        z = int((w == 0).sum())
        zeros_total += z
        elems_total += n
        t = config.threshold_for(name)
        if t > 0:
            mod.register_forward_pre_hook(ActThreshold(t))
        report.per_layer[name] = {"density_target": d, "kept": keep, "params": n,
                                  "weight_sparsity": z / n if n else 0.0,
                                  "act_threshold": t, "act_sparsity": None}
    report.weight_sparsity = zeros_total / elems_total if elems_total else 0.0

    if calib_list:
        temp = []
        for mod in mods.values():
            if _find_hook(mod) is None:
                h = ActThreshold(0.0)
                temp.append(mod.register_forward_pre_hook(h))
        with torch.no_grad():
            for batch in calib_list:
                run_batch(new, batch)
        z_all = t_all = 0
        for name, mod in mods.items():
            h = _find_hook(mod)
            if h is not None and h.total:
                report.per_layer[name]["act_sparsity"] = h.sparsity
                z_all += h.zeros
                t_all += h.total
                h.zeros = h.total = 0
        for handle in temp:
            handle.remove()
        report.act_sparsity = z_all / t_all if t_all else None
    return new, report
