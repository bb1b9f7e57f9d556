"""What this machine's CPU can accelerate: ISA flags read from the OS, and AMX probed for real.

CPUID is not enough. On virtual machines the CPU may advertise AMX while the hypervisor or
kernel does not grant the tile state (llama.cpp's AMX kernels crashed on this project's
machines), so AMX counts only after a child process has asked the kernel for the tile state
(arch_prctl ARCH_REQ_XCOMP_PERM) and run ldtilecfg / tileloadd / tdpbssd / tilestored on a tiny
tile and got the right answer. The child can die of SIGILL without taking the caller with it.
Used by `edgelm bench` (the machine a number was measured on) and the build's preflight."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

# flag names as Linux /proc/cpuinfo spells them (x86 "flags", ARM64 "Features")
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "bf16", "sve")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "asimddp", "i8mm")

_AMX_PROBE = r"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.syscall(158, 0x1023, 18) != 0:   # arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    sys.exit(3)
cfg = (ctypes.c_uint8 * 64)()
cfg[0] = 1                                # palette 1; tiles 0-2: 1 row x 4 bytes
for t in range(3):
    cfg[16 + 2 * t], cfg[48 + t] = 4, 1
data, out = (ctypes.c_int8 * 64)(*([1] * 64)), (ctypes.c_int32 * 16)()
code = bytes([0xC4, 0xE2, 0x78, 0x49, 0x07,         # ldtilecfg [rdi]
              0xC4, 0xE2, 0x7B, 0x49, 0xC0,         # tilezero tmm0
              0xC4, 0xE2, 0x7B, 0x4B, 0x0C, 0x16,   # tileloadd tmm1, [rsi + rdx]
              0xC4, 0xE2, 0x7B, 0x4B, 0x14, 0x16,   # tileloadd tmm2, [rsi + rdx]
              0xC4, 0xE2, 0x6B, 0x5E, 0xC1,         # tdpbssd tmm0, tmm1, tmm2
              0xC4, 0xE2, 0x7A, 0x4B, 0x04, 0x11,   # tilestored [rcx + rdx], tmm0
              0xC4, 0xE2, 0x78, 0x49, 0xC0,         # tilerelease
              0xC3])                                # ret
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
run = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)(
    ctypes.addressof(ctypes.c_char.from_buffer(page)))
run(ctypes.addressof(cfg), ctypes.addressof(data), 4, ctypes.addressof(out))
sys.exit(0 if out[0] == 4 else 4)         # 1x4 int8 ones . 4x1 int8 ones = 4
"""


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The ISA_FLAGS the OS reports for this CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return []
    words = {word for line in cpuinfo.splitlines() if line.startswith(("flags", "Features")) for word in line.split()}
    return [flag for flag in ISA_FLAGS if flag in words]


def cpu_model(cpuinfo: str | None = None) -> str:
    try:
        text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith(("model name", "Hardware", "CPU part")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()



def describe_host() -> str:
    """One line for a measurement: CPU model, logical CPUs, OS, Python (benchmarks print it beside their numbers)."""
    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


@functools.lru_cache(maxsize=1)
def amx_probe() -> tuple[bool, str]:
    """(usable, why): AMX int8 tiles work in a child process on this machine."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, "not Linux x86-64"
    if not {"amx_tile", "amx_int8"} <= set(cpu_flags()):
        return False, "not advertised"
    try:
        result = subprocess.run([sys.executable, "-c", _AMX_PROBE], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"probe failed to run ({type(exc).__name__})"
    if result.returncode == 0:
        return True, "advertised, and tdpbssd ran correctly in a probe"
    if result.returncode == 3:
        return False, "advertised, but the kernel refused the tile state (arch_prctl)"
    if result.returncode < 0:
        return False, f"advertised, but the probe died of signal {-result.returncode} (the VM faults on tile instructions)"
    return False, f"advertised, but the probe computed a wrong result (exit {result.returncode})"


def host_features() -> dict[str, Any]:
    """Recorded in each bundle's manifest (provenance.build_host)."""
    flags = cpu_flags()
    amx, why = amx_probe()
    return {"cpu": cpu_model(), "machine": platform.machine(), "system": platform.system(), "isa": flags,
            "int8_dot_product": bool(set(flags) & set(INT8_DOT_FLAGS)) or amx, "amx_usable": amx, "amx": why}
