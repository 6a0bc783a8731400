"""vqtool.memory: freed tensors stay in the heap, so the next step's tensors of the same sizes take no page faults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from vqtool import memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Steps that allocate and free the same 64 MiB of tensors, as training steps do; prints the minor page
# faults per step once the heap has settled. torch asks for 64-byte aligned blocks, which a freed block of
# exactly the size does not fit until it has merged with its neighbours: the first few steps grow the heap.
PROBE = """
import resource, sys
from vqtool.memory import keep_freed_memory
took = keep_freed_memory()
import torch
def step():
    a = torch.ones(4096, 1024)       # 16 MiB
    b = torch.empty(3, 4096, 1024)   # 48 MiB
    b.fill_(2.0)
    return float(a[0, 0] + b[0, 0, 0])
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(took, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""

PAGES_PER_STEP = 64 * 2**20 // 4096  # 16,384 pages of 4 KiB, when every block comes fresh from the OS


def faults_per_step(keep: str) -> tuple[bool, int]:
    env = {**os.environ, memory.SWITCH: keep}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env,
                         timeout=120)
    took, faults = out.stdout.split()
    return took == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="malloc's mapping and trimming settings are glibc's")
def test_freed_memory_is_reused_without_page_faults():
    took, kept = faults_per_step("1")
    assert took
    assert kept < PAGES_PER_STEP // 20, kept
    # The switch leaves glibc's defaults, under which these blocks are mapped afresh and fault every step.
    took, default = faults_per_step("0")
    assert not took
    assert default > PAGES_PER_STEP // 2, default


def test_does_nothing_where_the_c_library_is_not_glibc(monkeypatch):
    memory._mallopt.cache_clear()
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    try:
        assert memory._mallopt() is None
        assert memory.keep_freed_memory() is False
    finally:
        memory._mallopt.cache_clear()


def test_the_command_keeps_freed_memory_before_any_stage(monkeypatch):
    from vqtool import cli

    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append("kept") or True)
    monkeypatch.setattr(sys, "argv", ["vqtool", "--help"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 0
    assert calls == ["kept"]
