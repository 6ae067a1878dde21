"""The deployment CPU a compile is for (`--cpu`), and what this machine is.

onnxruntime picks its integer kernels from CPUID at run time, and on x86 their arithmetic depends on
the instruction set (see `backends/onnxruntime/capabilities.py`): without VNNI the u8 x s8 kernels add
pairs of products in int16 with saturation. A compiled model is usually run on other machines than
the one it was compiled on, so the default is `portable`: an emission whose integer results are the
same on every x86-64 CPU onnxruntime dispatches to (and on ARM64).

    portable  any CPU (default): no int16 pair may saturate, whatever the kernel
    avx2      x86 AVX2 without VNNI (e.g. AMD EPYC Rome/Milan, Intel before Ice Lake): as portable
    avx512    x86 AVX-512 without VNNI (Skylake-SP/X): as portable (VPMADDUBSW saturates there too)
    vnni      x86 with AVX-512 VNNI or AVX-VNNI (VPDPBUSD sums in int32): no constraint; such a
              model loses accuracy on CPUs without VNNI
    native    this machine's CPU, detected from /proc/cpuinfo
"""
from __future__ import annotations

import enum
import platform
from functools import lru_cache
from pathlib import Path


class Cpu(str, enum.Enum):
    PORTABLE = "portable"
    AVX2 = "avx2"
    AVX512 = "avx512"
    VNNI = "vnni"
    NATIVE = "native"
    ARM64 = "arm64"  # what `native` resolves to on aarch64 (integer kernels sum in int32: sdot/udot, smlal)

    def resolve(self) -> Cpu:
        """`native` -> the host's class; every other value is itself."""
        return host_cpu() if self is Cpu.NATIVE else self


@lru_cache(maxsize=1)
def host_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def host_cpu() -> Cpu:
    """This machine's class: vnni (AVX-512 VNNI or AVX-VNNI), avx512, avx2, or arm64."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return Cpu.ARM64
    flags = host_flags()
    if {"avx512_vnni", "avx_vnni"} & flags:
        return Cpu.VNNI
    if "avx512f" in flags:
        return Cpu.AVX512
    return Cpu.AVX2


def host_description() -> dict:
    """What the report says about the machine validation ran on."""
    flags = host_flags()
    shown = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "f16c", "fma",
                                             "amx_int8", "asimd", "asimddp", "i8mm"))
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"class": host_cpu().value, "model": model, "flags": shown, "machine": platform.machine()}
