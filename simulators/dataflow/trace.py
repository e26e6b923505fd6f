"""Derive a dataflow :class:`~simulators.dataflow.pipeline.Network` from a torch module.

torch is imported here, lazily, and nowhere else in the package. The module is traced
with ``torch.fx`` (shapes by ``ShapeProp`` on one zero image): ``Conv2d`` -> ``conv``,
``Linear`` -> ``linear``, ``MaxPool2d``/``AvgPool2d`` -> ``pool``, global average pooling
(module, functional or ``mean`` over H, W) -> ``gap``, tensor + tensor -> ``add``,
tensor * tensor -> ``mul``, ``cat`` -> ``concat``; a product of two activations
(``quant.QMatmul`` modules, ``matmul`` / ``bmm`` / ``@``: attention's QK^T and AV) ->
``matmul`` (one group per head), ``softmax`` -> ``softmax``; every other node (BatchNorm,
activations, flatten, dropout, reshapes) is fused into the stage that produced its input.
Stages made from modules keep the module's qualified name; functional stages are named
``<enclosing module>.<kind>`` (``layer1.0.add``, ``features.1.block.1.mul``), or just
``<kind>`` at top level, with ``_1``, ``_2``... on repeats.

When ``torch.fx`` cannot trace the module (data-dependent control flow), forward hooks
record the conv/linear/pool modules in call order as a chain (residual edges are lost;
the result says so through ``Network.name`` ending in ``[hooks]``).
"""

from __future__ import annotations

import operator
from typing import Any

from simulators.dataflow.layers import Layer
from simulators.dataflow.pipeline import Network


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pad4(v: Any) -> tuple[int, int, int, int]:
    if isinstance(v, str):
        raise ValueError(f"padding: expected integers, got {v!r} (string padding is not supported)")
    ph, pw = _pair(v)
    return (ph, pw, ph, pw)


