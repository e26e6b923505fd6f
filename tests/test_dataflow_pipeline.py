"""Pipeline, networks, tracing and the folding optimiser of the dataflow simulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from simulators.dataflow.devices import get_device
from simulators.dataflow.layers import Layer
from simulators.dataflow.networks import NETWORKS, get_network, mobilenetv2, resnet18
from simulators.dataflow.optimiser import optimise
from simulators.dataflow.pipeline import RESOURCES, Folding, Network, Pipeline, random_foldings
from simulators.dataflow.sparsity import synthetic
from simulators.dataflow.trace import trace


def _sparse(net: Network, density: float) -> dict:
    return {ly.name: synthetic(ly.window, ly.channels, density) for ly in net.layers if ly.op in ("conv", "linear")}


def test_network_shapes_match_papers() -> None:
    """MACs and weights (bias-free) of the shipped graphs against the papers' figures."""
    r18, v2, v3 = resnet18(), mobilenetv2(), get_network("mobilenetv3_small")
    assert r18.macs == pytest.approx(1.814e9, rel=2e-3) and r18.weights == pytest.approx(11.68e6, rel=2e-3)
    assert v2.macs == pytest.approx(300e6, rel=5e-3) and v2.weights == pytest.approx(3.47e6, rel=5e-3)
    assert v3.macs == pytest.approx(56.5e6, rel=1e-2) and v3.weights == pytest.approx(2.53e6, rel=1e-2)
    # every stage's input shape is its producer's output shape
    for net in (r18, v2, v3):
        by = {ly.name: ly for ly in net.layers}
        for ly in net.layers:
            for u in ly.inputs[1:] if ly.op == "mul" else ly.inputs:  # mul: the scale broadcasts
                p = by[u]
                if ly.op == "linear":
                    assert ly.channels == p.rows_out * p.cols_out * p.filters
                else:
                    assert (ly.rows, ly.cols, ly.channels) == (p.rows_out, p.cols_out, p.filters), ly.name


def test_single_partition_throughput_is_clock_over_max_ii() -> None:
    net = mobilenetv2()
    pipe = Pipeline(net, "u250", 8, 8)
    fold = random_foldings(net, 64, seed=1)
    res = pipe.evaluate(fold)
    one = res.partitions == 1
    assert one.any()
    dev = get_device("u250")
    mem = (pipe._in_bytes.sum() + pipe._out_bytes[pipe._is_output].sum()) / (dev.mem_bandwidth_gbps * 1e9 / dev.clock_hz)
    expect = dev.clock_hz / np.maximum(res.ii_cycles.max(axis=1), mem)
    np.testing.assert_allclose(res.images_per_s[one], expect[one], rtol=1e-12)
    assert np.all(res.bottleneck == res.ii_cycles.argmax(axis=1))
    np.testing.assert_array_equal(res.dsp[one], res.layer_resources["dsp"].sum(axis=1)[one])
    np.testing.assert_allclose(res.images_per_s_per_dsp, res.images_per_s / res.dsp)


def test_vectorised_equals_scalar() -> None:
    net = resnet18()
    pipe = Pipeline(net, "zcu102", 8, 8, sparsity=_sparse(net, 0.5))
    fold = random_foldings(net, 12, seed=2)
    res = pipe.evaluate(fold)
    for i in range(fold.n_points):
        r1 = pipe.evaluate(fold.point(i))
        for k, v in r1.metrics().items():
            assert v == pytest.approx(res.metrics(i)[k], rel=1e-12), k


def test_bandwidth_slows_the_pipeline() -> None:
    net = mobilenetv2()
    slow = get_device("u250", mem_bandwidth_gbps=0.001)
    fold = Folding.ones(net)
    fast_r = Pipeline(net, "u250").evaluate(fold)
    slow_r = Pipeline(net, slow).evaluate(fold)
    in_bytes = 224 * 224 * 3 * 2 + 1000 * 2
    assert slow_r.interval_cycles[0] == pytest.approx(in_bytes / (0.001e9 / slow.clock_hz))
    assert slow_r.images_per_s[0] < fast_r.images_per_s[0]
    # streamed weights add their bytes to every image
    lw = Pipeline(net, slow, layer_weight_memory={"classifier.1": "stream"}).evaluate(fold)
    assert lw.interval_cycles[0] == pytest.approx((in_bytes + 1280 * 1000 * 2) / (0.001e9 / slow.clock_hz))


