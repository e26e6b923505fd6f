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

CHUNK_BYTES = 256 * 2**20  # default cap on conv_window_hist's working memory per chunk, bytes


def window_hist_chunks(n: int, c: int, fg: int, kk: int, positions: int,
                       max_bytes: int = CHUNK_BYTES) -> tuple[int, int]:
    """(images, filters per group) per chunk of :func:`conv_window_hist`.

    Working memory of one chunk of ``nb`` images and ``fb`` filters per group, with ``c``
    input channels, ``kk`` products per window and ``positions`` output positions: 16 bytes
    per (image, channel, product, position) for the unfolded zero mask, its padded copy and
    einsum's contiguous copy, plus 12 bytes per (image, channel, filter, position) pair
    (float32 counts, their int32 bins, and allocator slack; calibrated against measured
    peak RSS). Filters are split only when one image with every filter exceeds
    ``max_bytes``; a chunk is at least one image and one filter.
    """
    per_image_cols = 16 * c * kk * positions
    per_filter = 12 * c * positions  # one image, one filter per group
    fb = int(min(fg, max(1, (max_bytes - per_image_cols) // per_filter)))
    nb = int(min(n, max(1, max_bytes // (per_image_cols + fb * per_filter))))
    return nb, fb


def conv_window_hist(x: torch.Tensor, weight: torch.Tensor, conv: nn.Module,
                     max_chunk_bytes: int = CHUNK_BYTES) -> list[list[float]]:
    """Per-input-channel histogram of zero products per (window, filter) pair.

    Grouped and depthwise convolutions (``conv.groups = g > 1``): input channel ``c`` lies
    in group ``q = c // (C/g)`` and only meets the filters of that group, so its products
    are ``x[c, window] * weight[f, c - q*C/g]`` for the F/g filters ``f`` of group ``q``.

    Counting runs in chunks of images and filters (:func:`window_hist_chunks`) so that its
    working memory stays near ``max_chunk_bytes`` (bytes) whatever the batch and layer
    size; the counts are integers, so the result does not depend on the chunking.

    Args:
        x: the conv's input (N, C, H, W); weight: the effective weight (F, C/g, kh, kw).
        conv: the module (stride, padding, dilation, groups).
        max_chunk_bytes: working-memory cap per chunk in bytes (at least one image and one
            filter per chunk).

    Returns:
        C lists of kh*kw+1 fractions (each sums to 1).
    """
    g = int(getattr(conv, "groups", 1))
    n, c, _, _ = x.shape
    f, cg, kh, kw = weight.shape
    if g < 1 or c % g or f % g or cg * g != c:
        raise ValueError(f"groups: expected a divisor of {c} input channels and {f} filters "
                         f"with weight (F, C/groups, kh, kw), got groups={g} and weight {tuple(weight.shape)}")
    if max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes: expected a positive number of bytes, got {max_chunk_bytes}")
    fg = f // g
    kk = kh * kw
    unfold = {"kernel_size": (kh, kw), "dilation": conv.dilation, "padding": conv.padding, "stride": conv.stride}
    # Padding positions hold zero activations: unfold pads the *mask* with 0 (= nonzero),
    # so count them explicitly with an all-ones input.
    pad_cols = F.unfold(torch.ones(1, 1, x.shape[2], x.shape[3]), **unfold)
    is_pad = (pad_cols[0] == 0).to(torch.float32)  # (kk, L)
    positions = is_pad.shape[1]
    zw = (weight == 0).to(torch.float32).view(g, fg, cg, kk)  # (g, F/g, C/g, kk)
    count_w = zw.sum(3).transpose(1, 2)  # (g, C/g, F/g)
    offsets = (torch.arange(c, dtype=torch.int32) * (kk + 1))[None, :, None, None]
    counts = torch.zeros(c * (kk + 1), dtype=torch.int64)
    nb, fb = window_hist_chunks(n, c, fg, kk, positions, max_chunk_bytes)
    for n0 in range(0, n, nb):
        cols = F.unfold((x[n0:n0 + nb] == 0).to(torch.float32), **unfold)  # (nb, C*kk, L); padding -> 0
        za = torch.maximum(cols.view(cols.shape[0], g, cg, kk, -1), is_pad[None, None, None])  # (nb, g, C/g, kk, L)
        del cols
        count_a = za.sum(3)[:, :, :, None, :]  # (nb, g, C/g, 1, L)
        for f0 in range(0, fg, fb):
            # zeros = zero activations + zero weights - both zero, per (image, channel, filter, position)
            zeros = torch.einsum("nqcjl,qfcj->nqcfl", za, zw[:, f0:f0 + fb])  # (nb, g, C/g, fb, L)
            zeros.neg_().add_(count_a).add_(count_w[None, :, :, f0:f0 + fb, None])
            bins = zeros.round_().to(torch.int32, memory_format=torch.contiguous_format).clamp_(0, kk)
            bins = bins.view(za.shape[0], c, -1, positions)
            del zeros
            counts += torch.bincount(bins.add_(offsets).flatten(), minlength=c * (kk + 1))
    hist = counts.view(c, kk + 1).to(torch.float64)
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
