"""`reverie-learner serve --gpus N`: start N ranks on this machine as torchrun would, and watch them.

Each rank is a fresh `python -m learner.cli` with the same arguments (less --gpus) and torchrun's variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT); rank r uses GPU r. The launcher is
the job's watchdog: when a rank exits with an error or is killed, it says which and how, stops the others
(SIGTERM, then SIGKILL after STOP_GRACE_S) and exits 1, so one lost rank never leaves the rest hanging.
SIGINT/SIGTERM to the launcher stop rank 0, which checkpoints and stops the others in order.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

STOP_GRACE_S = 60.0  # a stopped rank 0 may still be writing its checkpoint
POLL_S = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def without_gpus(argv: list[str]) -> list[str]:
    """The command line a rank runs: `argv` less `--gpus N` / `--gpus=N`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch(argv: list[str], ranks: int) -> int:
    """Run `reverie-learner <argv>` as `ranks` local ranks; 0 when all end well, else 1 (with a message)."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
               "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "learner.cli", *argv], env=env))
    print(f"reverie-learner: started {ranks} ranks (pids {', '.join(str(p.pid) for p in procs)}; rank 0 "
          f"serves the robots)", file=sys.stderr, flush=True)
    previous = {sig: signal.signal(sig, lambda *_: _signal(procs[0], signal.SIGTERM))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _watch(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(procs)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)


def _watch(procs: list[subprocess.Popen]) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            rank, code = failed[0]
            print(f"reverie-learner: rank {rank} (pid {procs[rank].pid}) {how(code)}; stopping the other "
                  f"ranks", file=sys.stderr, flush=True)
            return 1
        if all(code == 0 for code in codes):
            return 0
        if codes[0] == 0 and _wait_all(procs, STOP_GRACE_S) is None:  # rank 0 done: the others follow its STOP
            print("reverie-learner: rank 0 finished but other ranks did not stop; stopping them", file=sys.stderr)
            return 1
        time.sleep(POLL_S)


def _wait_all(procs: list[subprocess.Popen], seconds: float) -> list[int] | None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes  # type: ignore[return-value]
        time.sleep(POLL_S)
    return None


def _stop(procs: list[subprocess.Popen]) -> None:
    """Every rank still running: SIGTERM (rank 0 then checkpoints), SIGKILL after STOP_GRACE_S."""
    for p in procs:
        _signal(p, signal.SIGTERM)
    if _wait_all(procs, STOP_GRACE_S) is None:
        for p in procs:
            _signal(p, signal.SIGKILL)
        for p in procs:
            p.wait()
