"""The deployment CPU option (`qcompile.cpu`, `--cpu`): host detection and what each class emits."""
from __future__ import annotations

import pytest

import qcompile
import tiny_models
from qcompile.cpu import Cpu, host_cpu, host_description, host_flags


def test_host_class_follows_the_cpu_flags():
    flags = host_flags()
    want = "vnni" if {"avx512_vnni", "avx_vnni"} & flags else "avx512" if "avx512f" in flags else "avx2"
    if host_description()["machine"] in ("aarch64", "arm64"):
        want = "arm64"
    assert host_cpu().value == want
    assert Cpu.NATIVE.resolve() is host_cpu() and Cpu.PORTABLE.resolve() is Cpu.PORTABLE


@pytest.mark.parametrize("cpu, bounded", [("portable", True), ("avx2", True), ("avx512", True), ("vnni", False),
                                          ("native", host_cpu() not in (Cpu.VNNI, Cpu.ARM64))])
def test_cpu_sets_the_int8_pair_bounds(cpu, bounded):
    proto = tiny_models.mlp()
    data = tiny_models.inputs_for(proto, 48, seed=1)
    r = qcompile.compile(proto, "int8", calib=data, cpu=cpu)
    assert r.report["cpu"] == Cpu(cpu).resolve().value
    pairs = [q.spec.pairs for n in r.plan.nodes.values() for q in n.inputs.values() if q.role == "weight"]
    assert all(p is not None for p in pairs) if bounded else all(p is None for p in pairs)


def test_unknown_cpu_is_an_input_error():
    with pytest.raises(qcompile.InputError, match="unknown cpu 'sse2'"):
        qcompile.compile(tiny_models.mlp(), "int8", cpu="sse2")
