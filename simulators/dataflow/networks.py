"""Layer graphs of ResNet-18, MobileNetV2 and MobileNetV3-small (224x224 RGB input).

Shapes from the papers (He et al. 2016, table 1; Sandler et al. 2018, table 2; Howard et
al. 2019, table 2); layer names follow torchvision's module names so that a
``layer_sparsity`` dict measured on the torchvision model applies as it is. BatchNorm is
folded into the convolution and activations are fused into the producing stage (they cost
no extra pipeline stage); residual additions, pools and squeeze-excitation products are
stages of their own.
"""

from __future__ import annotations

from collections.abc import Callable

from simulators.dataflow.layers import Layer
from simulators.dataflow.pipeline import Network


class _Builder:
    """Appends stages while tracking the current feature map (rows, cols, channels)."""

    def __init__(self, rows: int, cols: int, channels: int) -> None:
        self.layers: list[Layer] = []
        self.shape: dict[str, tuple[int, int, int]] = {"": (rows, cols, channels)}
        self.last = ""

    def _add(self, ly: Layer) -> str:
        self.layers.append(ly)
        self.shape[ly.name] = (ly.rows_out, ly.cols_out, ly.filters)
        self.last = ly.name
        return ly.name

    def conv(self, name: str, filters: int, k: int = 1, stride: int = 1, groups: int = 1,
             src: str | None = None) -> str:
        src = self.last if src is None else src
        r, c, ch = self.shape[src]
        p = (k - 1) // 2
        return self._add(Layer(name, "conv", r, c, ch, filters, kernel=(k, k), stride=(stride, stride),
                               pad=(p, p, p, p), groups=groups, inputs=(src,) if src else ()))

    def pool(self, name: str, k: int, stride: int, pad: int) -> str:
        r, c, ch = self.shape[self.last]
        return self._add(Layer(name, "pool", r, c, ch, ch, kernel=(k, k), stride=(stride, stride),
                               pad=(pad, pad, pad, pad), inputs=(self.last,)))

    def gap(self, name: str, src: str | None = None) -> str:
        src = self.last if src is None else src
        r, c, ch = self.shape[src]
        return self._add(Layer(name, "gap", r, c, ch, ch, inputs=(src,)))

    def eltwise(self, name: str, op: str, a: str, b: str, shape_of: str | None = None) -> str:
        r, c, ch = self.shape[a if shape_of is None else shape_of]
        return self._add(Layer(name, op, r, c, ch, ch, inputs=(a, b)))

    def linear(self, name: str, out: int) -> str:
        r, c, ch = self.shape[self.last]
        return self._add(Layer(name, "linear", 1, 1, r * c * ch, out, inputs=(self.last,)))


def resnet18(num_classes: int = 1000, size: int = 224) -> Network:
    """ResNet-18: 7x7/2 stem, 3x3/2 max pool, 4 stages of 2 basic blocks, average pool, fc."""
    b = _Builder(size, size, 3)
    b.conv("conv1", 64, 7, 2)
    b.pool("maxpool", 3, 2, 1)
    chans = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for blk in range(2):
            stride = 2 if (stage > 1 and blk == 0) else 1
            x = b.last
            pre = f"layer{stage}.{blk}"
            b.conv(f"{pre}.conv1", width, 3, stride, src=x)
            y = b.conv(f"{pre}.conv2", width, 3, 1)
            skip = x
            if stride != 1 or chans != width:
                skip = b.conv(f"{pre}.downsample.0", width, 1, stride, src=x)
            b.eltwise(f"{pre}.add", "add", y, skip)
            chans = width
    b.gap("avgpool")
    b.linear("fc", num_classes)
    return Network("resnet18", tuple(b.layers))


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def mobilenetv2(num_classes: int = 1000, size: int = 224) -> Network:
    """MobileNetV2 (width 1.0): inverted residual blocks, table 2 of the paper."""
    b = _Builder(size, size, 3)
    b.conv("features.0.0", 32, 3, 2)
    chans, idx = 32, 1
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            stride = s if i == 0 else 1
            x = b.last
            hidden = chans * t
            pre = f"features.{idx}.conv"
            j = 0
            if t != 1:
                b.conv(f"{pre}.0.0", hidden, 1, src=x)
                j = 1
            b.conv(f"{pre}.{j}.0", hidden, 3, stride, groups=hidden)
            y = b.conv(f"{pre}.{j + 1}", c, 1)
            if stride == 1 and chans == c:  # torchvision: x + self.conv(x)
                b.eltwise(f"features.{idx}.add", "add", x, y, shape_of=y)
            chans, idx = c, idx + 1
    b.conv("features.18.0", 1280, 1)
    b.gap("avgpool")
    b.linear("classifier.1", num_classes)
    return Network("mobilenetv2", tuple(b.layers))


def mobilenetv3_small(num_classes: int = 1000, size: int = 224) -> Network:
    """MobileNetV3-small: table 2 of the paper, squeeze-excitation as gap -> fc1 -> fc2 -> mul."""
    b = _Builder(size, size, 3)
    b.conv("features.0.0", 16, 3, 2)
    chans = 16
    cfg = ((3, 16, 16, True, 2), (3, 72, 24, False, 2), (3, 88, 24, False, 1), (5, 96, 40, True, 2),
           (5, 240, 40, True, 1), (5, 240, 40, True, 1), (5, 120, 48, True, 1), (5, 144, 48, True, 1),
           (5, 288, 96, True, 2), (5, 576, 96, True, 1), (5, 576, 96, True, 1))
    for idx, (k, exp, out, se, stride) in enumerate(cfg, start=1):
        x = b.last
        pre = f"features.{idx}.block"
        j = 0
        if exp != chans:
            b.conv(f"{pre}.0.0", exp, 1, src=x)
            j = 1
        d = b.conv(f"{pre}.{j}.0", exp, k, stride, groups=exp)
        j += 1
        if se:
            sq = _make_divisible(exp // 4, 8)
            b.gap(f"{pre}.{j}.avgpool", src=d)
            b.conv(f"{pre}.{j}.fc1", sq, 1)
            s = b.conv(f"{pre}.{j}.fc2", exp, 1)
            b.eltwise(f"{pre}.{j}.mul", "mul", s, d, shape_of=d)  # torchvision: scale * input
            j += 1
        y = b.conv(f"{pre}.{j}.0", out, 1)
        if stride == 1 and chans == out:
            b.eltwise(f"features.{idx}.add", "add", y, x)
        chans = out
    b.conv("features.12.0", 576, 1)
    b.gap("avgpool")
    b.linear("classifier.0", 1024)
    b.linear("classifier.3", num_classes)
    return Network("mobilenetv3_small", tuple(b.layers))


NETWORKS: dict[str, Callable[..., Network]] = {
    "resnet18": resnet18,
    "mobilenetv2": mobilenetv2,
    "mobilenetv3_small": mobilenetv3_small,
}


def get_network(name: str, **kwargs: int) -> Network:
    """A shipped network by name (``resnet18``, ``mobilenetv2``, ``mobilenetv3_small``)."""
    if name not in NETWORKS:
        raise ValueError(f"network: expected one of {sorted(NETWORKS)}, got {name!r}")
    return NETWORKS[name](**kwargs)
