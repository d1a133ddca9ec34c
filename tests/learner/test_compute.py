"""The learner's process settings: freed memory is kept for reuse instead of being faulted in afresh."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Allocate, write and free a 64 MB tensor over and over (as each Dreamer update does with its
# activations) and count the page faults of the repeats.
FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    from learner.compute import keep_freed_memory

    if sys.argv[1] == "keep":
        assert keep_freed_memory() and keep_freed_memory()  # idempotent
    def cycle():
        x = torch.ones(16 << 20)
        del x
    for _ in range(10):  # glibc settles where it places the block after a few rounds
        cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, cwd=ROOT, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_kept_heap_reuses_freed_memory_without_page_faults():
    kept, system = _faults("keep"), _faults("system")
    # 5 x 64 MB in 4 KiB pages is 81920 faults when each block is mapped afresh; reused pages fault once.
    assert kept < 1000, f"{kept} page faults re-allocating freed memory with keep_heap"
    assert system > 10 * max(kept, 100), f"system malloc faulted only {system} times: the test shows nothing"


def test_keep_heap_is_on_by_default_and_can_be_turned_off():
    from core.config.agent import DreamerConfig

    assert DreamerConfig().keep_heap
    assert not DreamerConfig.model_validate({"keep_heap": False}).keep_heap