def test_partitions_and_reconfiguration() -> None:
    net = resnet18()
    dev = get_device("zcu102")
    pipe = Pipeline(net, dev, 8, 8, weight_memory="bram", batch=64)
    res = pipe.evaluate(Folding.ones(net))
    assert res.partitions[0] > 1 and res.fits_device[0]
    for r in RESOURCES:
        assert getattr(res, r)[0] <= getattr(dev, r)
    # time per batch >= reconfigurations + batch x (sum of partition intervals)
    assert 64 / res.images_per_s[0] >= res.partitions[0] * dev.reconfig_s
    no = Pipeline(net, dev, 8, 8, weight_memory="bram", allow_partitions=False).evaluate(Folding.ones(net))
    assert not no.fits_device[0]


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("device", ["zcu102", "u250"])
def test_optimiser_fits_budget(name: str, device: str) -> None:
    net = get_network(name)
    dev = get_device(device)
    rng = np.random.default_rng(hash((name, device)) % 2**32)
    for density in ((None,) if device == "zcu102" else (0.3,)):  # dense on one device, sparse on the other
        pipe = Pipeline(net, dev, 8, 8, sparsity=None if density is None else _sparse(net, density))
        frac = float(rng.uniform(0.1, 1.0))
        budget = {"dsp": dev.dsp * frac, "lut": dev.lut * frac}
        fold, res = optimise(pipe, budget=budget, max_utilisation=0.9)
        assert res.fits_device[0]
        assert res.dsp[0] <= 0.9 * budget["dsp"] and res.lut[0] <= 0.9 * budget["lut"]
        assert res.bram18[0] <= 0.9 * dev.bram18 and res.uram[0] <= 0.9 * dev.uram
        ones = Pipeline(net, dev, 8, 8, sparsity=pipe_sparsity(pipe)).evaluate(Folding.ones(net))
        assert res.images_per_s[0] >= ones.images_per_s[0] * (1 - 1e-12) or ones.partitions[0] > 1


def pipe_sparsity(pipe: Pipeline) -> dict:
    return {m.layer.name: m.sparsity for m in pipe.models if m.sparsity is not None}


def test_optimiser_uses_sparsity() -> None:
    """Same device and budget: a sparse ResNet-18 reaches more images/s per DSP."""
    net = resnet18()
    _, dense = optimise(Pipeline(net, "u250", 8, 8), budget={"dsp": 3000})
    _, sparse = optimise(Pipeline(net, "u250", 8, 8, sparsity=_sparse(net, 0.3)), budget={"dsp": 3000})
    assert sparse.images_per_s_per_dsp[0] > dense.images_per_s_per_dsp[0]


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return torch.relu(y + x)


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 5, stride=2, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.block = _Block(8)
        self.se = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.pool(torch.relu(self.stem(x))))
        s = torch.sigmoid(self.se(nn.functional.adaptive_avg_pool2d(x, 1)))
        x = x * s
        return self.head(torch.flatten(x, 1))


def test_trace_equals_hand_description() -> None:
    got = trace(_SmallCNN(), (1, 16, 16), name="small")
    hand = Network("small", (
        Layer("stem", "conv", 16, 16, 1, 8, kernel=(5, 5), stride=(2, 2), pad=(2, 2, 2, 2)),
        Layer("pool", "pool", 8, 8, 8, 8, kernel=(2, 2), stride=(2, 2), inputs=("stem",)),
        Layer("block.conv1", "conv", 4, 4, 8, 8, kernel=(3, 3), pad=(1, 1, 1, 1), inputs=("pool",)),
        Layer("block.conv2", "conv", 4, 4, 8, 8, kernel=(3, 3), pad=(1, 1, 1, 1), groups=8, inputs=("block.conv1",)),
        Layer("block.add", "add", 4, 4, 8, 8, inputs=("block.conv2", "pool")),
        Layer("avgpool", "gap", 4, 4, 8, 8, inputs=("block.add",)),
        Layer("se", "conv", 1, 1, 8, 8, inputs=("avgpool",)),
        Layer("mul", "mul", 4, 4, 8, 8, inputs=("block.add", "se")),
        Layer("head", "linear", 1, 1, 128, 10, inputs=("mul",)),
    ))
    assert got == hand


