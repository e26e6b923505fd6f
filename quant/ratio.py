"""Which layers hold the low-precision format under ``quant.ratio`` (mixed precision by
share of parameters, as in Cao et al., "Scaling laws for mixed quantization in large
language models", arXiv 2410.06722: the quantization ratio is the share of parameters
in the low-precision format).

Rule (deterministic): the candidate layers (every Linear/Conv2d without a
``quant.layer.<pattern>.weights`` override) are put in an order, and the prefix of that
order whose parameter count is closest to ``ratio`` x (their total) (ties: the shorter)
gets ``quant.weights``; the rest get ``quant.ratio_high``. ``ratio = 0``: none,
``ratio = 1``: all. Orders (``quant.ratio_rule``):

* ``depth``: module order from the input (the model's registration order, which for the
  project's models and Hugging Face Llama is the forward order): early layers go low
  first, the LM head last;
* ``sensitivity``: least sensitive first, sensitivity being the activation-weighted
  relative quantization error ``||(W - Q(W)) diag(s)||^2 / ||W diag(s)||^2`` of the layer
  in ``quant.weights``, ``s`` the mean |x| per input feature (channel) on the calibration
  batches (ones without them); ties keep module order;
* ``random``: a permutation from ``torch.Generator().manual_seed(seed)``.

The achieved share is reported as ``quant_ratio_params`` (it differs from ``ratio`` by at
most half of the layer at the boundary).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from quant.config import QuantConfig
from quant.formats import as_format

__all__ = ["select_low", "sensitivity"]


def sensitivity(mod: nn.Module, config: QuantConfig, scale: torch.Tensor | None) -> float:
    """``||(W - Q(W)) diag(s)||^2 / ||W diag(s)||^2`` of a Linear/Conv2d in ``config.weights``
    (0 for an all-zero weight)."""
    w = mod.weight.detach().float()
    axis = 1 if isinstance(mod, nn.Conv2d) else -1
    e = w - as_format(config.weights).quantize(w, axis)
    if scale is not None:
        shape = [1] * w.dim()
        shape[axis] = -1
        s = scale.float().reshape(shape)
        e, w = e * s, w * s
    sig = float(w.double().square().sum())
    return float(e.double().square().sum()) / sig if sig > 0 else 0.0


def select_low(
    mods: Mapping[str, nn.Module], config: QuantConfig,
    scales: Mapping[str, torch.Tensor] | None = None,
) -> list[str]:
    """Names of the layers that get the low-precision format (``config.weights``) for
    ``config.ratio``, in selection order; ``mods``: the candidate layers in module order."""
    if config.ratio is None:
        return list(mods)
    names = list(mods)
    if config.ratio_rule == "depth":
        order = names
    elif config.ratio_rule == "random":
        g = torch.Generator().manual_seed(config.seed)
        order = [names[i] for i in torch.randperm(len(names), generator=g).tolist()]
    else:
        sc = scales or {}
        sens = {n: sensitivity(m, config, sc.get(n)) for n, m in mods.items()}
        order = sorted(names, key=lambda n: (sens[n], names.index(n)))
    total = sum(mods[n].weight.numel() for n in names)
    target = config.ratio * total
    cum = [0]
    for n in order:
        cum.append(cum[-1] + mods[n].weight.numel())
    best = min(range(len(cum)), key=lambda j: (abs(cum[j] - target), j))
    return order[:best]
