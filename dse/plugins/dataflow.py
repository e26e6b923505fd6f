"""The ``dataflow`` evaluator: a layer-pipelined FPGA accelerator (simulators.dataflow).

Per trial it builds the network's pipeline for the candidate's numerics and sparsity,
runs the greedy folding optimiser within the device budget (or takes the folding from
``hw.layer.<name>.*`` parameters) and returns ``images_per_s``, ``latency_s``, ``dsp``,
``bram18``, ``uram``, ``lut``, ``ff``, ``images_per_s_per_dsp``, ``fits_device`` (1/0),
``partitions``, ``bandwidth_gbps``, ``interval_cycles``, ``zero_product_share`` (MAC-
weighted share of zero products the design skips); beside them (trial information)
``dataflow_layers`` (per-stage II, resources, folding), ``dataflow_bottleneck`` and
``dataflow_sparsity_source``. See docs/dataflow.md for options, the ``layer_sparsity``
contract and the parameter names read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from dse.registry import EvalContext
from simulators.dataflow.devices import DEVICES, get_device
from simulators.dataflow.layers import WEIGHT_MEMORIES, WEIGHT_OPS
from simulators.dataflow.networks import NETWORKS, get_network
from simulators.dataflow.optimiser import optimise
from simulators.dataflow.pipeline import FIELDS, RESOURCES, Folding, Network, Pipeline
from simulators.dataflow.sparsity import Sparsity, from_record, synthetic

TRACED = ("glyph_cnn", "glyph_vit", "digits")
_OPTIONS = {
    "network": None, "input_shape": None, "device": "u250", "device_overrides": {},
    "act_bits": None, "weight_bits": None, "weight_memory": "auto", "batch": 256,
    "allow_partitions": True, "budget": {}, "max_utilisation": 1.0, "optimise": True,
    "sparsity": "auto", "act_density": 1.0,
}
_SPARSITY_MODES = ("auto", "measured", "synthetic", "dense")


def _check(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate options; return them with defaults filled in (one-line ValueErrors)."""
    for k in options:
        if k not in _OPTIONS:
            raise ValueError(f"dataflow option {k!r} is unknown; expected one of {', '.join(_OPTIONS)}")
    o = {**_OPTIONS, **options}
    known = sorted(NETWORKS) + list(TRACED)
    if o["network"] not in known:
        raise ValueError(f"dataflow option network: expected one of {', '.join(known)}, got {o['network']!r}")
    if o["input_shape"] is not None and (not isinstance(o["input_shape"], list | tuple) or len(o["input_shape"]) != 3
                                         or not all(isinstance(v, int) and v > 0 for v in o["input_shape"])):
        raise ValueError(f"dataflow option input_shape: expected [channels, height, width], got {o['input_shape']!r}")
    if str(o["device"]).lower() not in DEVICES:
        raise ValueError(f"dataflow option device: expected one of {', '.join(DEVICES)}, got {o['device']!r}")
    get_device(o["device"], **dict(o["device_overrides"]))
    for k in ("act_bits", "weight_bits"):
        v = o[k]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 32):
            raise ValueError(f"dataflow option {k}: expected an integer in [1, 32], got {v!r}")
    if o["weight_memory"] not in WEIGHT_MEMORIES:
        raise ValueError(f"dataflow option weight_memory: expected one of {', '.join(WEIGHT_MEMORIES)}, got {o['weight_memory']!r}")
    if isinstance(o["batch"], bool) or not isinstance(o["batch"], int) or o["batch"] < 1:
        raise ValueError(f"dataflow option batch: expected a positive integer, got {o['batch']!r}")
    bad = set(o["budget"]) - set(RESOURCES)
    if bad:
        raise ValueError(f"dataflow option budget: unknown resource(s) {sorted(bad)}; expected {', '.join(RESOURCES)}")
    if not isinstance(o["max_utilisation"], int | float) or not 0 < o["max_utilisation"] <= 1:
        raise ValueError(f"dataflow option max_utilisation: expected a number in (0, 1], got {o['max_utilisation']!r}")
    if o["sparsity"] not in _SPARSITY_MODES:
        raise ValueError(f"dataflow option sparsity: expected one of {', '.join(_SPARSITY_MODES)}, got {o['sparsity']!r}")
    ad = o["act_density"]
    items = ad.items() if isinstance(ad, Mapping) else [("*", ad)]
    for pat, v in items:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
            raise ValueError(f"dataflow option act_density[{pat!r}]: expected a number in [0, 1], got {v!r}")
    return o


