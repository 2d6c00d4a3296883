"""Which dtype a speed-only matrix product uses on this device: bfloat16 only where it is fast.

Reduced precision is a speed trick, never a result: the tuned-lens trainer's unembedding products
(the only such place in idiom_lens) run in bf16 where the hardware multiplies bf16 natively, and
in fp32 everywhere else. The difference is large both ways: on a 2-core Intel Xeon with AMX the
timed bf16 product below ran 3.1x faster than fp32 (a whole training step 1.7x: 5.0 s vs 8.7 s);
on an AVX2-only CPU bf16 is emulated and a [128, 640] x [640, 262144] product is about 200x slower.

`matmul_precision(device)` decides once per process and device type:
- `IDIOM_LENS_MATMUL_DTYPE=float32|bfloat16` forces a choice (tests, or a user who knows better);
- CUDA: bf16 where `torch.cuda.is_bf16_supported()`;
- CPU: fp32 unless the CPU flags show native bf16 (`amx_bf16` or `avx512_bf16`); where they do, a
  tiny timed product must also show bf16 at least `MIN_SPEEDUP` times faster, because the kernels
  a process may use can be capped below what the CPU has (`ONEDNN_MAX_CPU_ISA=AVX2`,
  `ATEN_CPU_CAPABILITY=avx2`), which flags do not show;
- any other device: fp32.
The choice is logged once and each result that used it records `PrecisionChoice.describe()`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from idiom_lens.errors import InputError

ENV_OVERRIDE = "IDIOM_LENS_MATMUL_DTYPE"
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
MIN_SPEEDUP = 1.5  # bf16 must beat fp32 by this much in the timed product to be worth its rounding
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionChoice:
    """The dtype of speed-only products on one device type, and why it was chosen."""

    dtype: torch.dtype
    device_type: str
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> dict[str, str]:
        """What a result records: the dtype used and why."""
        return {"matmul_dtype": self.name, "matmul_dtype_reason": self.reason}


_choices: dict[str, PrecisionChoice] = {}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags (Linux x86 `flags` line), or None where they cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return None


def _best_seconds(dtype: torch.dtype, repeats: int = 3, *, rows: int = 64, columns: int = 4096) -> float:
    """Best of `repeats` timings of a [rows, 640] x [640, columns] product in `dtype` (the
    tuned-lens trainer's shape, fewer columns), after one warm-up."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, 640, generator=generator).to(dtype)
    b = torch.randn(640, columns, generator=generator).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return best


def measured_bf16_speedup() -> float:
    """fp32 time / bf16 time of the same small product on this CPU, with this process's kernels.
    A product 16x smaller first: where bf16 is emulated (some 200x slower) that answers in
    milliseconds instead of seconds; the full-size one decides otherwise."""
    small = dict(rows=16, columns=1024)
    speedup = _best_seconds(torch.float32, **small) / _best_seconds(torch.bfloat16, **small)
    if speedup < 0.1:  # far too slow to reach MIN_SPEEDUP at any size: emulated
        return speedup
    return _best_seconds(torch.float32) / _best_seconds(torch.bfloat16)


def _decide(device_type: str) -> PrecisionChoice:
    forced = os.environ.get(ENV_OVERRIDE)
    if forced:
        if forced not in _DTYPES:
            raise InputError(f"{ENV_OVERRIDE}={forced!r}: expected one of {sorted(_DTYPES)}")
        return PrecisionChoice(_DTYPES[forced], device_type, f"forced by {ENV_OVERRIDE}")
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice(torch.bfloat16, device_type, "the GPU supports bf16")
        return PrecisionChoice(torch.float32, device_type, "the GPU does not support bf16")
    if device_type != "cpu":
        return PrecisionChoice(torch.float32, device_type, f"no bf16 rule for device type {device_type}")
    flags = cpu_flags()
    if flags is not None and not flags & NATIVE_BF16_FLAGS:
        return PrecisionChoice(torch.float32, device_type,
                               f"no native bf16 on this CPU (none of {sorted(NATIVE_BF16_FLAGS)} in its flags)")
    speedup = measured_bf16_speedup()
    if speedup >= MIN_SPEEDUP:
        return PrecisionChoice(torch.bfloat16, device_type, f"bf16 measured {speedup:.1f}x faster than fp32")
    return PrecisionChoice(torch.float32, device_type,
                           f"bf16 measured {speedup:.2f}x the speed of fp32 (needs {MIN_SPEEDUP}x): "
                           "kernels capped below the CPU's bf16 units, or none")


def matmul_precision(device: Any = "cpu", *, log: Callable[[str], None] = print) -> PrecisionChoice:
    """The dtype of speed-only products on `device`, decided once per process and device type
    (logged the first time)."""
    device_type = torch.device(device).type
    if device_type not in _choices:
        _choices[device_type] = choice = _decide(device_type)
        log(f"speed-only matrix products on {device_type}: {choice.name} ({choice.reason})")
    return _choices[device_type]


def forget_choices() -> None:
    """Decide again on the next call (tests, or after changing the kernel settings)."""
    _choices.clear()