def test_trace_falls_back_to_hooks() -> None:
    class Dyn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Linear(4 * 6 * 6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            if y.sum() > 1e9:  # data-dependent: fx cannot trace it
                y = y * 2
            return self.b(y.flatten(1))

    net = trace(Dyn(), (3, 8, 8))
    assert net.name.endswith("[hooks]")
    assert [(ly.name, ly.op, ly.inputs) for ly in net.layers] == [("a", "conv", ()), ("b", "linear", ("a",))]


def test_trace_vit_linear_layers() -> None:
    """A ViT traces to its Linear layers (tokens as rows) with residual adds and, per block,
    attention stages QK^T (matmul) -> softmax -> AV (matmul) -> output projection."""
    from evaluators.models import GlyphViT

    model = GlyphViT()
    net = trace(model, (1, 16, 16))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {ly.name for ly in net.layers if ly.op == "linear"} == linears
    n_tokens = 16
    assert all(ly.rows == n_tokens for ly in net.layers if ly.op == "linear" and ly.name != "head")
    outs = [ly for ly in net.layers if ly.name.endswith("attn.o")]
    assert outs and all(ly.inputs == (ly.name[:-1] + "pv",) for ly in outs)
    by = {ly.name: ly for ly in net.layers}
    for i in range(len(outs)):
        p = f"blocks.{i}.attn."
        qk, sm, pv = by[p + "qk"], by[p + "softmax"], by[p + "pv"]
        assert (qk.op, sm.op, pv.op) == ("matmul", "softmax", "matmul")
        assert qk.inputs == (p + "q", p + "k") and sm.inputs == (p + "qk",)
        assert pv.inputs == (p + "softmax", p + "v")
        # 4 heads of 16 tokens x 16 dims: QK^T (16 x 16) @ (16 x 16) per head
        assert (qk.rows, qk.channels, qk.filters, qk.groups) == (16, 64, 64, 4)
        assert qk.macs == pv.macs == 4 * 16 * 16 * 16 and qk.weights == 4 * 16 * 16
    assert sum(ly.op == "add" for ly in net.layers) == 2 * len(outs)


class _Basic(nn.Module):
    """torchvision's BasicBlock, same attribute names."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class _ResNet18(nn.Module):
    """torchvision's resnet18 layout and module names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin = (64, 128, 256, 512), 64
        for i, w in enumerate(widths, start=1):
            setattr(self, f"layer{i}", nn.Sequential(_Basic(cin, w, 1 if i == 1 else 2), _Basic(w, w, 1)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_traced_resnet18_equals_shipped_graph() -> None:
    got = trace(_ResNet18(), (3, 64, 64), name="resnet18")  # 64 px keeps the shape pass cheap
    assert got == resnet18(size=64)


def _cna(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation (conv, BN, ReLU6)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class _InvRes(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = cin * t
        layers: list[nn.Module] = [_cna(cin, hidden, 1)] if t != 1 else []
        layers += [_cna(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.res else self.conv(x)


class _MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 layout and module names."""

    def __init__(self) -> None:
        super().__init__()
        feats: list[nn.Module] = [_cna(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
            for i in range(n):
                feats.append(_InvRes(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(_cna(320, 1280, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def test_traced_mobilenetv2_equals_shipped_graph() -> None:
    got = trace(_MobileNetV2(), (3, 64, 64), name="mobilenetv2")
    assert got == mobilenetv2(size=64)


class _SE(nn.Module):
    def __init__(self, c: int, sq: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, sq, 1), nn.Conv2d(sq, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(self.avgpool(x)))))
        return s * x


class _InvResV3(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [_cna(cin, exp, 1)] if exp != cin else []
        layers.append(_cna(exp, exp, k, stride, exp))
        if se:
            layers.append(_SE(exp, max(8, int(exp // 4 + 4) // 8 * 8)))
        layers.append(nn.Sequential(nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout)))
        self.block = nn.Sequential(*layers)
        self.res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.res:
            out += x
        return out


class _MobileNetV3Small(nn.Module):
    """torchvision's mobilenet_v3_small layout and module names."""

    def __init__(self) -> None:
        super().__init__()
        feats: list[nn.Module] = [_cna(3, 16, 3, 2)]
        cin = 16
        for k, exp, out, se, s in ((3, 16, 16, True, 2), (3, 72, 24, False, 2), (3, 88, 24, False, 1),
                                   (5, 96, 40, True, 2), (5, 240, 40, True, 1), (5, 240, 40, True, 1),
                                   (5, 120, 48, True, 1), (5, 144, 48, True, 1), (5, 288, 96, True, 2),
                                   (5, 576, 96, True, 1), (5, 576, 96, True, 1)):
            feats.append(_InvResV3(cin, k, exp, out, se, s))
            cin = out
        feats.append(_cna(96, 576, 1))
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_traced_mobilenetv3_small_equals_shipped_graph() -> None:
    got = trace(_MobileNetV3Small(), (3, 64, 64), name="mobilenetv3_small")
    assert got == get_network("mobilenetv3_small", size=64)


def test_trace_rejects_unsupported_layers() -> None:
    with pytest.raises(ValueError, match="dilation"):
        trace(nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2)), (3, 16, 16))
    with pytest.raises(ValueError, match="ConvTranspose2d"):
        trace(nn.Sequential(nn.ConvTranspose2d(3, 4, 2)), (3, 8, 8))