def _traced_network(kind: str, input_shape: tuple[int, int, int] | None) -> tuple[Network, tuple[int, int, int]]:
    import json

    import torch
    from safetensors import safe_open

    from evaluators.data import WEIGHTS_DIR, glyph_test_set
    from evaluators.models import MODEL_CLASSES
    from evaluators.vision import VISION_KINDS
    from simulators.dataflow.trace import trace

    torch.set_num_threads(1)
    # shapes only: build the architecture named by the weights file, weights not needed
    with safe_open(str(WEIGHTS_DIR / VISION_KINDS[kind][0]), framework="pt") as f:
        md = dict(f.metadata() or {})
    config = json.loads(md.get("config", "{}"))
    if "widths" in config:
        config["widths"] = tuple(config["widths"])
    model = MODEL_CLASSES[md["class"]](**config).eval()
    if input_shape is None:
        if VISION_KINDS[kind][1] != "glyphs":
            raise ValueError(f"dataflow option input_shape: required for network {kind!r}")
        x, _ = glyph_test_set("calib")
        input_shape = tuple(int(d) for d in x.shape[1:])  # type: ignore[assignment]
    assert input_shape is not None
    return trace(model, tuple(input_shape), name=kind), tuple(input_shape)  # type: ignore[return-value]


def _operand_bits(fmt_name: str) -> int:
    """Multiplier operand width of a number format: element bits (block scales amortised)."""
    from quant import get_format

    return max(1, int(math.floor(get_format(fmt_name).bits_per_element(None) + 1e-9)))


