"""Benchmark of the dataflow simulator (run on purpose, not by pytest).

Reports, for ResNet-18 (int8, Alveo U250) dense and sparse (synthetic i.i.d. zero
products, p = 0.5):
* seconds per design point, scalar (one folding per call) and vectorised (10,000 random
  foldings in one call), and seconds per layer evaluation;
* the greedy optimiser's seconds per network (ResNet-18, MobileNetV2, MobileNetV3-small,
  dense and sparse);
* peak resident memory (ru_maxrss).

* one stage alone, the same four ResNet-18/MobileNetV2 layer foldings fpgaConvNet is
  timed on: a fresh ``LayerModel`` + ``evaluate`` per call (like building an fpgaConvNet
  layer object), and vectorised over 10,000 foldings;
* optionally fpgaConvNet itself (``--fpgaconvnet-python``: an interpreter of a throwaway
  venv with ``fpgaconvnet-model`` installed, see docs/benchmarks.md): seconds per
  layer object (construct + latency() + resource()) and per latency()+resource() call.

Usage: python bench/bench_dataflow.py [--points 10000] [--repeats 200] [--out FILE.json]
                                      [--fpgaconvnet-python /tmp/fcn/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import time
from typing import Any

import numpy as np

from simulators.dataflow import (
    NETWORKS,
    Layer,
    LayerModel,
    Pipeline,
    get_network,
    optimise,
    random_foldings,
    synthetic,
)

# (rows, cols, channels, filters, k, stride, pad), (coarse_in, coarse_out, coarse_group, fine)
STAGE_CASES = [((56, 56, 64, 64, 3, 1, 1), (1, 1, 1, 1)), ((56, 56, 64, 64, 3, 1, 1), (4, 4, 1, 3)),
               ((56, 56, 64, 64, 3, 1, 1), (16, 16, 1, 9)), ((56, 56, 24, 144, 1, 1, 0), (4, 8, 1, 1))]

# Runs inside the fpgaConvNet venv: times its own public layer API on STAGE_CASES.
_FCN_SCRIPT = """
import json, sys, time
from fpgaconvnet.models.layers.chisel.ConvolutionLayer import ConvolutionLayer
out = []
for (r, c, ch, f, k, s, p), (ci, co, cg, fi) in json.loads(sys.argv[1]):
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        layer = ConvolutionLayer(f, r, c, ch, coarse_in=ci, coarse_out=co, coarse_group=cg,
                                 kernel_size=k, stride=s, pad=p, fine=fi)
        layer.latency(); layer.resource()
    t_obj = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        layer.latency(); layer.resource()
    out.append({"s_per_layer_object": t_obj, "s_per_call": (time.perf_counter() - t0) / n})
print(json.dumps(out))
"""


def bench_stage(points: int) -> list[dict[str, Any]]:
    out = []
    for (r, c, ch, f, k, s, p), (ci, co, cg, fi) in STAGE_CASES:
        layer = Layer("x", "conv", r, c, ch, f, kernel=(k, k), stride=(s, s), pad=(p, p, p, p))
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            LayerModel(layer).evaluate(ci, co, cg, fi)
        fresh = (time.perf_counter() - t0) / n
        grids = np.meshgrid(*(layer.feasible(x) for x in ("coarse_in", "coarse_out", "coarse_group", "fine")),
                            indexing="ij")
        fold = [np.resize(g.reshape(-1), points) for g in grids]
        model = LayerModel(layer)
        t0 = time.perf_counter()
        model.evaluate(*fold, check=False)
        vec = (time.perf_counter() - t0) / points
        out.append({"case": [r, c, ch, f, k, ci, co, cg, fi], "s_per_fresh_stage_eval": fresh,
                    "vectorised_s_per_stage_eval": vec})
    return out


def bench_fpgaconvnet(python: str) -> list[dict[str, Any]]:
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
    res = subprocess.run([python, "-c", _FCN_SCRIPT, json.dumps(STAGE_CASES)], capture_output=True,
                         text=True, env=env, timeout=600, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


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
    ap.add_argument("--fpgaconvnet-python", default=None,
                    help="python of a venv with fpgaconvnet-model installed (optional)")
    args = ap.parse_args()
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, python {platform.python_version()}, numpy {np.__version__}",
        "evaluate": bench_evaluate(args.points, args.repeats),
        "optimiser": bench_optimiser(),
        "stage": bench_stage(args.points),
    }
    if args.fpgaconvnet_python:
        fcn = bench_fpgaconvnet(args.fpgaconvnet_python)
        for ours, theirs in zip(report["stage"], fcn, strict=True):
            ours["fpgaconvnet_s_per_layer_object"] = theirs["s_per_layer_object"]
            ours["fpgaconvnet_s_per_call"] = theirs["s_per_call"]
            ours["speedup_vectorised_vs_object"] = theirs["s_per_layer_object"] / ours["vectorised_s_per_stage_eval"]
            ours["speedup_fresh_vs_object"] = theirs["s_per_layer_object"] / ours["s_per_fresh_stage_eval"]
    report["peak_rss_mb"] = _peak_mb()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
