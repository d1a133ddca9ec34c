"""The learner's process settings: freed memory is kept for reuse instead of being faulted in afresh."""

from __future__ import annotations

import os
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


# --- threads and OpenMP's wait policy (issue 24) -------------------------------------------------------------------

# This machine's own files (2 vCPUs, cgroup v1 with no CPU quota beside an empty cgroup v2 hierarchy).
MACHINE_CGROUP = """9:name=systemd:/
8:pids:/
4:memory:/process_api/cded9845786ace68a17224ba017f9914
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""
MACHINE_MOUNTINFO = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
# A container limited with `--cpus 1.5` (cgroup v2, the namespace's root is its own cgroup) and a v1 host
# where the process sits two levels down, the limit on the upper level.
V2_MOUNTINFO = "1021 1000 0:27 / {root} ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw\n"
V1_MOUNTINFO = "25 21 0:22 / {root} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n"


def _disk(files: dict[Path, str]):
    return lambda path: files.get(path)


def test_cpu_quota_files_parse_as_cpus() -> None:
    from learner.compute import parse_cfs, parse_cpu_max

    assert parse_cfs("-1\n", "100000\n") is None  # this machine: no quota
    assert parse_cfs("150000\n", "100000\n") == 1.5
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("200000 100000\n") == 2.0
    assert parse_cpu_max("50000 100000") == 0.5


def test_this_machines_cgroups_have_no_cpu_quota() -> None:
    from learner.compute import cgroup_cpu_quota

    real = {Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"): "-1\n",
            Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"): "100000\n"}
    assert cgroup_cpu_quota(MACHINE_CGROUP, MACHINE_MOUNTINFO, _disk(real)) is None


def test_a_containers_cgroup_v2_quota_caps_the_cpus(tmp_path: Path) -> None:
    from learner.compute import cgroup_cpu_quota

    mountinfo = V2_MOUNTINFO.format(root=tmp_path)
    assert cgroup_cpu_quota("0::/\n", mountinfo, _disk({tmp_path / "cpu.max": "150000 100000\n"})) == 1.5
    assert cgroup_cpu_quota("0::/\n", mountinfo, _disk({tmp_path / "cpu.max": "max 100000\n"})) is None


def test_a_quota_up_the_cgroup_v1_tree_caps_the_process_below_it(tmp_path: Path) -> None:
    from learner.compute import cgroup_cpu_quota

    mountinfo = V1_MOUNTINFO.format(root=tmp_path)
    files = {tmp_path / "jobs/cpu.cfs_quota_us": "300000\n", tmp_path / "jobs/cpu.cfs_period_us": "100000\n",
             tmp_path / "jobs/7/cpu.cfs_quota_us": "-1\n", tmp_path / "jobs/7/cpu.cfs_period_us": "100000\n",
             tmp_path / "cpu.cfs_quota_us": "-1\n", tmp_path / "cpu.cfs_period_us": "100000\n"}
    assert cgroup_cpu_quota("3:cpu,cpuacct:/jobs/7\n1:name=systemd:/x\n", mountinfo, _disk(files)) == 3.0
    files[tmp_path / "jobs/7/cpu.cfs_quota_us"] = "100000\n"  # the tighter one wins
    assert cgroup_cpu_quota("3:cpu,cpuacct:/jobs/7\n", mountinfo, _disk(files)) == 1.0


def test_usable_cpus_is_the_affinity_mask_under_the_quota() -> None:
    from learner.compute import cgroup_cpu_quota, usable_cpus

    quota = cgroup_cpu_quota(Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text())
    cpus = len(os.sched_getaffinity(0))
    assert usable_cpus() == max(1, min(cpus, -(-quota // 1)) if quota else cpus)


def test_the_default_threads_setting_runs_one_thread_per_usable_cpu() -> None:
    from core.config.agent import DreamerConfig
    from learner.compute import choose_threads, usable_cpus

    assert DreamerConfig().threads == 0
    assert choose_threads(DreamerConfig()) == usable_cpus()
    assert choose_threads(DreamerConfig.model_validate({"threads": 3})) == 3


# A fresh interpreter pinned to one CPU, as a learner started with `taskset -c 0`: the default config's
# threads follow the mask once configure_compute runs.
PINNED = textwrap.dedent("""
    import os
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import torch
    from core.config.agent import DreamerConfig
    from learner.compute import configure_compute
    torch.set_num_threads(4)  # whatever ran before
    applied = configure_compute(DreamerConfig())
    print(torch.get_num_threads(), applied["threads"])
""")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity")
def test_configure_compute_sets_threads_to_the_cpus_the_process_may_use() -> None:
    out = subprocess.run([sys.executable, "-c", PINNED], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["1", "1"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    return {**env, "OMP_DISPLAY_ENV": "VERBOSE", **extra}  # libgomp prints what it read when torch loads


# The learner's command line, then torch: the wait policy must reach the OpenMP runtime. The command stops
# on its arguments (serve without --config) before importing torch; every command passes main() first.
CLI_THEN_TORCH = textwrap.dedent("""
    import os, sys
    from learner import cli
    try:
        cli.main(["serve", "--logdir", sys.argv[1]])
    except SystemExit as exc:
        assert exc.code == 2
    assert "torch" not in sys.modules
    print("env", os.environ.get("OMP_WAIT_POLICY"), flush=True)
    import torch
    torch.ones(4) + 1
""")


def _display(out: subprocess.CompletedProcess) -> dict[str, str]:
    pairs = (line.strip().split(" = ", 1) for line in out.stderr.splitlines() if " = '" in line)
    return {key: value.strip("'") for key, value in pairs}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP (torch's Linux CPU build)")
def test_the_learner_cli_makes_idle_openmp_threads_sleep_instead_of_spinning(tmp_path: Path) -> None:
    import torch

    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch is not built with OpenMP here")
    out = subprocess.run([sys.executable, "-c", CLI_THEN_TORCH, str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, env=_clean_env(), check=True)
    assert "env PASSIVE" in out.stdout
    shown = _display(out)
    # Unset, libgomp displays PASSIVE as well but spins 300000 times before sleeping: the spin count tells.
    assert shown.get("OMP_WAIT_POLICY") == "PASSIVE" and shown.get("GOMP_SPINCOUNT") == "0", out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP (torch's Linux CPU build)")
def test_a_wait_policy_the_user_set_is_left_alone(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", CLI_THEN_TORCH, str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, env=_clean_env(OMP_WAIT_POLICY="ACTIVE"), check=True)
    assert "env ACTIVE" in out.stdout
    assert _display(out).get("OMP_WAIT_POLICY") == "ACTIVE", out.stderr


def test_prepare_openmp_sets_nothing_once_the_runtime_is_loaded() -> None:
    import torch  # noqa: F401  (loads libgomp into this process)

    from learner.compute import openmp_env, openmp_loaded, prepare_openmp

    assert openmp_loaded()
    before = dict(os.environ)
    assert prepare_openmp() == {}
    assert dict(os.environ) == before
    # The same decision on a given environment: added unless the user chose a wait policy or spin count.
    env: dict[str, str] = {}
    assert prepare_openmp(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_env({"GOMP_SPINCOUNT": "1000"}) == {}
    assert not openmp_loaded("7f00-7f01 r-xp 00000000 00:00 0  /usr/lib/libc.so.6\n")
