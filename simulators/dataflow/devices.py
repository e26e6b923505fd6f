"""FPGA devices as data: resource budgets, clock, off-chip bandwidth, reconfiguration time.

Resource counts are the parts' data-sheet totals (AMD/Xilinx DS891 for the XCZU9EG on
ZCU102, DS962/UG1314 for the XCU250 on Alveo U250; BRAM counted in BRAM18 halves of the
BRAM36 tiles). Clocks are typical fpgaConvNet/HASS build clocks; bandwidth is the
board's DDR4 peak; reconfiguration time is a full-bitstream load estimate
(bitstream bytes / configuration-port bytes per second).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Device:
    """An FPGA platform.

    Attributes:
        name: short name (``zcu102``, ``u250``).
        dsp, bram18, uram, lut, ff: available resources (BRAM in BRAM18 blocks, URAM in
            URAM288 blocks).
        clock_mhz: design clock in MHz.
        mem_bandwidth_gbps: off-chip bandwidth in GB/s (1e9 bytes/s).
        reconfig_s: seconds to load one partition's bitstream.
    """

    name: str
    dsp: int
    bram18: int
    uram: int
    lut: int
    ff: int
    clock_mhz: float
    mem_bandwidth_gbps: float
    reconfig_s: float

    def __post_init__(self) -> None:
        for f in ("dsp", "bram18", "lut", "ff", "clock_mhz", "mem_bandwidth_gbps"):
            if not getattr(self, f) > 0:
                raise ValueError(f"{f}: expected a positive number, got {getattr(self, f)}")
        if self.uram < 0:
            raise ValueError(f"uram: expected >= 0, got {self.uram}")
        if self.reconfig_s < 0:
            raise ValueError(f"reconfig_s: expected >= 0, got {self.reconfig_s}")

    @property
    def clock_hz(self) -> float:
        """Clock in Hz."""
        return self.clock_mhz * 1e6

    def budget(self) -> dict[str, int]:
        """Resources as a dict (``dsp``, ``bram18``, ``uram``, ``lut``, ``ff``)."""
        return {"dsp": self.dsp, "bram18": self.bram18, "uram": self.uram, "lut": self.lut, "ff": self.ff}


DEVICES: dict[str, Device] = {
    # XCZU9EG: 2520 DSP48E2, 912 BRAM36 (= 1824 BRAM18), 274,080 LUT, 548,160 FF;
    # PS DDR4-2400 x64 = 19.2 GB/s; ~26.5 MB bitstream over PCAP (~128 MB/s).
    "zcu102": Device("zcu102", dsp=2520, bram18=1824, uram=0, lut=274080, ff=548160, clock_mhz=200.0,
                     mem_bandwidth_gbps=19.2, reconfig_s=0.2),
    # XCU250: 12,288 DSP48E2, 2688 BRAM36 (= 5376 BRAM18), 1280 URAM288, 1,728,000 LUT, 3,456,000 FF;
    # 4 x DDR4-2400 x72 = 77 GB/s; ~ 90 MB bitstream over PCIe/ICAP (~0.4 s).
    "u250": Device("u250", dsp=12288, bram18=5376, uram=1280, lut=1728000, ff=3456000, clock_mhz=250.0,
                   mem_bandwidth_gbps=77.0, reconfig_s=0.4),
}


def get_device(name: str | Device, **overrides: Any) -> Device:
    """A device by name (``zcu102``, ``u250``), optionally with fields overridden."""
    if isinstance(name, Device):
        dev = name
    else:
        key = str(name).lower().replace("alveo_", "").replace("-", "").replace("_", "")
        if key not in DEVICES:
            raise ValueError(f"device: expected one of {sorted(DEVICES)}, got {name!r}")
        dev = DEVICES[key]
    bad = set(overrides) - set(Device.__dataclass_fields__) - {"name"}
    if bad:
        raise ValueError(f"device override: unknown field(s) {sorted(bad)}")
    return replace(dev, **overrides) if overrides else dev
