"""OCP MX exactness against every shared reference file mx_vectors*.json."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from quant import get_format
from tests.conftest import reference_files


def _records() -> list[tuple[str, str, str]]:
    out = []
    for path in reference_files("mx_vectors*.json"):
        data = json.loads(path.read_text())
        for fmt, per_input in data["outputs"].items():
            for inp in per_input:
                out.append((str(path), fmt, inp))
    return out


def _tensor_from_input(rec: dict) -> torch.Tensor:
    if "float32_hex" in rec:
        vals = [[struct.unpack(">f", bytes.fromhex(h))[0] for h in row] for row in rec["float32_hex"]]
        x = torch.tensor(vals, dtype=torch.float32)
        if "values" in rec:  # the decimal copy must agree with the exact bits
            assert torch.equal(x, torch.tensor(rec["values"], dtype=torch.float32))
        return x
    return torch.tensor(rec["values"], dtype=torch.float32)


@pytest.mark.parametrize(("path", "fmt", "inp"), _records())
def test_mx_reference_exact(path: str, fmt: str, inp: str) -> None:
    data = json.loads(open(path).read())
    spec = data["formats"][fmt]
    f = get_format(f"{fmt.lower()}(block={spec['block_size']})")
    # the format we parse must be the format the file describes
    assert f.block == spec["block_size"]
    emax, maxv = f.elem_params
    assert emax == spec["emax_element"]
    assert maxv == spec["max_element_magnitude"]
    x = _tensor_from_input(data["inputs"][inp])
    assert list(x.shape) == data["inputs"][inp].get("shape", list(x.shape))
    ref = torch.tensor(data["outputs"][fmt][inp]["reference"], dtype=torch.float32)
    q = f.quantize(x, axis=-1)
    assert q.dtype == torch.float32
    mism = (q != ref).nonzero()
    assert mism.numel() == 0, f"{fmt}/{inp}: {len(mism)} mismatches, first at {mism[:5].tolist()}"
