"""Process-wide compute settings of a learner: torch threads, how idle OpenMP threads wait, and how
freed memory is kept.

Why threads and waiting: torch's CPU build runs its parallel ops on GNU OpenMP (libgomp), whose
idle threads spin for ~300,000 iterations (milliseconds) before they sleep. With one thread per
core and any other busy process on the machine, a thread is often descheduled, and at every
parallel op its peers spin through their own time slices waiting for it: an update took 5-50x
longer and burnt several times the CPU. A passive wait policy (`OMP_WAIT_POLICY=PASSIVE`: sleep
at once) removes that; it has to be in the environment before the OpenMP runtime loads (when
torch is imported), so the learner's command line sets it first thing (`prepare_openmp`). The
thread count is the CPUs this process may use: its affinity mask and its cgroup's CPU quota (a
container limited to 2 CPUs on a 16-core host would otherwise run 16 threads). bench/shared_cpu.py
measures each policy beside a competing process; bench/README.md has the figures.

Why keep freed memory: glibc hands large freed blocks straight back to the kernel (everything over
its mmap threshold, which tops out at 32 MB, and the heap top beyond the trim threshold) and maps
them afresh on the next allocation, zero-filled page by page on first touch. A Dreamer update
frees and reallocates the same activations every time, so on CPU much of it went to page faults
(2 cores, 64x64 pixels, 2024 recipe: size1m 5.3 -> 2.8 s and size12m 32 -> 14 s per update).
With `dreamer.keep_heap` every allocation comes from the heap and nothing is trimmed: the second
update on reuses the first one's pages. The price: the process's resident memory stays at its peak.

torch is imported only inside the functions that need it: `prepare_openmp` must run before it loads.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Callable, MutableMapping
from pathlib import Path

from core.config.agent import DreamerConfig

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TOP_PAD = 256 << 20  # grow the heap in 256 MB steps: fewer brk calls while the first update runs

# Idle OpenMP threads sleep at once instead of spinning (standard OpenMP: libgomp, LLVM's libomp and
# Intel's runtime all read it). A variable the user set (either name) is left as it is.
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
USER_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
OPENMP_LIBS = ("libgomp", "libiomp", "libomp")  # names of the runtimes in /proc/self/maps

_kept = False


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (no mmap'd blocks, no trimming), once per process.

    Returns whether it is in effect: False off Linux or on a C library without `mallopt` (musl).
    """
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # A trim threshold of -1 is SIZE_MAX inside glibc: the heap top is never handed back.
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, TOP_PAD))
    _kept = all(mallopt(param, value) == 1 for param, value in settings)
    return _kept


# --- OpenMP's wait policy: environment, before the runtime loads


def openmp_loaded(maps: str | None = None) -> bool:
    """Whether an OpenMP runtime is already in this process (it read its environment when it loaded).

    `maps` is /proc/self/maps' text (read here when None); off Linux, whether torch is imported.
    """
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "torch" in sys.modules
    return any(lib in maps for lib in OPENMP_LIBS)


def openmp_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The variables `prepare_openmp` would add: none when the user chose a wait policy or spin count."""
    environ = os.environ if environ is None else environ
    if any(name in environ for name in USER_WAIT_VARS):
        return {}
    return dict(OPENMP_ENV)


def prepare_openmp(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put the passive wait policy into the environment before torch (and OpenMP) loads.

    Returns what it set. Child processes inherit it. Call it before anything imports torch: once the
    runtime is loaded the variable changes nothing (then nothing is set and {} is returned).
    """
    environ = os.environ if environ is None else environ
    if environ is os.environ and openmp_loaded():
        return {}
    added = openmp_env(environ)
    environ.update(added)
    return added


# --- the CPUs this process may use: affinity and cgroup quota


