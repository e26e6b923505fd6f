"""LLM workload: a Hugging Face style model config plus batch and sequence lengths."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def shipped_models() -> list[str]:
    """Names of the model configs shipped in ``simulators/configs`` (``llama-3.1-8b``...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers of a decoder-only transformer (Hugging Face field names).

    Attributes:
        name: a label (shipped name or file stem).
        hidden_size, intermediate_size: model and FFN widths, elements.
        num_hidden_layers, num_attention_heads, num_key_value_heads: counts.
        head_dim: per-head width, elements (``hidden_size // num_attention_heads`` when
            the config does not give it).
        vocab_size: tokens.
        tie_word_embeddings: LM head shares the embedding matrix (stored once).
        qk_norm: RMSNorm on q and k per head (Qwen3).
        num_experts, num_experts_per_tok, moe_intermediate_size: MoE FFN (0 = dense).
        gated_mlp: the FFN is gate/up/down with SwiGLU (Llama); ``False``: up/down with
            GELU (GPT-2).
        layer_norm: LayerNorm (mean and variance) instead of RMSNorm.
        position_embeddings: rows of a learned position table added to the token
            embeddings (GPT-2 ``n_positions``); 0: rotary positions (RoPE).
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    gated_mlp: bool = True
    layer_norm: bool = False
    position_embeddings: int = 0

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], name: str = "model") -> ModelConfig:
        """Build from a parsed ``config.json`` (nested ``text_config`` is honoured; a GPT-2
        config, ``model_type = "gpt2"`` with ``n_embd``, ``n_layer``, ``n_head``,
        ``n_inner``, ``n_positions``, is read as a non-gated GELU FFN with LayerNorm and
        learned positions)."""
        if "text_config" in cfg and "hidden_size" not in cfg:
            cfg = cfg["text_config"]
        gpt2 = cfg.get("model_type") == "gpt2"
        if gpt2:
            n_embd = cfg.get("n_embd")
            cfg = {**cfg, "hidden_size": n_embd, "num_hidden_layers": cfg.get("n_layer"),
                   "num_attention_heads": cfg.get("n_head"),
                   "intermediate_size": cfg.get("n_inner") or (
                       4 * n_embd if isinstance(n_embd, int) else None),
                   "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
            if not isinstance(cfg.get("n_positions"), int) or cfg["n_positions"] < 1:
                raise ValueError(f"{name}: config field 'n_positions' must be a positive "
                                 f"int, got {cfg.get('n_positions')!r}")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size"):
            if not isinstance(cfg.get(key), int) or cfg[key] < 1:
                raise ValueError(f"{name}: config field {key!r} must be a positive int, "
                                 f"got {cfg.get(key)!r}")
        nh = cfg["num_attention_heads"]
        nkv = cfg.get("num_key_value_heads") or nh
        hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
        if nh % nkv:
            raise ValueError(f"{name}: num_attention_heads ({nh}) must be a multiple of "
                             f"num_key_value_heads ({nkv})")
        experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        return cls(
            name=name,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=nh,
            num_key_value_heads=int(nkv),
            head_dim=int(hd),
            vocab_size=cfg["vocab_size"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=cfg.get("model_type") in ("qwen3", "qwen3_moe"),
            num_experts=experts,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
            moe_intermediate_size=int(cfg.get("moe_intermediate_size")
                                      or cfg["intermediate_size"]) if experts else 0,
            gated_mlp=not gpt2,
            layer_norm=gpt2,
            position_embeddings=int(cfg["n_positions"]) if gpt2 else 0,
        )

    @property
    def n_params(self) -> int:
        """Parameter count of the linear layers and embeddings (norms and biases excluded)."""
        return sum(n for _, _, n in self.weight_matrices())

    def weight_matrices(self) -> list[tuple[str, int, int]]:
        """(name, reduction dim K, total elements) of every stored weight matrix."""
        h, hd, L = self.hidden_size, self.head_dim, self.num_hidden_layers
        nh, nkv = self.num_attention_heads, self.num_key_value_heads
        mats = [
            ("q_proj", h, L * h * nh * hd),
            ("k_proj", h, L * h * nkv * hd),
            ("v_proj", h, L * h * nkv * hd),
            ("o_proj", nh * hd, L * nh * hd * h),
        ]
        if self.num_experts:
            e, im = self.num_experts, self.moe_intermediate_size
            mats += [("router", h, L * h * e), ("gate_proj", h, L * e * h * im),
                     ("up_proj", h, L * e * h * im), ("down_proj", im, L * e * im * h)]
        else:
            im = self.intermediate_size
            if self.gated_mlp:
                mats.append(("gate_proj", h, L * h * im))
            mats += [("up_proj", h, L * h * im), ("down_proj", im, L * im * h)]
        mats.append(("embed_tokens", h, self.vocab_size * h))
        if self.position_embeddings:
            mats.append(("embed_positions", h, self.position_embeddings * h))
        if not self.tie_word_embeddings:
            mats.append(("lm_head", h, self.vocab_size * h))
        return mats


@lru_cache(maxsize=64)
def load_model_config(name_or_path: str) -> ModelConfig:
    """A shipped config by name (``llama-3.1-8b``) or any ``config.json`` path.

    Raises:
        ValueError: unknown name / unreadable file / missing fields.
    """
    path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"workload.model: expected one of {shipped_models()} or a "
                         f"config.json path, got {name_or_path!r}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"workload.model: cannot read {path}: {e}") from None
    stem = path.stem if path.name != "config.json" else path.parent.name
    return ModelConfig.from_dict(cfg, name=stem)


@dataclass(frozen=True)
class Workload:
    """One inference request shape.

    Attributes:
        model: the architecture.
        batch: sequences decoded together.
        prompt_len: prompt tokens S per sequence (prefill).
        output_len: generated tokens O per sequence (decode steps).
    """

    model: ModelConfig
    batch: int = 1
    prompt_len: int = 2048
    output_len: int = 256

    def __post_init__(self) -> None:
        for key in ("batch", "prompt_len", "output_len"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"workload.{key}: expected a positive int, got {v!r}")

    @classmethod
    def of(cls, model: str | ModelConfig, batch: int = 1, prompt_len: int = 2048,
           output_len: int = 256) -> Workload:
        """Convenience constructor taking a shipped name or path for ``model``."""
        cfg = model if isinstance(model, ModelConfig) else load_model_config(str(model))
        return cls(cfg, batch, prompt_len, output_len)