class DataflowEvaluator:
    """A warm dataflow simulator for one network (see module docstring)."""

    def __init__(self, options: Mapping[str, Any], ctx: EvalContext | None = None) -> None:
        o = _check(options)
        self.o = o
        if o["network"] in TRACED:
            self.net, _ = _traced_network(o["network"], o["input_shape"])
        else:
            self.net = get_network(o["network"])
        self._grids: dict[Any, Any] = {}

    # -- parameters -------------------------------------------------------------------
    def _bits(self, params: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
        o = self.o
        if o["act_bits"] is not None and o["weight_bits"] is not None:
            return {ly.name: (o["act_bits"], o["weight_bits"]) for ly in self.net.layers}
        from quant import QuantConfig

        qc = QuantConfig.from_params({k: v for k, v in params.items() if k.startswith("quant.")})
        out = {}
        for ly in self.net.layers:
            a = o["act_bits"] if o["act_bits"] is not None else _operand_bits(qc.act_format(ly.name).name)
            w = o["weight_bits"] if o["weight_bits"] is not None else _operand_bits(qc.weight_format(ly.name).name)
            out[ly.name] = (a, w)
        return out

    def _act_density(self, name: str) -> float:
        ad = self.o["act_density"]
        if not isinstance(ad, Mapping):
            return float(ad)
        from quant.config import match_pattern

        v = match_pattern(name, tuple(ad.items()))
        return 1.0 if v is None else float(v)

    def _sparsity(self, params: Mapping[str, Any], upstream: Mapping[str, Any]) -> tuple[dict[str, Sparsity], str]:
        mode = self.o["sparsity"]
        measured = upstream.get("layer_sparsity")
        if mode == "dense":
            return {}, "dense"
        if mode == "measured" and measured is None:
            raise ValueError("layer_sparsity: dataflow option sparsity='measured' needs an upstream evaluator that returns it")
        if mode in ("auto", "measured") and measured is not None:
            if not isinstance(measured, Mapping):
                raise ValueError(f"layer_sparsity: expected a dict keyed by module name, got {type(measured).__name__}")
            by = {ly.name: ly for ly in self.net.layers}
            out: dict[str, Sparsity] = {}
            for name, rec in measured.items():
                ly = by.get(name)
                if ly is None or ly.op not in WEIGHT_OPS:
                    raise ValueError(f"layer_sparsity: {name!r} is not a conv/linear stage of network {self.net.name}")
                out[name] = from_record(rec, ly.window, ly.channels)
            return out, "measured"
        from quant import SparsityConfig

        sc = SparsityConfig.from_params({k: v for k, v in params.items() if k.startswith("sparsity.")})
        out = {}
        for ly in self.net.layers:
            if ly.op in WEIGHT_OPS:
                density = sc.density_for(ly.name) * self._act_density(ly.name)
                if density < 1.0:
                    out[ly.name] = synthetic(ly.window, ly.channels, density)
        return out, "synthetic"

    def _folding(self, params: Mapping[str, Any]) -> Folding:
        fold = Folding.ones(self.net)
        names = set(self.net.names)
        for key, v in params.items():
            if not key.startswith("hw.layer."):
                continue
            name, _, fld = key[len("hw.layer."):].rpartition(".")
            if name not in names or fld not in (*FIELDS, "use_uram"):
                raise ValueError(f"{key}: expected hw.layer.<stage>.<{'|'.join((*FIELDS, 'use_uram'))}> with a stage of {self.net.name}")
            getattr(fold, fld)[0, self.net.index(name)] = int(v)
        return fold

    def _budget(self, params: Mapping[str, Any]) -> dict[str, float]:
        """The optimiser's budget: option ``budget``, overridden by ``hw.budget.<resource>``."""
        budget = {k: float(v) for k, v in self.o["budget"].items()}
        for key, v in params.items():
            if key.startswith("hw.budget."):
                r = key[len("hw.budget."):]
                if r not in RESOURCES or isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                    raise ValueError(f"{key}: expected hw.budget.<{'|'.join(RESOURCES)}> >= 0, got {v!r}")
                budget[r] = float(v)
        return budget

    def _zero_share(self, sparsity: Mapping[str, Sparsity]) -> float:
        """MAC-weighted mean share of zero products over the conv/linear stages."""
        macs = np.array([ly.macs for ly in self.net.layers], dtype=np.float64)
        share = np.array([sparsity[ly.name].zero_fraction if ly.name in sparsity else 0.0
                          for ly in self.net.layers])
        return float((macs * share).sum() / max(macs.sum(), 1.0))

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, params: Mapping[str, Any], upstream: Mapping[str, Any]) -> dict[str, Any]:
        """Metrics of the candidate (see module docstring)."""
        o = self.o
        device = get_device(str(params.get("hw.device", o["device"])), **dict(o["device_overrides"]))
        sparsity, source = self._sparsity(params, upstream)
        pipe = Pipeline(self.net, device, bits=self._bits(params), sparsity=sparsity,
                        weight_memory=o["weight_memory"], batch=o["batch"],
                        allow_partitions=o["allow_partitions"])
        if o["optimise"]:
            fold, res = optimise(pipe, budget=self._budget(params), max_utilisation=float(o["max_utilisation"]))
        else:
            fold = self._folding(params)
            res = pipe.evaluate(fold)
        metrics: dict[str, Any] = res.metrics(0)
        fd = fold.as_dict(self.net)
        layers = {}
        for j, ly in enumerate(self.net.layers):
            layers[ly.name] = {"ii_cycles": int(res.ii_cycles[0, j]),
                               **{r: int(res.layer_resources[r][0, j]) for r in RESOURCES}, **fd[ly.name]}
        metrics["zero_product_share"] = self._zero_share(sparsity)
        metrics["dataflow_layers"] = layers
        bound_by_memory = res.partitions[0] == 1 and res.interval_cycles[0] > res.ii_cycles[0].max()
        metrics["dataflow_bottleneck"] = ("off-chip bandwidth" if bound_by_memory
                                          else self.net.names[int(res.bottleneck[0])])
        metrics["dataflow_sparsity_source"] = source
        for k, v in metrics.items():
            if isinstance(v, float) and not np.isfinite(v):
                raise ValueError(f"dataflow: metric {k} is {v}")
        return metrics


def dataflow(options: dict[str, Any], ctx: EvalContext) -> DataflowEvaluator:
    """Factory of the ``dataflow`` evaluator."""
    return DataflowEvaluator(options, ctx)


dataflow.validate_options = _check  # type: ignore[attr-defined]
