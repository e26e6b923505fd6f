"""Batched evaluation in the driver process (``--batch``): PLENA's vectorised
``evaluate_batch`` equals its scalar ``evaluate`` value for value; a batched study is
reproducible, and each trial holds exactly what the scalar simulator gives for it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import optuna
import pytest

from dse import registry
from dse.driver import RUN_ATTR, Driver
from dse.plugins.plena import PlenaEvaluator
from dse.pools import EvaluatorHost
from dse.spec import parse_spec
from dse.storage import open_storage

FORMATS = ("mxint4", "mxint6", "mxint8", "bf16", "int4(asym,group=128)", "fp8_e4m3")


def _points(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{
        "hw.mlen": rng.choice([512, 1024, 2048]), "hw.blen": rng.choice([8, 32, 128]),
        "hw.vlen": rng.choice([512, 2048]), "hw.hlen": 128,
        "hw.matrix_sram_bytes": rng.randint(2**22, 2**28), "hw.vector_sram_bytes": rng.randint(2**22, 2**28),
        "hw.hbm_gbps": rng.uniform(500.0, 4000.0), "hw.clock_ghz": rng.uniform(0.8, 2.0),
        # few format combinations, so most share a vectorised call (and some are alone)
        "quant.weights": rng.choice(FORMATS[:2]), "quant.acts": "mxint8", "quant.kv": rng.choice(FORMATS[2:4]),
        "quant.kv_window": rng.choice([0, 64]),
        "workload.batch": rng.choice([1, 4]),
    } for _ in range(n)]


@pytest.mark.parametrize("options", [{}, {"overlap_vector": True, "causal_skip": False}])
def test_plena_batch_equals_scalar(options: dict[str, Any]) -> None:
    ev = PlenaEvaluator({"model": "llama-3.1-8b", "prompt_len": 4096, "output_len": 256, **options})
    pts = _points(120)
    batch = ev.evaluate_batch(pts, [{}] * len(pts))
    scalar = [ev.evaluate(p, {}) for p in pts]
    assert batch == scalar  # every metric bit for bit, the bottleneck text too
    assert [list(b) for b in batch] == [list(s) for s in scalar]


def test_a_bad_candidate_fails_alone_in_a_batch() -> None:
    """hw.hlen > hw.mlen raises in the vectorised call: the batch is repeated one by one,
    so only that candidate gets an error and the others their scalar results."""
    host = EvaluatorHost([("plena", {}, None)], "unused", 0, 1, set_threads=False)
    host.build()
    pts = _points(6)
    pts[3] = {**pts[3], "hw.hlen": 4096}
    out = host.evaluate_many(pts, [{}] * len(pts))
    assert [bool(o.get("error")) for o in out] == [False, False, False, True, False, False]
    assert "hw.hlen" in out[3]["error"]
    ev = PlenaEvaluator({})
    for p, o in zip(pts, out, strict=True):
        if not o.get("error"):
            assert o["metrics"] == {k: float(v) for k, v in ev.evaluate(p, {}).items() if k != "plena_bottleneck"}


class BatchSizes:
    """Records how many candidates each call received (a second, inline stage)."""

    sizes: list[int] = []

    def __init__(self, options: dict[str, Any], ctx: registry.EvalContext) -> None:
        pass

    def evaluate(self, params: Any, upstream: Any) -> dict[str, Any]:
        return self.evaluate_batch([params], [upstream])[0]

    def evaluate_batch(self, params: list[Any], upstream: list[Any]) -> list[dict[str, Any]]:
        BatchSizes.sizes.append(len(params))
        return [{"seen_tokens_per_s": u["tokens_per_s"]} for u in upstream]


registry.register("test_batch_sizes", BatchSizes)

SPEC = """
[study]
name = "b"
seed = 3
n_trials = 40
[[objectives]]
metric = "tokens_per_s"
direction = "maximize"
[[objectives]]
metric = "area_mm2"
[space.hw]
mlen = { choices = [512, 1024, 2048] }
blen = { choices = [8, 32, 128] }
hbm_gbps = { type = "float", low = 500.0, high = 4000.0 }
[space.quant]
weights = { choices = ["mxint4", "mxint8"] }
[[evaluators]]
name = "plena"
options = { prompt_len = 2048, output_len = 128 }
[[evaluators]]
name = "test_batch_sizes"
inline = true
"""


def test_a_batched_study_is_reproducible_and_exact(tmp_path: Path) -> None:
    runs = []
    for k in range(2):
        BatchSizes.sizes = []
        s = Driver(parse_spec(SPEC), tmp_path / str(k), tracking=False, progress=False, batch=8).run()
        assert s.complete == 40
        assert BatchSizes.sizes[0] == 8 and max(BatchSizes.sizes) == 8 and sum(BatchSizes.sizes) == 40
        study = optuna.load_study(study_name="b", storage=open_storage(None, tmp_path / str(k) / "b"))
        assert study.user_attrs[RUN_ATTR] == {"batch": 8}
        runs.append(study.trials)
    assert [(t.number, t.params) for t in runs[0]] == [(t.number, t.params) for t in runs[1]]
    ev = PlenaEvaluator({"prompt_len": 2048, "output_len": 128})
    for t in runs[0]:
        want = {k: v for k, v in ev.evaluate(t.params, {}).items() if k != "plena_bottleneck"}
        got = t.user_attrs["metrics"]
        assert {k: got[k] for k in want} == want
        assert got["seen_tokens_per_s"] == want["tokens_per_s"]
