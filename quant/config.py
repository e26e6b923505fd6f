"""`QuantConfig` and `SparsityConfig`: the `quant.*` / `sparsity.*` parameters of docs/params.md.

Both are frozen values built either directly or with ``from_params(params)`` from a trial's
flat dotted-name dict. Each reads only its own prefix; an unknown name *inside* its prefix
is a ``ValueError`` (a typo in a search space must not be silently ignored).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from quant.desc import (
    FINETUNE_PARAMS,
    KV_LAYOUTS,
    RATIO_RULES,
    SALIENCES,
    FormatDesc,
    describe,
)

__all__ = ["QuantConfig", "SparsityConfig", "FinetuneConfig", "SALIENCES", "RATIO_RULES",
           "KV_LAYOUTS", "FINETUNE_PARAMS", "match_pattern"]

FP32 = describe("fp32")
BF16 = describe("bf16")


def match_pattern(name: str, overrides: tuple[tuple[str, Any], ...]) -> Any | None:
    """Value of the winning override for module ``name``, or None.

    Patterns are fnmatch globs matched against the module's qualified name. The longest
    matching pattern wins; among equally long ones, the one given later.
    """
    best: tuple[int, int] | None = None
    value = None
    for i, (pat, v) in enumerate(overrides):
        if fnmatchcase(name, pat):
            key = (len(pat), i)
            if best is None or key > best:
                best, value = key, v
    return value


def _fmt(param: str, v: Any) -> FormatDesc:
    if isinstance(v, FormatDesc):
        return v
    try:
        return describe(v)
    except ValueError as err:
        raise ValueError(f"{param}: {err}") from None


def _int(param: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
        raise ValueError(f"{param}: expected an integer >= {lo}, got {v!r}")
    if int(v) < lo:
        raise ValueError(f"{param}: expected an integer >= {lo}, got {v!r}")
    return int(v)


def _float(param: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{param}: expected a number in [{lo}, {hi}], got {v!r}")
    if not lo <= float(v) <= hi:
        raise ValueError(f"{param}: expected a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _layer_key(param: str, prefix: str, fields: tuple[str, ...]) -> tuple[str, str]:
    rest = param[len(prefix):]
    pattern, _, fld = rest.rpartition(".")
    if not pattern or fld not in fields:
        raise ValueError(
            f"{param}: expected {prefix}<pattern>.<field> with field one of {', '.join(fields)}"
        )
    return pattern, fld


@dataclass(frozen=True)
class QuantConfig:
    """Which format every tensor gets (see docs/params.md, `quant.*`).

    Formats are held as descriptions (:class:`quant.desc.FormatDesc`: name, bits, multiplier
    cost; no torch), so a simulator reads a candidate's formats without importing torch;
    ``quantize_model`` turns them into quantizers (``quant.formats.as_format``). A
    ``quant.Format`` given here is kept as it is (it is a description too).

    Attributes:
        weights: default format of every Linear/Conv2d weight.
        acts: default format of every Linear/Conv2d input activation.
        kv: K/V cache format (quantized on write, by ``quant.KVQuant`` modules or, for
            models without them, on the outputs of modules matching ``kv_proj_patterns``).
        attn: format of both inputs of the attention matmuls (``quant.QMatmul``); ``None``
            means "same as ``acts``".
        lqer_rank: LQER rank k for every quantized Linear (0 = off).
        lqer_format: format of the LQER factors A and B.
        layer_weights / layer_acts: ``(pattern, FormatDesc)`` overrides by module name (fnmatch
            glob; the longest matching pattern wins, later wins ties). ``layer_acts`` also
            applies to ``QMatmul`` modules (matmul granularity).
        kv_proj_patterns: modules whose *outputs* are quantized with ``kv`` when the model
            has no ``KVQuant`` module (Hugging Face Llama: ``k_proj`` / ``v_proj``). The
            quantization runs along the last axis (the hidden dim, head-aligned when the head
            dim is a multiple of the block), before RoPE: an approximation of a post-RoPE
            cache, documented in docs/quant.md. Empty tuple disables it.
        ratio: share of the weight parameters to hold in ``weights`` (the low-precision
            format); the other layers get ``ratio_high``. Only layers without a
            ``layer_weights`` override take part; ``None`` (default): every layer gets
            ``weights``. Layers are chosen by ``ratio_rule`` (``quant.ratio``).
        ratio_rule: ``depth`` | ``sensitivity`` | ``random`` (``quant.ratio.select_low``).
        ratio_high: format of the layers outside the low-precision share (default bf16).
        seed: seed of the ``random`` ratio rule.
        kv_k_layout / kv_v_layout: ``token`` (per token, along head_dim; default) or
            ``channel`` (per channel, along tokens; KIVI's K) for the K / V cache
            (``quant.KVQuant`` modules; the k_proj/v_proj hook of models without them
            supports ``token`` only).
        kv_window: the most recent tokens of every query's past kept in full precision
            (0 = none; needs causal attention through ``quant.kv_attention``).
    """

    weights: FormatDesc = FP32
    acts: FormatDesc = FP32
    kv: FormatDesc = FP32
    attn: FormatDesc | None = None
    lqer_rank: int = 0
    lqer_format: FormatDesc = FP32
    layer_weights: tuple[tuple[str, FormatDesc], ...] = ()
    layer_acts: tuple[tuple[str, FormatDesc], ...] = ()
    kv_proj_patterns: tuple[str, ...] = ("*k_proj", "*v_proj")
    ratio: float | None = None
    ratio_rule: str = "depth"
    ratio_high: FormatDesc = BF16
    seed: int = 0
    kv_k_layout: str = "token"
    kv_v_layout: str = "token"
    kv_window: int = 0

    def __post_init__(self) -> None:
        for fld in ("weights", "acts", "kv", "lqer_format", "ratio_high"):
            object.__setattr__(self, fld, _fmt(f"quant.{fld}", getattr(self, fld)))
        if self.ratio is not None:
            object.__setattr__(self, "ratio", _float("quant.ratio", self.ratio, 0.0, 1.0))
            lo, hi = self.weights.bits_per_element(), self.ratio_high.bits_per_element()
            if hi <= lo:
                raise ValueError(f"quant.ratio_high: expected a format wider than quant.weights "
                                 f"({self.weights.name}, {lo:g} bits), got "
                                 f"{self.ratio_high.name} ({hi:g} bits)")
        for fld in ("kv_k_layout", "kv_v_layout"):
            if getattr(self, fld) not in KV_LAYOUTS:
                raise ValueError(f"quant.{fld}: expected one of {', '.join(KV_LAYOUTS)}, "
                                 f"got {getattr(self, fld)!r}")
        object.__setattr__(self, "kv_window", _int("quant.kv_window", self.kv_window, 0))
        if self.ratio_rule not in RATIO_RULES:
            raise ValueError(f"quant.ratio_rule: expected one of {', '.join(RATIO_RULES)}, "
                             f"got {self.ratio_rule!r}")
        if self.attn is not None:
            object.__setattr__(self, "attn", _fmt("quant.attn", self.attn))
        object.__setattr__(self, "lqer_rank", _int("quant.lqer.rank", self.lqer_rank, 0))

    @property
    def attn_format(self) -> FormatDesc:
        """Effective attention-matmul input format (``attn`` or, when unset, ``acts``)."""
        return self.attn if self.attn is not None else self.acts

    def weight_format(self, name: str) -> FormatDesc:
        """Weight format of the module with qualified name ``name``."""
        f = match_pattern(name, self.layer_weights)
        return f if f is not None else self.weights

    def act_format(self, name: str) -> FormatDesc:
        """Input-activation format of the Linear/Conv2d module ``name``."""
        f = match_pattern(name, self.layer_acts)
        return f if f is not None else self.acts

    def matmul_format(self, name: str) -> FormatDesc:
        """Input format of the attention matmul module ``name`` (``QMatmul``)."""
        f = match_pattern(name, self.layer_acts)
        return f if f is not None else self.attn_format

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **extra: Any) -> QuantConfig:
        """Build from a trial's flat parameter dict (reads ``quant.*`` only).

        ``extra`` sets fields that have no parameter name (e.g. ``kv_proj_patterns``).

        Raises:
            ValueError: naming the parameter, for a bad value or an unknown ``quant.`` name.
        """
        kw: dict[str, Any] = {}
        lw: list[tuple[str, FormatDesc]] = []
        la: list[tuple[str, FormatDesc]] = []
        simple = {"quant.weights": "weights", "quant.acts": "acts", "quant.kv": "kv",
                  "quant.attn": "attn", "quant.lqer.format": "lqer_format",
                  "quant.ratio_high": "ratio_high"}
        for key, v in params.items():
            if not key.startswith("quant."):
                continue
            if key in simple:
                kw[simple[key]] = _fmt(key, v)
            elif key == "quant.lqer.rank":
                kw["lqer_rank"] = _int(key, v, 0)
            elif key == "quant.ratio":
                kw["ratio"] = _float(key, v, 0.0, 1.0)
            elif key in ("quant.kv_k_layout", "quant.kv_v_layout"):
                if v not in KV_LAYOUTS:
                    raise ValueError(f"{key}: expected one of {', '.join(KV_LAYOUTS)}, got {v!r}")
                kw[key[len("quant."):]] = v
            elif key == "quant.kv_window":
                kw["kv_window"] = _int(key, v, 0)
            elif key == "quant.ratio_rule":
                if v not in RATIO_RULES:
                    raise ValueError(f"{key}: expected one of {', '.join(RATIO_RULES)}, got {v!r}")
                kw["ratio_rule"] = v
            elif key.startswith("quant.layer."):
                pattern, fld = _layer_key(key, "quant.layer.", ("weights", "acts"))
                (lw if fld == "weights" else la).append((pattern, _fmt(key, v)))
            else:
                raise ValueError(
                    f"{key}: unknown quant parameter (expected one of {', '.join(simple)}, "
                    "quant.lqer.rank, quant.ratio, quant.ratio_rule, quant.kv_k_layout, "
                    "quant.kv_v_layout, quant.kv_window, "
                    "quant.layer.<pattern>.weights|acts)"
                )
        return cls(layer_weights=tuple(lw), layer_acts=tuple(la), **kw, **extra)


@dataclass(frozen=True)
class SparsityConfig:
    """Static weight masks and activation thresholds (see docs/params.md, `sparsity.*`).

    Attributes:
        density: share of weights kept in every prunable layer, in [0, 1].
        salience: how weights are ranked (``quant.salience_scores``, g = gradient of the
            mean calibration loss, g_b per batch): ``magnitude`` |w|, ``gradient`` |g|,
            ``snip`` |w * g|, ``fisher`` mean_b 0.5 (w * g_b)^2, ``random`` (seeded).
        layer_density: ``(pattern, density)`` overrides (longest pattern wins).
        act_threshold: inputs with |a| < threshold are zeroed (HASS-style), >= 0.
        layer_act_threshold: ``(pattern, threshold)`` overrides.
        seed: seed of the ``random`` salience.
    """

    density: float = 1.0
    salience: str = "magnitude"
    layer_density: tuple[tuple[str, float], ...] = ()
    act_threshold: float = 0.0
    layer_act_threshold: tuple[tuple[str, float], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        _float("sparsity.density", self.density, 0.0, 1.0)
        _float("sparsity.act_threshold", self.act_threshold, 0.0, math.inf)
        if self.salience not in SALIENCES:
            raise ValueError(
                f"sparsity.salience: expected one of {', '.join(SALIENCES)}, got {self.salience!r}"
            )
        for p, d in self.layer_density:
            _float(f"sparsity.layer.{p}.density", d, 0.0, 1.0)
        for p, t in self.layer_act_threshold:
            _float(f"sparsity.layer.{p}.act_threshold", t, 0.0, math.inf)

    def density_for(self, name: str) -> float:
        """Target weight density of module ``name``."""
        d = match_pattern(name, self.layer_density)
        return float(d) if d is not None else self.density

    def threshold_for(self, name: str) -> float:
        """Activation threshold of module ``name``."""
        t = match_pattern(name, self.layer_act_threshold)
        return float(t) if t is not None else self.act_threshold

    @classmethod
    def from_params(cls, params: Mapping[str, Any], seed: int = 0) -> SparsityConfig:
        """Build from a trial's flat parameter dict (reads ``sparsity.*`` only).

        Raises:
            ValueError: naming the parameter, for a bad value or an unknown ``sparsity.`` name.
        """
        kw: dict[str, Any] = {"seed": seed}
        ld: list[tuple[str, float]] = []
        lt: list[tuple[str, float]] = []
        for key, v in params.items():
            if not key.startswith("sparsity."):
                continue
            if key == "sparsity.density":
                kw["density"] = _float(key, v, 0.0, 1.0)
            elif key == "sparsity.act_threshold":
                kw["act_threshold"] = _float(key, v, 0.0, math.inf)
            elif key == "sparsity.salience":
                if v not in SALIENCES:
                    raise ValueError(f"{key}: expected one of {', '.join(SALIENCES)}, got {v!r}")
                kw["salience"] = v
            elif key.startswith("sparsity.layer."):
                pattern, fld = _layer_key(key, "sparsity.layer.", ("density", "act_threshold"))
                if fld == "density":
                    ld.append((pattern, _float(key, v, 0.0, 1.0)))
                else:
                    lt.append((pattern, _float(key, v, 0.0, math.inf)))
            else:
                raise ValueError(
                    f"{key}: unknown sparsity parameter (expected sparsity.density, "
                    "sparsity.salience, sparsity.act_threshold, sparsity.layer.<pattern>."
                    "density|act_threshold)"
                )
        return cls(layer_density=tuple(ld), layer_act_threshold=tuple(lt), **kw)


@dataclass(frozen=True)
class FinetuneConfig:
    """A short masked fine-tune before quantization (``finetune.*``, see quant/finetune.py).

    Attributes:
        steps: Adam steps (0 = no fine-tune).
        lr: learning rate, > 0.
        params: ``masked`` | ``all`` | ``salience`` (which parameters train).
        density: ``salience``: share of each prunable layer's weights that trains, (0, 1].
        salience: ``salience``: the metric choosing them (``SALIENCES``; default gradient,
            as SPEFT recommends).
        seed: seed of a ``random`` salience.
    """

    steps: int = 0
    lr: float = 1e-3
    params: str = "masked"
    density: float = 0.01
    salience: str = "gradient"
    seed: int = 0

    def __post_init__(self) -> None:
        _int("finetune.steps", self.steps, 0)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or \
                not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"finetune.lr: expected a number > 0, got {self.lr!r}")
        if self.params not in FINETUNE_PARAMS:
            raise ValueError(f"finetune.params: expected one of {', '.join(FINETUNE_PARAMS)}, "
                             f"got {self.params!r}")
        _float("finetune.density", self.density, 0.0, 1.0)
        if self.density == 0:
            raise ValueError("finetune.density: expected a number in (0, 1], got 0")
        if self.salience not in SALIENCES:
            raise ValueError(f"finetune.salience: expected one of {', '.join(SALIENCES)}, "
                             f"got {self.salience!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], seed: int = 0) -> FinetuneConfig:
        """Build from a trial's flat parameter dict (reads ``finetune.*`` only).

        Raises:
            ValueError: naming the parameter, for a bad value or an unknown name.
        """
        fields = {"finetune.steps": "steps", "finetune.lr": "lr", "finetune.params": "params",
                  "finetune.density": "density", "finetune.salience": "salience"}
        kw: dict[str, Any] = {"seed": seed}
        for key, v in params.items():
            if not key.startswith("finetune."):
                continue
            if key not in fields:
                raise ValueError(f"{key}: unknown finetune parameter (expected one of "
                                 f"{', '.join(fields)})")
            kw[fields[key]] = v
        if "steps" in kw:
            kw["steps"] = _int("finetune.steps", kw["steps"], 0)
        return cls(**kw)
