"""On-disk result cache keyed by the software part of a candidate.

Accuracy depends only on ``quant.*``, ``sparsity.*`` and ``finetune.*`` parameters, so the
key is a sha256
over exactly those (canonical JSON, numbers as floats so ``8`` and ``8.0`` agree) plus
the evaluator's identity (model digest, data digest, budget, fidelity options). A
hardware-only change (``hw.*``) therefore hits the cache. Entries are one JSON file each,
written atomically, so a crashed study resumes with every finished result.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SOFTWARE_PREFIXES: tuple[str, ...] = ("quant.", "sparsity.", "finetune.")


def default_cache_root() -> Path:
    """``$DSE_CACHE_DIR`` or ``~/.cache/dse``: where converted models (and other
    per-machine caches, e.g. an empty MLflow store) live."""
    env = os.environ.get("DSE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "dse"


def software_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``quant.*``, ``sparsity.*`` and ``finetune.*`` entries of ``params`` (everything
    else ignored)."""
    return {k: params[k] for k in params if k.startswith(SOFTWARE_PREFIXES)}


def _canon(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, Mapping):
        return {str(k): _canon(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_canon(x) for x in v]
    return str(v)


def cache_key(params: Mapping[str, Any], identity: Mapping[str, Any]) -> str:
    """sha256 hex of the software parameters and the evaluator identity (order-free)."""
    doc = {"params": _canon(software_params(params)), "evaluator": _canon(identity)}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResultCache:
    """A directory of ``<key>.json`` results.

    Args:
        directory: where entries live (created on first write); ``None`` disables caching.
    """

    def __init__(self, directory: str | os.PathLike[str] | None) -> None:
        self.directory = Path(directory) if directory is not None else None

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result for ``key``, or ``None`` (also for an unreadable entry)."""
        if self.directory is None:
            return None
        try:
            with open(self._path(key), encoding="utf-8") as f:
                return json.load(f)["result"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, result: Mapping[str, Any], params: Mapping[str, Any]) -> None:
        """Store ``result`` atomically (the software params ride along for inspection)."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        doc = {"params": _canon(software_params(params)), "result": dict(result)}
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, sort_keys=True, allow_nan=False)
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
