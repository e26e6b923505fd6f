"""Energy and area coefficients (one place; every number cites its source).

Technology: logic and SRAM numbers are 45 nm, from one consistent source so that ratios
between design points are meaningful; absolute mm2 and J are 45 nm values, not a
projection to a modern node.

* Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014,
  keynote tables (45 nm, 0.9 V): energy int8 mult 0.2 pJ, int32 add 0.1 pJ, fp16 mult
  1.1 pJ, fp16 add 0.4 pJ, 32 kB SRAM 64-bit read 20 pJ; area int8 mult 282 um2,
  int32 add 137 um2, fp16 mult 1640 um2, fp16 add 1360 um2.
* O'Connor et al., "Fine-Grained DRAM: Energy-Efficient DRAM for Extreme Bandwidth
  Systems", MICRO 2017: HBM2 access energy about 3.9 pJ/bit.
* Mistry et al., "A 45nm logic technology with high-k+metal gate transistors...",
  IEDM 2007: 6T SRAM cell 0.346 um2; we assume 70 % array efficiency (peripherals).
* HBM PHY + controller area per GB/s: an engineering estimate (about 14 mm2 for a
  460 GB/s HBM2E stack interface, read off public die shots); it is not node-scaled and
  exists so that bandwidth is not free in an area objective. Set it to 0 to exclude.

Multiplier energy and area scale with ``quant.multiplier_cost(a, b)``, which is the
operand pair's multiplier gate count relative to int8 x int8 (so int8 x int8 = 1).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CostCoefficients:
    """Per-operation energy (pJ) and per-unit area (um2) coefficients, 45 nm."""

    mult_int8_pj: float = 0.2  # Horowitz 2014: 8-bit int multiply
    acc_pj: float = 0.1  # Horowitz 2014: 32-bit int add (accumulator)
    vector_op_pj: float = 1.1  # Horowitz 2014: fp16 multiply (vector unit op, bf16-class)
    sram_pj_per_bit: float = 20.0 / 64.0  # Horowitz 2014: 32 kB SRAM, 64-bit read = 20 pJ
    hbm_pj_per_bit: float = 3.9  # O'Connor et al. MICRO 2017: HBM2
    mult_int8_um2: float = 282.0  # Horowitz 2014: 8-bit int multiplier
    acc_um2: float = 137.0  # Horowitz 2014: 32-bit int adder (accumulator / reduction tree)
    vector_lane_um2: float = 1640.0 + 1360.0  # Horowitz 2014: fp16 mult + fp16 add (FMA lane)
    sram_um2_per_bit: float = 0.346 / 0.7  # Mistry et al. IEDM 2007 cell / 70 % efficiency
    hbm_phy_mm2_per_gbps: float = 14.0 / 460.0  # engineering estimate, see module docstring


DEFAULT_COSTS = CostCoefficients()
