"""Model transforms: quantized Linear/Conv2d wrappers, attention-matmul and KV-cache modules,
LQER low-rank error correction, and ``quantize_model``.

Use inside a model (the project's own transformers)::

    class Attention(nn.Module):
        def __init__(self, ...):
            self.qk = quant.QMatmul()      # scores = self.qk(q, k.transpose(-2, -1))
            self.pv = quant.QMatmul()      # out = self.pv(probs, v)
            self.k_cache = quant.KVQuant() # k = self.k_cache(k) where K is written
            self.v_cache = quant.KVQuant() # v = self.v_cache(v)

Both are exact identities until ``quantize_model`` sets their formats (``quant.attn`` /
``quant.kv``), so a model that uses them costs nothing in fp32.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quant.config import QuantConfig, match_pattern
from quant.desc import FormatDesc
from quant.formats import as_format, get_format
from quant.lqer import LQERCache, lqer_svd
from quant.ratio import select_low

__all__ = [
    "QMatmul",
    "KVQuant",
    "QLinear",
    "QConv2d",
    "QuantReport",
    "quantize_model",
    "kv_attention",
    "kv_recent_mask",
    "lqer_factors",
    "calibrate_input_scales",
    "run_batch",
]

FP32 = get_format("fp32")


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a calibration batch: a tensor, a tuple/list (positional) or a dict."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class QMatmul(nn.Module):
    """``a @ b`` with both inputs fake-quantized along the reduction axis.

    ``a`` is quantized along its last axis, ``b`` along its second-to-last (``b``'s
    reduction axis in ``a @ b``), so blocks follow the contraction as on hardware. Identity
    (plain ``a @ b``) until ``quantize_model`` sets ``fmt`` from ``quant.attn`` (or a
    ``quant.layer.<pattern>.acts`` override naming this module). Use it for QK^T and PV.
    """

    def __init__(self, fmt: FormatDesc | str = FP32) -> None:
        super().__init__()
        self.fmt = as_format(fmt)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.fmt.is_identity:
            return a @ b
        return self.fmt.quantize(a, -1) @ self.fmt.quantize(b, -2)

    def extra_repr(self) -> str:  # noqa: D102
        return f"fmt={self.fmt.name}"


class KVQuant(nn.Module):
    """Quantize K or V as written to the cache (``quant.kv``), in a layout.

    ``layout`` (``quant.kv_k_layout`` / ``quant.kv_v_layout``): ``token`` quantizes each
    token's vector along the head dim (last axis; blocks/groups of head-dim channels, one
    scale per token and group), ``channel`` quantizes each channel along the token axis
    (axis -2; blocks/groups of consecutive tokens counted from position 0, one scale per
    channel and token group): KIVI (Liu et al., ICML 2024) quantizes K per channel and V
    per token. The group size is the format's own (``int2(asym,group=32)``, ``mxint2``:
    32). ``window`` (``quant.kv_window``): the most recent ``window`` tokens of every
    query's past stay in full precision (KIVI's residual); :func:`kv_attention` honours
    it, plain ``forward`` refuses a window (its caller would silently ignore it).

    Identity until ``quantize_model`` sets ``fmt``. Call it on each new K (and V) slice
    before it is stored / used, e.g. ``k = self.k_cache(k)``: ``(B, H, T, head_dim)``.
    """

    LAYOUTS = ("token", "channel")

    def __init__(self, fmt: FormatDesc | str = FP32, layout: str = "token", window: int = 0
                 ) -> None:
        super().__init__()
        self.fmt = as_format(fmt)
        self.layout = layout
        self.window = int(window)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., tokens, head_dim) fake-quantized in ``fmt`` and ``layout``."""
        if self.fmt.is_identity:
            return x
        return self.fmt.quantize(x, -1 if self.layout == "token" else -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.window > 0 and not self.fmt.is_identity:
            raise ValueError("quant.kv_window: this model's attention does not support a "
                             "full-precision window (expected 0)")
        return self.quantize(x)

    def extra_repr(self) -> str:  # noqa: D102
        return f"fmt={self.fmt.name}, layout={self.layout}, window={self.window}"


def kv_recent_mask(t: int, s: int, window: int, device: torch.device | None = None
                   ) -> torch.Tensor:
    """(t, s) bool mask, True where key ``j`` is among the ``window`` most recent tokens
    of query ``i`` (queries are the last ``t`` of ``s`` positions): ``0 <= (s - t + i) - j
    < window``. Those keys/values are read in full precision under ``quant.kv_window``."""
    qpos = torch.arange(s - t, s, device=device)[:, None]
    d = qpos - torch.arange(s, device=device)[None, :]
    return (d >= 0) & (d < window)


def kv_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
    scale: float, mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention through ``module.qk`` / ``module.pv`` (QMatmul) with the K/V cache
    ``module.k_cache`` / ``module.v_cache`` (KVQuant: format, layout, window).

    Shapes: ``query (B, H, T, D)``, unquantized ``key``/``value (B, Hkv, S, D)`` (``H`` a
    multiple of ``Hkv``: grouped-query attention without repeating K/V; the query heads are
    grouped per KV head, ``(B, Hkv, rep*T, D)``, so every block QMatmul forms along the
    reduction axis is the one it would form on repeated tensors). ``mask``: bool ``(T, S)``,
    True = not attended (causal); ``attention_mask``: an extra bool (True = attend) or
    additive mask broadcast to ``(B, H, T, S)``. Returns ``(B, H, T, D)``.

    ``quant.kv_window = W``: the keys/values among each query's W most recent positions
    (:func:`kv_recent_mask`) are read unquantized: QK^T is formed with both and selected
    per entry, PV runs as two matmuls on the split probabilities. Needs a causal ``mask``.
    """
    kc, vc = module.k_cache, module.v_cache
    k, v = kc.quantize(key), vc.quantize(value)
    b, h, t, d = query.shape
    hkv, s = k.shape[1], k.shape[2]
    rep = h // hkv
    qg = query.reshape(b, hkv, rep * t, d)
    scores = module.qk(qg, k.transpose(-2, -1)).view(b, h, t, s)
    window = 0 if kc.fmt.is_identity and vc.fmt.is_identity else max(kc.window, vc.window)
    if window > 0 and mask is None:
        raise ValueError("quant.kv_window: needs causal attention (expected 0 here)")
    recent = kv_recent_mask(t, s, window, scores.device) if window > 0 else None
    if recent is not None and kc.window > 0 and not kc.fmt.is_identity:
        fresh = module.qk(qg, key.transpose(-2, -1)).view(b, h, t, s)
        scores = torch.where(recent, fresh, scores)
    scores = scores.mul_(scale)
    if mask is not None:
        scores.masked_fill_(mask, float("-inf"))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask[..., :t, :s], float("-inf"))
        else:
            scores = scores + attention_mask[..., :t, :s]
    probs = scores.softmax(dim=-1)
    if recent is not None and vc.window > 0 and not vc.fmt.is_identity:
        # sum_j p_ij v_j with v_j unquantized for recent j: two PV matmuls on split probs
        old = probs.masked_fill(recent, 0.0).view(b, hkv, rep * t, s)
        new = probs.masked_fill(~recent, 0.0).view(b, hkv, rep * t, s)
        return (module.pv(old, v) + module.pv(new, value)).view(b, h, t, d)
    return module.pv(probs.view(b, hkv, rep * t, s), v).view(b, h, t, d)


class _KVOutputHook:
    """Forward hook quantizing a module's output with the KV format (HF k_proj / v_proj)."""

    def __init__(self, fmt: FormatDesc) -> None:
        self.fmt = as_format(fmt)

    def __call__(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return self.fmt.quantize(out, -1)


def calibrate_input_scales(
    model: nn.Module, calib: Iterable[Any], names: set[str]
) -> dict[str, torch.Tensor]:
    """Mean |x| per input feature of the named Linear (last axis) and Conv2d (axis 1,
    channels) modules over the calibration batches.

    Returns ``{name: tensor(in_features or in_channels)}`` (float32). ``model`` is run under
    ``no_grad``.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make(name: str, conv: bool) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            if conv:
                x = x.movedim(1, -1)
            x = x.reshape(-1, x.shape[-1]).abs()
            sums[name] = sums.get(name, 0) + x.sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for name, mod in model.named_modules():
        if name in names:
            hooks.append(mod.register_forward_pre_hook(make(name, isinstance(mod, nn.Conv2d))))
    try:
        with torch.no_grad():
            for batch in calib:
                run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def lqer_factors(
    weight: torch.Tensor,
    weight_q: torch.Tensor,
    rank: int,
    act_scale: torch.Tensor | None = None,
    fmt: FormatDesc = FP32,
    cache: LQERCache | None = None,
    w_fmt: FormatDesc | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LQER factors ``A (in, k)``, ``B (k, out)`` with ``X A B ~= X (W - Wq)^T``.

    SVD of the activation-scaled error ``E S = U Sigma V^T`` (``E = W - Wq``, ``S =
    diag(act_scale)``, the calibrated mean |x| per input feature; ones if None), truncated to
    rank k: ``A = S^-1 V_k``, ``B = Sigma_k U_k^T``, then A and B are fake-quantized in
    ``fmt`` along their reduction axis (axis 0 of both). At full rank with fp32 factors,
    ``A B = E^T`` to float tolerance (the SVD runs in float64).

    With ``cache`` (and ``w_fmt``, the format that made ``weight_q``), the SVD is computed
    once per (weights, ``w_fmt``, ``act_scale``) and reused for every rank up to the
    stored one; the factors are bit-identical to computing them here (quant/lqer.py).
    """
    if cache is not None:
        if w_fmt is None:
            raise ValueError("lqer_factors: a cache needs w_fmt (the weight format)")
        a, b = cache.factors(weight, weight_q, w_fmt.name, act_scale, rank)
    else:
        a, b = lqer_svd(weight, weight_q, act_scale, rank)
    q = as_format(fmt)
    return q.quantize(a, 0), q.quantize(b, 0)


def _copy_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Keep forward hooks (e.g. sparsity activation thresholds) when a module is wrapped."""
    dst._forward_pre_hooks.update(src._forward_pre_hooks)
    dst._forward_hooks.update(src._forward_hooks)
    for bname, buf in src.named_buffers(recurse=False):
        if bname not in dst._buffers:
            dst.register_buffer(bname, buf)


def _own_copy(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is a compact tensor with storage of its own (a fresh quantize
    result), else a contiguous copy: never an alias of ``src`` or of a padded buffer."""
    own = (t.is_contiguous() and t.storage_offset() == 0
           and t.untyped_storage().nbytes() == t.numel() * t.element_size()
           and t.untyped_storage().data_ptr() != src.untyped_storage().data_ptr())
    return t if own else t.clone(memory_format=torch.contiguous_format)


class QLinear(nn.Module):
    """``nn.Linear`` with a quantized weight, fake-quantized inputs and optional LQER.

    The weight is quantized once at construction along the reduction axis (in_features);
    inputs are fake-quantized per forward along their last axis. Forward:
    ``Xq Wq^T + b`` plus, with LQER rank k > 0, ``(Xq A) B``.
    """

    def __init__(
        self,
        linear: nn.Linear,
        w_fmt: FormatDesc,
        a_fmt: FormatDesc,
        lqer_rank: int = 0,
        lqer_fmt: FormatDesc = FP32,
        act_scale: torch.Tensor | None = None,
        lqer_cache: LQERCache | None = None,
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.w_fmt, self.a_fmt = w_fmt, a_fmt = as_format(w_fmt), as_format(a_fmt)
        w = linear.weight.detach()
        wq = w_fmt.quantize(w, -1)
        self.weight = nn.Parameter(_own_copy(wq, w), requires_grad=False)
        self.bias = linear.bias
        self.lqer_rank = int(lqer_rank)
        self.lqer_A: torch.Tensor | None
        self.lqer_B: torch.Tensor | None
        if self.lqer_rank > 0:
            # the parameter itself (not a detached alias): its digest is remembered per object
            a, b = lqer_factors(linear.weight, wq, self.lqer_rank, act_scale, lqer_fmt,
                                lqer_cache, w_fmt)
            self.register_buffer("lqer_A", a.to(w.dtype))
            self.register_buffer("lqer_B", b.to(w.dtype))
        else:
            self.lqer_A = self.lqer_B = None
        _copy_hooks(linear, self)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized with the input format (along its last axis).

        Layers fed the same tensor (an attention block's q/k/v projections, an MLP's
        gate/up) quantize it once: the result is kept on ``x`` (``x._dse_xq``) for as long
        as ``x`` lives unmodified (same ``_version``) and is reused for an equal format.
        Only when ``x`` needs no gradient (and is not an inference-mode tensor, which has
        no version counter), so the reuse is exact and builds no graph.
        """
        fmt = self.a_fmt
        if x.requires_grad or fmt.is_identity or x.is_inference():
            return fmt.quantize(x, -1)
        hit = getattr(x, "_dse_xq", None)
        if hit is not None and hit[1] == x._version and (hit[0] is fmt or hit[0] == fmt):
            return hit[2]
        xq = fmt.quantize(x, -1)
        x._dse_xq = (fmt, x._version, xq)  # type: ignore[attr-defined]
        return xq

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        xq = self.quantized_input(x)
        y = nn.functional.linear(xq, self.weight, self.bias)
        if self.lqer_A is not None and self.lqer_B is not None:
            y = y + (xq @ self.lqer_A) @ self.lqer_B
        return y

    def extra_repr(self) -> str:  # noqa: D102
        return (f"in={self.in_features}, out={self.out_features}, w={self.w_fmt.name}, "
                f"a={self.a_fmt.name}, lqer_rank={self.lqer_rank}")


class QConv2d(nn.Module):
    """``nn.Conv2d`` with quantized weight and inputs, blocks along input channels (axis 1).

    The weight ``(out, in/groups, kh, kw)`` is quantized once along axis 1; the input
    ``(N, C, H, W)`` per forward along axis 1 (channels), i.e. along the reduction axis of
    the im2col GEMM, channel-major.
    """

    def __init__(self, conv: nn.Conv2d, w_fmt: FormatDesc, a_fmt: FormatDesc) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self._rpad = conv._reversed_padding_repeated_twice
        self.w_fmt, self.a_fmt = w_fmt, a_fmt = as_format(w_fmt), as_format(a_fmt)
        w = conv.weight.detach()
        self.weight = nn.Parameter(_own_copy(w_fmt.quantize(w, 1), w), requires_grad=False)
        self.bias = conv.bias
        _copy_hooks(conv, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        xq = self.a_fmt.quantize(x, 1)
        pad: Any = self.padding
        if self.padding_mode != "zeros":
            xq = nn.functional.pad(xq, self._rpad, mode=self.padding_mode)
            pad = 0
        return nn.functional.conv2d(xq, self.weight, self.bias, self.stride, pad,
                                    self.dilation, self.groups)

    def extra_repr(self) -> str:  # noqa: D102
        return (f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, "
                f"w={self.w_fmt.name}, a={self.a_fmt.name}")


@dataclass
class QuantReport:
    """What ``quantize_model`` did.

    Attributes:
        quant_ratio_params: share of Linear/Conv2d weight elements stored in the
            low-precision format (``quant.weights`` under ``quant.ratio``, else the weight
            format with the fewest nominal bits per element in use; ties: every format
            with that many bits), when below 32 bits;
            else 0 (arXiv 2410.06722's quantization ratio; denominator: all Linear/Conv2d
            weight elements). Half mxint4 / half bf16 is 0.5.
        quant_ratio_matmuls: share of matmuls (Linear, Conv2d, QMatmul) whose operands are
            all in formats with fewer than 32 bits.
        avg_weight_bits: element-weighted mean storage bits of Linear/Conv2d weights
            (incl. shared scales, LQER factors added to their layer's bits).
        avg_act_bits: mean bits of matmul input activations, one entry per matmul
            operand that is an activation (Linear/Conv input, both QMatmul inputs).
        kv_bits: bits per element of the KV cache format (32.0 when fp32).
        memory_density: 32 / avg_weight_bits.
        per_layer: ``{module name: {...}}`` JSON-able details per module.
    """

    quant_ratio_params: float = 0.0
    quant_ratio_matmuls: float = 0.0
    avg_weight_bits: float = 32.0
    avg_act_bits: float = 32.0
    kv_bits: float = 32.0
    memory_density: float = 1.0
    per_layer: dict[str, dict[str, Any]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The scalar fields as a flat metric dict (names as in docs/params.md)."""
        return {
            "quant_ratio_params": self.quant_ratio_params,
            "quant_ratio_matmuls": self.quant_ratio_matmuls,
            "avg_weight_bits": self.avg_weight_bits,
            "avg_act_bits": self.avg_act_bits,
            "kv_bits": self.kv_bits,
            "memory_density": self.memory_density,
        }


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantize_model(
    model: nn.Module, config: QuantConfig, calib: Iterable[Any] | None = None,
    *, input_scales: dict[str, torch.Tensor] | None = None,
    lqer_cache: LQERCache | None = None,
) -> tuple[nn.Module, QuantReport]:
    """Return a quantized deep copy of ``model`` and a report; ``model`` is not touched.

    * every ``nn.Linear`` becomes a ``QLinear`` (weight format ``config.weight_format(name)``,
      input format ``config.act_format(name)``, LQER rank ``config.lqer_rank``), every
      ``nn.Conv2d`` a ``QConv2d``; modules whose formats are both fp32 (and no LQER) are left
      as they are;
    * every ``QMatmul`` gets ``config.matmul_format(name)`` (``quant.attn`` by default),
      every ``KVQuant`` gets ``config.kv``;
    * if the model has no ``KVQuant`` and ``config.kv`` is not fp32, the outputs of modules
      matching ``config.kv_proj_patterns`` (HF ``k_proj``/``v_proj``) are quantized with
      ``config.kv`` by a forward hook.

    ``calib`` (an iterable of batches: tensor, tuple or dict, fed as in ``run_batch``) is
    used by LQER for the per-input-feature activation scales; without it the scales are 1
    (plain SVD of the weight error). ``input_scales``: those scales when already known
    (``calibrate_input_scales`` of this same model and ``calib``); then ``calib`` is not
    run. ``lqer_cache``: an :class:`quant.lqer.LQERCache` reusing each layer's SVD across
    ranks and calls (bit-identical factors).
    """
    # The copy shares the given model's parameters and buffers instead of duplicating them:
    # nothing here writes to them (replaced layers get new quantized tensors), so the
    # original stays untouched while peak memory stays near one model (SmolLM2-135M:
    # about 1.1 GB less than a full deepcopy).
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    new = copy.deepcopy(model, shared)
    new.eval()
    mods = dict(new.named_modules())
    layers = {n: m for n, m in mods.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    by_ratio = config.ratio is not None
    need_scales = config.lqer_rank > 0 or (by_ratio and config.ratio_rule == "sensitivity")
    scales: dict[str, torch.Tensor] = {}
    if need_scales and input_scales is not None:
        scales = dict(input_scales)
    elif need_scales and calib is not None:
        scales = calibrate_input_scales(new, calib, set(layers))
    ratio_layers: dict[str, nn.Module] = {}
    low: set[str] = set()
    if by_ratio:  # layers with an explicit weight override keep it
        ratio_layers = {n: m for n, m in layers.items()
                        if match_pattern(n, config.layer_weights) is None}
        low = set(select_low(ratio_layers, config, scales))

    report = QuantReport(kv_bits=config.kv.bits_per_element())
    w_elems = 0
    w_nominal: list[tuple[int, float]] = []  # (params, nominal bits) per layer
    w_bits_sum = 0.0
    act_bits: list[float] = []
    n_mm = n_mm_low = 0
    has_kvq = any(isinstance(m, KVQuant) for m in mods.values())

    for name, mod in mods.items():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            wf, af = config.weight_format(name), config.act_format(name)
            if name in ratio_layers:
                wf = config.weights if name in low else config.ratio_high
            is_lin = isinstance(mod, nn.Linear)
            rank = config.lqer_rank if (is_lin and not wf.is_identity) else 0
            axis = -1 if is_lin else 1
            shape = tuple(mod.weight.shape)
            n = mod.weight.numel()
            bits = wf.bits_per_element(shape, axis)
            lqer_bits = 0.0
            if rank > 0:
                k = min(rank, shape[0], shape[1])
                lqer_bits = (config.lqer_format.tensor_bytes((shape[1], k), 0)
                             + config.lqer_format.tensor_bytes((k, shape[0]), 0)) * 8.0 / n
            if not (wf.is_identity and af.is_identity and rank == 0):
                if is_lin:
                    q: nn.Module = QLinear(mod, wf, af, rank, config.lqer_format,
                                           scales.get(name), lqer_cache)
                else:
                    q = QConv2d(mod, wf, af)
                if name:
                    _set_child(new, name, q)
                else:  # the model itself is a Linear / Conv2d
                    new = q
            w_elems += n
            w_bits_sum += (bits + lqer_bits) * n
            w_nominal.append((n, wf.bits_per_element()))
            a_bits = af.bits_per_element()
            act_bits.append(a_bits)
            n_mm += 1
            n_mm_low += int(bits < 32 and a_bits < 32)
            report.per_layer[name] = {
                "kind": "linear" if is_lin else "conv2d",
                "weight_format": wf.name, "act_format": af.name,
                "weight_bits": bits, "act_bits": a_bits, "params": n,
                "lqer_rank": rank, "lqer_bits": lqer_bits,
                **({"ratio_low": name in low} if name in ratio_layers else {}),
                "weight_bytes": wf.tensor_bytes(shape, axis),
            }
        elif isinstance(mod, QMatmul):
            f = config.matmul_format(name)
            mod.fmt = as_format(f)
            b = f.bits_per_element()
            act_bits += [b, b]
            n_mm += 1
            n_mm_low += int(b < 32)
            report.per_layer[name] = {"kind": "matmul", "act_format": f.name, "act_bits": b}
        elif isinstance(mod, KVQuant):
            mod.fmt = as_format(config.kv)
            mod.layout = config.kv_k_layout if name.endswith("k_cache") else config.kv_v_layout
            mod.window = config.kv_window
            report.per_layer[name] = {"kind": "kv", "kv_format": config.kv.name,
                                      "kv_bits": report.kv_bits, "kv_layout": mod.layout,
                                      "kv_window": mod.window}

    if not has_kvq and not config.kv.is_identity and config.kv_proj_patterns:
        from fnmatch import fnmatchcase

        if (config.kv_k_layout, config.kv_v_layout, config.kv_window) != ("token", "token", 0):
            raise ValueError("quant.kv_k_layout/kv_v_layout/kv_window: this model has no "
                             "KVQuant modules (its k_proj/v_proj hook supports the default "
                             "token layout and no window)")

        for name, mod in list(new.named_modules()):
            if name and any(fnmatchcase(name, p) for p in config.kv_proj_patterns):
                mod.register_forward_hook(_KVOutputHook(config.kv))
                report.per_layer.setdefault(name, {})["kv_output_format"] = config.kv.name

    if w_elems:
        # arXiv 2410.06722: share of parameters in the low-precision format: quant.weights
        # under quant.ratio, else the weight format with the fewest (nominal) bits in use
        lo = config.weights.bits_per_element() if by_ratio else min(b for _, b in w_nominal)
        if lo < 32:
            report.quant_ratio_params = sum(n for n, b in w_nominal if b == lo) / w_elems
        report.avg_weight_bits = w_bits_sum / w_elems
    if n_mm:
        report.quant_ratio_matmuls = n_mm_low / n_mm
    if act_bits:
        report.avg_act_bits = sum(act_bits) / len(act_bits)
    report.memory_density = 32.0 / report.avg_weight_bits if report.avg_weight_bits else math.inf
    return new, report
