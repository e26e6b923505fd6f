"""A short, deterministic masked fine-tune (a fidelity level before quantization).

``finetune(model, config, batches, loss_fn)`` trains ``model`` *in place* (callers pass a
copy) for ``config.steps`` Adam steps on the given batches, keeping every sparsity mask
(``weight_mask`` buffers from ``apply_sparsity``): pruned weights stay exactly zero. Which
parameters train (``finetune.params``):

* ``masked``: the weights of every prunable layer (Linear/Conv2d) where the mask keeps
  them, and those layers' biases (a sparse fine-tune of the pruned model);
* ``all``: every parameter (embeddings and norms too), masks still kept;
* ``salience``: SPEFT (Liu et al., arXiv 2412.13488): only the ``finetune.density`` share
  of each prunable layer's weights with the highest ``finetune.salience`` score
  (``quant.salience_scores`` on the given calibration batches) trains, among the weights
  the mask keeps; everything else is frozen.

Deterministic on CPU with one thread: batches in the given order, Adam (betas 0.9/0.999,
no weight decay), constant learning rate; the model stays in eval mode (no dropout,
normalisation statistics frozen), so no random state is drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from quant.config import FinetuneConfig
from quant.sparsity import prunable_modules, salience_scores

__all__ = ["finetune"]


def finetune(
    model: nn.Module, config: FinetuneConfig, batches: Sequence[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    calib: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Fine-tune ``model`` in place; returns ``{"finetune_loss_first", "finetune_loss_last",
    "finetune_trainable_params"}`` (losses in the loss function's unit).

    ``batches``: at least one; step ``i`` uses ``batches[i % len(batches)]``. ``calib``:
    the batches the ``salience`` mode scores weights on (default: ``batches``).

    Raises:
        ValueError: no batches.
    """
    if config.steps == 0:
        return {}
    if not batches:
        raise ValueError("finetune.steps: needs at least one fine-tuning batch")
    mods = prunable_modules(model)
    masks = {n: m.weight_mask for n, m in mods.items() if hasattr(m, "weight_mask")}
    grad_masks: dict[int, torch.Tensor] = {}  # id(param) -> 0/1 multiplier of its gradient
    train: list[nn.Parameter] = []
    if config.params == "all":
        train = [p for p in model.parameters()]
        for n, m in mods.items():
            if n in masks:
                grad_masks[id(m.weight)] = masks[n].to(m.weight.dtype)
    else:
        sal: dict[str, torch.Tensor] = {}
        if config.params == "salience":
            with torch.enable_grad():
                sal = salience_scores(model, config.salience, list(mods), calib or batches,
                                      loss_fn, config.seed)
        for n, m in mods.items():
            keep = masks[n] if n in masks else torch.ones_like(m.weight, dtype=torch.bool)
            if config.params == "salience":
                score = sal[n].masked_fill(~keep, float("-inf")).flatten()
                k = min(int(keep.sum()), max(1, round(config.density * m.weight.numel())))
                sel = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
                sel[torch.topk(score, k, sorted=False).indices] = True
                keep = sel.view_as(keep)
            train.append(m.weight)
            grad_masks[id(m.weight)] = keep.to(m.weight.dtype)
            if config.params == "masked" and getattr(m, "bias", None) is not None:
                train.append(m.bias)
    seen: set[int] = set()
    train = [p for p in train if not (id(p) in seen or seen.add(id(p)))]  # tied weights once
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    opt = torch.optim.Adam(train, lr=config.lr)
    losses: list[float] = []
    try:
        with torch.enable_grad():
            for i in range(config.steps):
                opt.zero_grad(set_to_none=False)
                loss = loss_fn(model, batches[i % len(batches)])
                loss.backward()
                losses.append(float(loss.detach()))
                for p in train:
                    gm = grad_masks.get(id(p))
                    if gm is not None and p.grad is not None:
                        p.grad.mul_(gm)
                opt.step()
                with torch.no_grad():
                    for n, m in mods.items():
                        if n in masks:
                            m.weight.mul_(masks[n].to(m.weight.dtype))
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))
            p.grad = None
    n_train = int(sum(float(grad_masks[id(p)].sum()) if id(p) in grad_masks else p.numel()
                      for p in train))
    return {"finetune_loss_first": losses[0], "finetune_loss_last": losses[-1],
            "finetune_trainable_params": float(n_train)}