def parse_cpu_max(text: str) -> float | None:
    """A cgroup v2 `cpu.max` ("150000 100000", or "max 100000" for none) as CPUs; None when unlimited."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    period = int(fields[1]) if len(fields) > 1 else 100_000
    return int(fields[0]) / period if period > 0 else None


def parse_cfs(quota: str, period: str) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us` as CPUs; None when unlimited (quota -1)."""
    q, p = int(quota.strip()), int(period.strip())
    return q / p if q > 0 and p > 0 else None


def _cpu_mounts(mountinfo: str) -> list[tuple[str, Path, int]]:
    """(cgroup root inside the mount, mount point, cgroup version) of each mount with the cpu controller."""
    mounts = []
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup2":
            mounts.append((fields[3], Path(fields[4]), 2))
        elif tail[0] == "cgroup" and "cpu" in tail[2].split(","):
            mounts.append((fields[3], Path(fields[4]), 1))
    return mounts


def _own_cgroup(proc_cgroup: str, version: int) -> str | None:
    """This process's cgroup path from /proc/self/cgroup: the v2 line ("0::/path") or the v1 cpu line."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if version == 2 and parts[0] == "0" and parts[1] == "":
            return parts[2]
        if version == 1 and "cpu" in parts[1].split(","):
            return parts[2]
    return None


def cgroup_cpu_quota(proc_cgroup: str, mountinfo: str,
                     read: Callable[[Path], str | None] | None = None) -> float | None:
    """The tightest CPU quota, in CPUs, on this process's cgroup and its ancestors; None when there is none.

    `proc_cgroup` and `mountinfo` are /proc/self/cgroup's and /proc/self/mountinfo's text; `read` returns
    a control file's text (None when missing). A quota anywhere up the tree caps the whole subtree.
    """
    read = read or _read_text
    quotas: list[float] = []
    for root, mount_point, version in _cpu_mounts(mountinfo):
        path = _own_cgroup(proc_cgroup, version)
        if path is None:
            continue
        # Inside a cgroup namespace the mount's root and the process's path are both "/"; outside,
        # the mount's root is a prefix of the path. A path elsewhere: the mount point itself.
        rel = os.path.relpath(path, root) if path == root or path.startswith(root.rstrip("/") + "/") else "."
        directory = mount_point / rel if rel != "." else mount_point
        while True:
            if version == 2:
                text = read(directory / "cpu.max")
                quota = parse_cpu_max(text) if text else None
            else:
                q, p = read(directory / "cpu.cfs_quota_us"), read(directory / "cpu.cfs_period_us")
                quota = parse_cfs(q, p) if q and p else None
            if quota is not None:
                quotas.append(quota)
            if directory == mount_point or mount_point not in directory.parents:
                break
            directory = directory.parent
    return min(quotas) if quotas else None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """How many CPUs this process may keep busy: its affinity mask, capped by its cgroup's CPU quota
    (rounded up: a 1.5-CPU quota still runs two threads part of the time)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cpus = os.cpu_count() or 1
    if sys.platform.startswith("linux"):
        quota = cgroup_cpu_quota(_read_text(Path("/proc/self/cgroup")) or "",
                                 _read_text(Path("/proc/self/mountinfo")) or "")
        if quota is not None:
            cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def choose_threads(cfg: DreamerConfig) -> int:
    """torch's intra-op threads for `dreamer.threads`: the setting, or with 0 the CPUs this process may use."""
    return cfg.threads or usable_cpus()


def configure_compute(cfg: DreamerConfig) -> dict[str, object]:
    """Apply `dreamer.threads` and `dreamer.keep_heap` to this process (a learner's, not a robot's).

    Returns what is in effect (threads, the OpenMP wait policy as the environment has it, keep_heap),
    for the run to record. The wait policy itself comes from `prepare_openmp`, before torch loaded.
    """
    import torch

    threads = choose_threads(cfg)
    torch.set_num_threads(threads)
    kept = keep_freed_memory() if cfg.keep_heap else False
    return {"threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "runtime default"),
            "keep_heap": kept}