def _layer_from_module(name: str, mod: Any, in_shape: tuple[int, ...], inputs: tuple[str, ...]) -> Layer | None:
    import torch.nn as nn

    if isinstance(mod, nn.Conv1d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        raise ValueError(f"{name}: {type(mod).__name__} is not supported; expected Conv2d, Linear or pooling")
    if isinstance(mod, nn.Conv2d):
        if _pair(mod.dilation) != (1, 1):
            raise ValueError(f"{name}: dilation {mod.dilation} is not supported; expected 1")
        _, c, h, w = in_shape
        return Layer(name, "conv", h, w, c, mod.out_channels, kernel=_pair(mod.kernel_size),
                     stride=_pair(mod.stride), pad=_pad4(mod.padding), groups=mod.groups, inputs=inputs)
    if isinstance(mod, nn.Linear):
        tokens = 1
        for d in in_shape[1:-1]:
            tokens *= int(d)
        return Layer(name, "linear", tokens, 1, mod.in_features, mod.out_features, inputs=inputs)
    if isinstance(mod, nn.MaxPool2d | nn.AvgPool2d):
        _, c, h, w = in_shape
        return Layer(name, "pool", h, w, c, c, kernel=_pair(mod.kernel_size),
                     stride=_pair(mod.stride if mod.stride is not None else mod.kernel_size),
                     pad=_pad4(mod.padding), inputs=inputs)
    if isinstance(mod, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        _, c, h, w = in_shape
        if _pair(mod.output_size) != (1, 1):
            raise ValueError(f"{name}: adaptive pooling to {mod.output_size} is not supported; expected 1")
        return Layer(name, "gap", h, w, c, c, inputs=inputs)
    return None


def trace(module: Any, input_shape: tuple[int, ...] = (3, 224, 224), name: str | None = None) -> Network:
    """Network of dataflow stages of ``module`` for one input of ``input_shape`` (C, H, W).

    Args:
        module: a ``torch.nn.Module`` taking one tensor (N, C, H, W).
        input_shape: the input without the batch dimension.
        name: the network's name (default: the module's class name).
    """
    import torch
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    net_name = name or type(module).__name__
    module = module.eval()
    try:
        gm = fx.symbolic_trace(module)
    except Exception:  # noqa: BLE001 - fx cannot trace this module: fall back to hooks
        return _trace_hooks(module, input_shape, net_name)
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape))
    mods = dict(gm.named_modules())
    orig = dict(module.named_modules())  # modules fx traced through are not in gm
    # fx node -> names of the stages its value depends on (() = network input or constant)
    stage_of: dict[Any, tuple[str, ...]] = {}
    constant: set[Any] = set()
    layers: list[Layer] = []
    used: set[str] = set()

    def shape(n: Any) -> tuple[int, ...]:
        return tuple(int(d) for d in n.meta["tensor_meta"].shape)

    def tensor_args(node: Any) -> list[Any]:
        flat: list[Any] = []
        for a in (*node.args, *node.kwargs.values()):
            flat.extend(a if isinstance(a, list | tuple) else [a])
        return [a for a in flat if isinstance(a, fx.Node) and "tensor_meta" in a.meta
                and hasattr(a.meta["tensor_meta"], "shape")]

    def fresh(base: str) -> str:
        nm, i = base, 1
        while nm in used:
            nm, i = f"{base}_{i}", i + 1
        return nm

    def scope(node: Any) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        keys = list(stack.keys())
        if not keys:
            return ""
        path = stack[keys[-1]][0]
        return path if isinstance(path, str) else str(keys[-1])

    def add(ly: Layer, node: Any) -> None:
        layers.append(ly)
        used.add(ly.name)
        stage_of[node] = (ly.name,)

    def srcs(nodes: list[Any]) -> tuple[str, ...]:
        out: list[str] = []
        for n in nodes:
            for s in stage_of.get(n, ()):
                if s not in out:
                    out.append(s)
        return tuple(out)

    def rcc(out: tuple[int, ...]) -> tuple[int, int, int]:
        """(rows, cols, channels) of an activation (N, C, H, W), (N, T, D) or (N, D)."""
        if len(out) == 4:
            return out[2], out[3], out[1]
        if len(out) == 3:
            return out[1], 1, out[2]
        return 1, 1, out[-1]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            stage_of[node] = ()
            continue
        if node.op == "get_attr":
            stage_of[node] = ()
            constant.add(node)
            continue
        if node.op == "output":
            continue
        targs = tensor_args(node)
        is_qmatmul = node.op == "call_module" and type(mods[node.target]).__name__ == "QMatmul"
        if node.op == "call_module" and not is_qmatmul:
            ly = _layer_from_module(node.target, mods[node.target], shape(targs[0]), srcs(targs[:1]))
            if ly is not None:
                add(ly, node)
                continue
        kind = "matmul" if is_qmatmul else _functional_kind(node, targs)
        if (kind == "matmul" and len(targs) == 2 and not (set(targs) & constant)
                and len(shape(targs[0])) >= 2):
            a, b = shape(targs[0]), shape(targs[1])
            heads = 1
            for d in a[1:-2]:
                heads *= d
            sc = scope(node)
            if is_qmatmul:
                nm = node.target
            elif sc and type(orig.get(sc)).__name__ == "QMatmul" and sc not in used:
                nm = sc  # traced inside a QMatmul: the stage keeps the module's name
            else:
                nm = fresh(f"{sc}.matmul" if sc else "matmul")
            add(Layer(nm, "matmul", a[-2], 1, a[-1] * heads, b[-1] * heads, groups=heads,
                      inputs=srcs(targs)), node)
            continue
        if kind == "softmax":
            out = shape(node)
            heads = 1
            for d in out[1:-2]:
                heads *= d
            rows = out[-2] if len(out) >= 3 else 1
            base = f"{scope(node)}.softmax" if scope(node) else "softmax"
            add(Layer(fresh(base), "softmax", rows, 1, out[-1] * heads, out[-1] * heads,
                      inputs=srcs(targs[:1])), node)
            continue
        two_streams = (len(targs) == 2 and not (set(targs) & constant)
                       and srcs(targs[:1]) != srcs(targs[1:]))
        if (kind in ("add", "mul") and two_streams) or kind == "concat":
            base = f"{scope(node)}.{kind}" if scope(node) else kind
            h, w, c = rcc(shape(node))
            add(Layer(fresh(base), kind, h, w, c, c, inputs=srcs(targs)), node)
            continue
        if kind == "gap":
            h, w, c = rcc(shape(targs[0]))
            base = f"{scope(node)}.avgpool" if scope(node) else "avgpool"
            add(Layer(fresh(base), "gap", h, w, c, c, inputs=srcs(targs[:1])), node)
            continue
        # fused / pass-through node (activation, norm, reshape, attention matmul, ...):
        # its value depends on the stages of all its tensor inputs
        stage_of[node] = srcs(targs)
    return Network(net_name, tuple(layers))


def _functional_kind(node: Any, targs: list[Any]) -> str | None:
    import torch
    import torch.nn.functional as F

    t = node.target
    if node.op == "call_function":
        if t in (operator.add, operator.iadd, torch.add):
            return "add"
        if t in (operator.mul, operator.imul, torch.mul):
            return "mul"
        if t in (torch.cat, torch.concat):
            return "concat"
        if t in (operator.matmul, torch.matmul, torch.bmm):
            return "matmul"
        if t in (torch.softmax, F.softmax):
            return "softmax"
        if t in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            if _pair(size) == (1, 1):
                return "gap"
    if node.op == "call_method":
        if t in ("add", "add_"):
            return "add"
        if t in ("mul", "mul_"):
            return "mul"
        if t in ("matmul", "bmm"):
            return "matmul"
        if t == "softmax":
            return "softmax"
        if t == "mean":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dims is not None and sorted(int(d) % 4 for d in (dims if isinstance(dims, list | tuple) else [dims])) == [2, 3]:
                return "gap"
    return None


def _trace_hooks(module: Any, input_shape: tuple[int, ...], net_name: str) -> Network:
    import torch

    layers: list[Layer] = []
    handles = []

    def hook(name: str) -> Any:
        def fn(mod: Any, args: tuple[Any, ...], _out: Any) -> None:
            prev = (layers[-1].name,) if layers else ()
            ly = _layer_from_module(name, mod, tuple(int(d) for d in args[0].shape), prev)
            if ly is not None:
                layers.append(ly)
        return fn

    for nm, mod in module.named_modules():
        if nm and not list(mod.children()):
            handles.append(mod.register_forward_hook(hook(nm)))
    try:
        with torch.no_grad():
            module(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    return Network(f"{net_name}[hooks]", tuple(layers))
