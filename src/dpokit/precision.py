"""Which floating-point precision a device runs fast: `precision=auto` resolves to bf16 or fp32.

bf16 autocast halves activation memory and, where the hardware has bf16 arithmetic, roughly doubles
matmul throughput. Where it has not, bf16 is *emulated* and far slower than fp32: on an AVX2-only CPU
a 1024x1024 bf16 matmul ran at 0.6 GFLOP/s against 44 GFLOP/s in fp32, and one Linear under bf16
autocast 5x slower. So bf16 is chosen only where the device does it natively:
  - CUDA devices that report bf16 support (Ampere and newer);
  - CPUs whose flags show avx512_bf16 or amx_bf16 (oneDNN's bf16 kernels), unless oneDNN has been
    capped below those instruction sets with ONEDNN_MAX_CPU_ISA (then its bf16 path is emulated too);
and fp32 everywhere else. The choice is logged once per device. An explicit `precision=bf16` on a
device without native bf16 is honoured, with one warning that gives a measured speed ratio.
"""

import functools
import logging
import os
import time

import torch

log = logging.getLogger("dpokit")

PRECISIONS = ["auto", "fp32", "bf16"]
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which it still has native bf16 kernels
BF16_ONEDNN_ISAS = (
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
    "AVX10_1_512",
    "AVX10_1_512_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX10_2_512",
    "AVX10_2_512_AMX_2",
    "DEFAULT",
    "ALL",
)


def cpu_flags() -> set:
    """The CPU's feature flags as the kernel reports them (empty where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86 / ARM
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native_bf16(flags, onednn_max_isa: str | None = None) -> tuple[bool, str]:
    """(native, reason) for a CPU with these flags and this ONEDNN_MAX_CPU_ISA value (None: unset)."""
    have = [f for f in BF16_CPU_FLAGS if f in flags]
    if not have:
        return False, f"this CPU lacks {' and '.join(BF16_CPU_FLAGS)}, so bf16 matmuls are emulated"
    if onednn_max_isa and onednn_max_isa.strip().upper() not in BF16_ONEDNN_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={onednn_max_isa} caps oneDNN below its bf16 kernels"
    return True, f"this CPU has {', '.join(have)}"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "this GPU supports bf16" if ok else "this GPU lacks native bf16"
    if device.type == "cpu":
        return cpu_native_bf16(cpu_flags(), os.environ.get("ONEDNN_MAX_CPU_ISA"))
    return False, f"bf16 is not assumed native on {device.type}"


@functools.cache
def resolve(precision: str, device_type: str, device_index=None) -> str:
    """`auto` -> 'bf16' or 'fp32' for this device (logged once); 'bf16' / 'fp32' stay as they are (an
    explicit bf16 on an emulating device warns once, with a measured speed ratio)."""
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    if precision == "fp32":
        return "fp32"
    native, reason = native_bf16(device)
    if precision == "auto":
        chosen = "bf16" if native else "fp32"
        log.info("precision auto -> %s on %s (%s)", chosen, device_type, reason)
        return chosen
    if not native:
        log.warning(
            "precision=bf16 on %s: %s (measured here: a bf16 matmul runs %.1fx slower than fp32); "
            "precision=auto would use fp32",
            device_type,
            reason,
            bf16_slowdown(device),
        )
    return "bf16"


def resolve_for(device: torch.device, precision: str) -> str:
    return resolve(precision, device.type, device.index)


def bf16_slowdown(device: torch.device, n: int = 256, repeats: int = 3) -> float:
    """Time of an n x n bf16 matmul over the fp32 one on this device (best of `repeats`; ~10 ms)."""

    def best(dtype):
        a = torch.linspace(-1, 1, n * n, device=device).reshape(n, n).to(dtype)  # no RNG: runs stay seeded
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ a
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)
