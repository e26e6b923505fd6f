"""The ``dataflow`` evaluator: a layer-pipelined FPGA accelerator (simulators.dataflow).

Per trial it builds the network's pipeline for the candidate's numerics and sparsity,
runs the greedy folding optimiser within the device budget (or takes the folding from
``hw.layer.<name>.*`` parameters) and returns ``images_per_s``, ``latency_s``, ``dsp``,
``bram18``, ``uram``, ``lut``, ``ff``, ``images_per_s_per_dsp``, ``fits_device`` (1/0),
``partitions``, ``bandwidth_gbps``, ``interval_cycles``, ``zero_product_share`` (MAC-
weighted share of zero products the design skips); beside them (trial information)
``dataflow_layers`` (per-stage II, resources, folding), ``dataflow_bottleneck`` and
``dataflow_sparsity_source``. Options, parameters and metrics: :data:`SCHEMA`
(``dse evaluators dataflow``); the ``layer_sparsity`` contract: docs/dataflow.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from dse.registry import EvalContext
from dse.schema import (
    REQUIRED,
    EvaluatorSchema,
    Metric,
    Option,
    Param,
    Plugin,
    flag,
    positive_int,
    quant_params,
    sparsity_params,
)
from evaluators.kinds import VISION_KINDS
from simulators.dataflow.devices import DEVICES, get_device
from simulators.dataflow.layers import WEIGHT_MEMORIES, WEIGHT_OPS
from simulators.dataflow.networks import NETWORKS, get_network
from simulators.dataflow.optimiser import optimise
from simulators.dataflow.pipeline import FIELDS, RESOURCES, Folding, Network, Pipeline
from simulators.dataflow.sparsity import Sparsity, from_record, synthetic

TRACED = tuple(VISION_KINDS)
_SPARSITY_MODES = ("auto", "measured", "synthetic", "dense")


def _input_shape(v: Any) -> None:
    if len(v) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        raise ValueError(f"expected [channels, height, width], got {v!r}")


def _device(v: Any) -> None:
    try:
        get_device(v)
    except ValueError as e:
        raise ValueError(str(e).removeprefix("device: ")) from None


def _budget(v: Any) -> None:
    bad = sorted(set(v) - set(RESOURCES))
    if bad:
        raise ValueError(f"expected resources among {', '.join(RESOURCES)}, got {bad}")


def _act_density(v: Any) -> None:
    items = v.items() if isinstance(v, Mapping) else [("*", v)]
    for pat, x in items:
        if isinstance(x, bool) or not isinstance(x, int | float) or not 0 <= x <= 1:
            raise ValueError(f"expected a number in [0, 1] (or a table pattern -> number), "
                             f"got {x!r} for {pat!r}")


def _positive(v: Any) -> None:
    if v <= 0:
        raise ValueError(f"expected a number in (0, 1], got {v!r}")


def _finish(o: dict[str, Any]) -> dict[str, Any]:
    try:
        get_device(o["device"], **dict(o["device_overrides"]))
    except ValueError as e:
        raise ValueError(f"dataflow option device_overrides: {e}") from None
    return o


def _quant_read(o: Mapping[str, Any]) -> bool:
    return o["act_bits"] is None or o["weight_bits"] is None


SCHEMA = EvaluatorSchema(
    "dataflow", "a layer-pipelined (fpgaConvNet-style) FPGA accelerator (simulators.dataflow)",
    options=(
        Option("network", "str", "the network", choices=(*sorted(NETWORKS), *TRACED),
               default=REQUIRED),
        Option("input_shape", "list", "[channels, height, width] of a traced network "
               "(default: its data set's)", check=_input_shape),
        Option("device", "str", f"the FPGA ({', '.join(DEVICES)})", default="u250",
               check=_device),
        Option("device_overrides", "table", "device fields to override", default={}),
        Option("act_bits", "int", "activation operand bits for every layer (default: from "
               "quant.acts)", low=1, high=32),
        Option("weight_bits", "int", "weight operand bits for every layer (default: from "
               "quant.weights)", low=1, high=32),
        Option("weight_memory", "str", "where weights live", choices=WEIGHT_MEMORIES,
               default="auto"),
        positive_int("batch", "images per batch", default=256),
        flag("allow_partitions", "split a network that does not fit into partitions", True),
        Option("budget", "table", f"optimiser resource budget ({', '.join(RESOURCES)})",
               default={}, check=_budget),
        Option("max_utilisation", "float", "share of each device resource the optimiser may "
               "use, in (0, 1]", high=1.0, default=1.0, check=_positive),
        flag("optimise", "choose the folding with the greedy optimiser (else read "
             "hw.layer.*)", True),
        Option("sparsity", "str", "where layer sparsity comes from (docs/dataflow.md)",
               choices=_SPARSITY_MODES, default="auto"),
        Option("act_density", "any", "activation density for synthetic sparsity: a number "
               "in [0, 1] or a table pattern -> number", default=1.0, check=_act_density),
    ),
    params=(
        Param("hw.device", "str", "overrides option device", check=_device),
        *(Param(f"hw.layer.*.{f}", "int", f"folding of a stage: {f}", low=1,
                when=lambda o: not o["optimise"], when_doc="optimise = false")
          for f in FIELDS),
        Param("hw.layer.*.use_uram", "int", "weights of a stage in URAM (1) or BRAM (0)",
              low=0, high=1, when=lambda o: not o["optimise"], when_doc="optimise = false"),
        *(Param(f"hw.budget.{r}", "float", f"optimiser budget of {r} (overrides option "
                "budget)", low=0.0, when=lambda o: bool(o["optimise"]), when_doc="optimise = true")
          for r in RESOURCES),
        *quant_params(("quant.weights", "quant.acts", "quant.layer.*.weights",
                       "quant.layer.*.acts"), _quant_read,
                      "act_bits or weight_bits not set"),
        *sparsity_params(("sparsity.density", "sparsity.layer.*.density"),
                         lambda o: o["sparsity"] in ("auto", "synthetic"),
                         "sparsity = auto (no upstream layer_sparsity) or synthetic"),
    ),
    metrics=tuple(Metric(n, d) for n, d in (
        ("images_per_s", "throughput, images/s"), ("latency_s", "latency of one batch, s"),
        ("interval_cycles", "initiation interval of the pipeline, cycles"),
        ("dsp", "DSP slices used"), ("bram18", "BRAM18 blocks used"), ("uram", "URAMs used"),
        ("lut", "LUTs used"), ("ff", "flip-flops used"),
        ("images_per_s_per_dsp", "images/s per DSP"),
        ("fits_device", "1 if the design fits the device, else 0"),
        ("partitions", "number of partitions (reconfigurations)"),
        ("bandwidth_gbps", "off-chip bandwidth needed, GB/s"),
        ("zero_product_share", "MAC-weighted share of zero products the design skips"))),
    info=(Metric("dataflow_layers", "per-stage II, resources, folding"),
          Metric("dataflow_bottleneck", "the slowest stage, or off-chip bandwidth"),
          Metric("dataflow_sparsity_source", "measured, synthetic or dense")),
    finish=_finish,
    cheap=True,
)


def _traced_network(kind: str, input_shape: tuple[int, int, int] | None) -> tuple[Network, tuple[int, int, int]]:
    import json

    import torch
    from safetensors import safe_open

    from evaluators.data import WEIGHTS_DIR, glyph_test_set
    from evaluators.models import MODEL_CLASSES
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
    from quant.desc import describe

    return max(1, int(math.floor(describe(fmt_name).bits_per_element(None) + 1e-9)))


class DataflowEvaluator:
    """A warm dataflow simulator for one network (see module docstring)."""

    def __init__(self, options: Mapping[str, Any], ctx: EvalContext | None = None) -> None:
        o = SCHEMA.check_options(options)
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
            if ly.op == "matmul":  # attention: both operands in quant.attn (or its override)
                a = o["act_bits"] if o["act_bits"] is not None else _operand_bits(qc.matmul_format(ly.name).name)
                out[ly.name] = (a, a)
                continue
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


dataflow = Plugin(SCHEMA, lambda o, ctx: DataflowEvaluator(o, ctx))
