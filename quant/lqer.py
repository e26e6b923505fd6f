"""LQER's SVD, computed once per (weights, weight format, activation scaling) and reused.

The LQER factors of a layer at rank k are the first k singular triplets of its
activation-scaled quantization error ``(W - Wq) diag(s)``. That SVD depends on the weights,
the weight format and the scaling, not on the rank or on the rest of the candidate, so
:class:`LQERCache` keeps the unquantized factors up to a stored rank, in memory (LRU,
bounded in bytes) and optionally on disk (one safetensors file per entry, written
atomically), and every rank up to it is a slice. A slice is bit-identical to computing
the factors at that rank directly: the SVD is the same call on the same input, and the
per-column scaling is elementwise.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path

import torch

__all__ = ["LQERCache", "lqer_svd", "tensor_digest"]

_DIGESTS: dict[int, tuple[weakref.ref[torch.Tensor], int, str]] = {}


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's dtype, shape and bytes, remembered per live tensor object
    and version (the evaluator's unmodified weights are hashed once per process)."""
    hit = _DIGESTS.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    a = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{a.dtype}:{tuple(a.shape)}".encode())
    h.update(memoryview(a.view(torch.uint8).numpy()) if a.numel() else b"")
    digest = h.hexdigest()
    if len(_DIGESTS) > 4096:  # drop entries of dead tensors
        for k in [k for k, v in _DIGESTS.items() if v[0]() is None]:
            del _DIGESTS[k]
    _DIGESTS[id(t)] = (weakref.ref(t), t._version, digest)
    return digest


def lqer_svd(
    weight: torch.Tensor, weight_q: torch.Tensor, act_scale: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unquantized LQER factors at rank ``k``: ``A (in, k)``, ``B (k, out)``, float32.

    ``E = W - Wq``, ``S = diag(act_scale)`` (ones if None, clamped at 1e-8 of its max),
    float64 SVD ``E S = U Sigma V^T``, ``A = S^-1 V_k``, ``B = Sigma_k U_k^T``.
    """
    e = (weight.detach() - weight_q.detach()).double()
    n_in = e.shape[1]
    s = (torch.ones(n_in, dtype=torch.float64, device=e.device) if act_scale is None
         else act_scale.to(e.device, torch.float64))
    s = s.clamp(min=1e-8 * max(float(s.max()), 1e-30))
    u, sig, vh = torch.linalg.svd(e * s, full_matrices=False)
    k = min(k, sig.numel())
    a = (vh[:k].T / s[:, None]).float().contiguous()
    b = (sig[:k, None] * u[:, :k].T).float().contiguous()
    return a, b


class LQERCache:
    """Unquantized LQER factors keyed by (weights digest, weight format, scaling digest).

    Args:
        directory: where entries are kept on disk (created on first write; ``None``:
            memory only).
        store_rank: factors are stored up to ``max(rank, store_rank)`` (capped at full
            rank), so later, other ranks up to it are slices (default 64).
        max_memory_bytes: in-memory LRU bound (default 1 GiB; SmolLM2-135M at rank 64
            needs ~90 MB per weight format and scaling).

    ``svd_calls`` counts SVDs actually computed; ``hits`` counts factors served from
    memory or disk.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, store_rank: int = 64,
                 max_memory_bytes: int = 1 << 30) -> None:
        if not (isinstance(store_rank, int) and store_rank >= 1):
            raise ValueError(f"store_rank: expected an integer >= 1, got {store_rank!r}")
        self.directory = Path(directory) if directory is not None else None
        self.store_rank = store_rank
        self.max_memory_bytes = int(max_memory_bytes)
        self._mem: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._mem_bytes = 0
        self.svd_calls = 0
        self.hits = 0

    @staticmethod
    def key(weight: torch.Tensor, w_fmt_name: str, act_scale: torch.Tensor | None) -> str:
        """Entry key: sha256 over the weights' digest, the format name and the scaling."""
        sc = "none" if act_scale is None else tensor_digest(act_scale.float())
        blob = f"{tensor_digest(weight)}|{w_fmt_name}|{sc}"
        return hashlib.sha256(blob.encode()).hexdigest()

    def factors(self, weight: torch.Tensor, weight_q: torch.Tensor, w_fmt_name: str,
                act_scale: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """LQER factors at ``rank`` (as :func:`lqer_svd`), from the cache when stored."""
        full = min(weight.shape[0], weight.shape[1])
        k = min(rank, full)
        key = self.key(weight, w_fmt_name, act_scale)
        got = self._get(key, k)
        if got is None:
            self.svd_calls += 1
            got = lqer_svd(weight, weight_q, act_scale, min(full, max(k, self.store_rank)))
            self._put(key, got)
        else:
            self.hits += 1
        a, b = got
        return a[:, :k].contiguous(), b[:k].contiguous()

    def _get(self, key: str, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        hit = self._mem.get(key)
        if hit is not None and hit[0].shape[1] >= k:
            self._mem.move_to_end(key)
            return hit
        if self.directory is None:
            return None
        path = self.directory / f"{key}.safetensors"
        try:
            from safetensors.torch import load_file

            d = load_file(str(path))
            a, b = d["a"], d["b"]
        except (OSError, KeyError, ValueError, RuntimeError):  # absent or unreadable
            return None
        if a.shape[1] < k:
            return None
        self._remember(key, (a, b))
        return a, b

    def _remember(self, key: str, ab: tuple[torch.Tensor, torch.Tensor]) -> None:
        old = self._mem.pop(key, None)
        if old is not None:
            self._mem_bytes -= sum(t.numel() * t.element_size() for t in old)
        self._mem[key] = ab
        self._mem_bytes += sum(t.numel() * t.element_size() for t in ab)
        while self._mem_bytes > self.max_memory_bytes and len(self._mem) > 1:
            _, ev = self._mem.popitem(last=False)
            self._mem_bytes -= sum(t.numel() * t.element_size() for t in ev)

    def _put(self, key: str, ab: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._remember(key, ab)
        if self.directory is None:
            return
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"a": ab[0].cpu(), "b": ab[1].cpu()}, tmp)
            os.replace(tmp, self.directory / f"{key}.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
