"""Benchmark of the dataflow simulator (run on purpose, not by pytest).

Reports, for ResNet-18 (int8, Alveo U250) dense and sparse (synthetic i.i.d. zero
products, p = 0.5):
* seconds per design point, scalar (one folding per call) and vectorised (10,000 random
  foldings in one call), and seconds per layer evaluation;
* the greedy optimiser's seconds per network (ResNet-18, MobileNetV2, MobileNetV3-small,
  dense and sparse);
* peak resident memory (ru_maxrss).

Usage: python bench/bench_dataflow.py [--points 10000] [--repeats 200] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from typing import Any

import numpy as np

from simulators.dataflow import (
    NETWORKS,
    Pipeline,
    get_network,
    optimise,
    random_foldings,
    synthetic,
)


def _sparsity(net: Any, density: float | None) -> dict:
    if density is None:
        return {}
    return {ly.name: synthetic(ly.window, ly.channels, density) for ly in net.layers if ly.weights}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_evaluate(points: int, repeats: int) -> dict[str, Any]:
    net = get_network("resnet18")
    n_layers = len(net.layers)
    out: dict[str, Any] = {"network": "resnet18", "layers": n_layers}
    for label, density in (("dense", None), ("sparse_p0.5", 0.5)):
        pipe = Pipeline(net, "u250", 8, 8, sparsity=_sparsity(net, density))
        many = random_foldings(net, points, seed=0)
        pipe.evaluate(many.point(0))  # warm the sparse cycle tables
        pipe.evaluate(many, check=False)
        t0 = time.perf_counter()
        for i in range(repeats):
            pipe.evaluate(many.point(i % points))
        scalar_s = (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        res = pipe.evaluate(many)
        vec_s = (time.perf_counter() - t0) / points
        out[label] = {
            "scalar_s_per_point": scalar_s,
            "scalar_s_per_layer": scalar_s / n_layers,
            "vectorised_s_per_point": vec_s,
            "vectorised_s_per_layer": vec_s / n_layers,
            "points": points,
            "fits_share": float(res.fits_device.mean()),
        }
    return out


def bench_optimiser() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in NETWORKS:
        net = get_network(name)
        for label, density in (("dense", None), ("sparse_p0.5", 0.5)):
            sp = _sparsity(net, density)
            t0 = time.perf_counter()
            pipe = Pipeline(net, "u250", 8, 8, sparsity=sp)
            _, res = optimise(pipe)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            pipe = Pipeline(net, "u250", 8, 8, sparsity=sp)
            _, res = optimise(pipe)
            warm = time.perf_counter() - t0
            out[f"{name}/{label}"] = {
                "optimiser_s_cold": cold, "optimiser_s_warm_tables": warm,
                "images_per_s": float(res.images_per_s[0]), "dsp": int(res.dsp[0]),
                "images_per_s_per_dsp": float(res.images_per_s_per_dsp[0]),
                "partitions": int(res.partitions[0]),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    report = {
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}, numpy {np.__version__}",
        "evaluate": bench_evaluate(args.points, args.repeats),
        "optimiser": bench_optimiser(),
        "peak_rss_mb": _peak_mb(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
