"""Measured weight/activation sparsity of convolutions and linear layers.

The output feeds the dataflow simulator (zero-skipping cuts a layer's cycles by the
share of zero products). For a layer with weight ``W`` and input activation ``A``, a
*product* ``W[f, c, j] * A[c, window, j]`` is zero when the weight or the activation is
zero (exact zeros: after quantization and pruning).

* k x k convolution (k > 1): ``{"kind": "window_hist", "hist": [per input channel c:
  k*k+1 fractions]}`` where ``hist[c][n]`` is the share of (window, filter) pairs whose
  k*k products in channel ``c`` contain exactly ``n`` zeros (sums to 1 per channel).
  Zero padding counts as zero activations. Grouped/depthwise convolutions: channel ``c``
  pairs only with the filters of its own group.
* 1x1 convolution and linear layer: ``{"kind": "pointwise_avg", "avg": [per input
  channel c: share of zero products]}``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant import QConv2d, QLinear


def conv_window_hist(x: torch.Tensor, weight: torch.Tensor, conv: nn.Module) -> list[list[float]]:
    """Per-input-channel histogram of zero products per (window, filter) pair.

    Grouped and depthwise convolutions (``conv.groups = g > 1``): input channel ``c`` lies
    in group ``q = c // (C/g)`` and only meets the filters of that group, so its products
    are ``x[c, window] * weight[f, c - q*C/g]`` for the F/g filters ``f`` of group ``q``.

    Args:
        x: the conv's input (N, C, H, W); weight: the effective weight (F, C/g, kh, kw).
        conv: the module (stride, padding, dilation, groups).

    Returns:
        C lists of kh*kw+1 fractions (each sums to 1).
    """
    g = int(getattr(conv, "groups", 1))
    n, c, _, _ = x.shape
    f, cg, kh, kw = weight.shape
    if g < 1 or c % g or f % g or cg * g != c:
        raise ValueError(f"groups: expected a divisor of {c} input channels and {f} filters "
                         f"with weight (F, C/groups, kh, kw), got groups={g} and weight {tuple(weight.shape)}")
    fg = f // g
    kk = kh * kw
    cols = F.unfold((x == 0).to(torch.float32), (kh, kw), dilation=conv.dilation,
                    padding=conv.padding, stride=conv.stride)  # (N, C*kk, L); padding -> 0
    # Padding positions hold zero activations: unfold pads the *mask* with 0 (= nonzero),
    # so count them explicitly with an all-ones input.
    pad_cols = F.unfold(torch.ones(1, 1, x.shape[2], x.shape[3]), (kh, kw),
                        dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    is_pad = (pad_cols[0] == 0).to(torch.float32)  # (kk, L)
    za = cols.view(n, g, cg, kk, -1)
    za = torch.maximum(za, is_pad[None, None, None])  # (N, g, C/g, kk, L)
    zw = (weight == 0).to(torch.float32).view(g, fg, cg, kk)  # (g, F/g, C/g, kk)
    count_a = za.sum(3)  # (N, g, C/g, L)
    count_w = zw.sum(3).transpose(1, 2)  # (g, C/g, F/g)
    both = torch.einsum("nqcjl,qfcj->nqcfl", za, zw)  # (N, g, C/g, F/g, L)
    zeros = count_a[:, :, :, None, :] + count_w[None, :, :, :, None] - both
    zeros = zeros.round().to(torch.int64).clamp_(0, kk).reshape(n, c, fg, -1)
    idx = zeros + (torch.arange(c) * (kk + 1))[None, :, None, None]
    hist = torch.bincount(idx.flatten(), minlength=c * (kk + 1)).view(c, kk + 1).to(torch.float64)
    hist = hist / hist.sum(1, keepdim=True)
    return hist.tolist()


def pointwise_avg(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> list[float]:
    """Per-input-channel share of zero products for a 1x1 conv or a linear layer.

    Args:
        x: input, channels on dim 1 for conv (N, C, H, W) or last dim for linear (..., C).
        weight: (F, C/groups) or (F, C/groups, 1, 1).
        groups: convolution groups; channel ``c`` of group ``q`` meets only that group's
            F/groups filters (weight column ``c - q*C/groups``).
    """
    w = weight.reshape(weight.shape[0], weight.shape[1])
    if x.dim() == 4:
        xa = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, positions)
    else:
        xa = x.reshape(-1, x.shape[-1]).t()
    c, (f, cg) = xa.shape[0], w.shape
    if groups < 1 or c % groups or f % groups or cg * groups != c:
        raise ValueError(f"groups: expected a divisor of {c} input channels and {f} filters "
                         f"with weight (F, C/groups), got groups={groups} and weight {tuple(weight.shape)}")
    pa = (xa == 0).to(torch.float64).mean(1)  # (C,) share of zero activations
    # (C,) share of zero weights in each channel's column, over its group's filters only
    pw = (w == 0).to(torch.float64).view(groups, f // groups, cg).mean(1).reshape(c)
    # P(zero product) = pa + pw - pa*pw, exact since each (activation, weight) pair is
    # independent as a pair enumeration: count over all (position, filter) pairs.
    return (pa + pw - pa * pw).tolist()


WEIGHTED = (nn.Linear, nn.Conv2d, QLinear, QConv2d)


def weighted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear/Conv2d modules (plain or quantized by ``quant``) by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, WEIGHTED)}


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a module multiplies with: the stored (quantized, masked) weight, plus the
    LQER correction ``(A B)^T`` of a ``quant.QLinear`` with rank > 0."""
    w = module.weight.detach()  # type: ignore[union-attr]
    a, b = getattr(module, "lqer_A", None), getattr(module, "lqer_B", None)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        w = w + (a @ b).t()
    return w


def quantized_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input a module actually multiplies: ``x`` fake-quantized with its act format."""
    if isinstance(module, QLinear):
        return module.a_fmt.quantize(x, -1)
    if isinstance(module, QConv2d):
        return module.a_fmt.quantize(x, 1)
    return x


def layer_sparsity(
    model: nn.Module, images: torch.Tensor, names: dict[nn.Module, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Run ``model`` on ``images`` and measure every Conv2d/Linear's zero products.

    Args:
        model: the (transformed) model; images: calibration batch (N, C, H, W).
        names: optional module -> name map (defaults to ``model.named_modules()``).

    Returns:
        JSON-able dict keyed by the module's qualified name (see module docstring).
    """
    names = names or {m: n for n, m in model.named_modules()}
    out: dict[str, dict[str, Any]] = {}
    handles = []

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        x = quantized_input(mod, args[0].detach())
        w = effective_weight(mod)
        name = names[mod]
        if w.dim() == 4 and w.shape[2] * w.shape[3] > 1:
            out[name] = {"kind": "window_hist", "hist": conv_window_hist(x, w, mod)}
        else:
            groups = int(getattr(mod, "groups", 1))
            out[name] = {"kind": "pointwise_avg", "avg": pointwise_avg(x, w, groups)}

    for mod in names:
        if isinstance(mod, WEIGHTED):
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return out
