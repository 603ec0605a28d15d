"""A replica's vLLM engine processes end with the replica, however it ends.

vLLM starts an `AsyncLLM`'s engine in processes of its own (multiprocessing `spawn`, as it must inside a Ray
actor): `VLLM::EngineCore`, and with tensor parallelism on one node (or `engine.cpu_worker_process` on CPU) its
`VLLM::Worker` processes.
vLLM ends them from `AsyncLLM.shutdown` or a finalizer at interpreter exit, and a Worker watches its EngineCore
through a death pipe; nothing watches the actor. So when the actor's process is SIGKILLed, `ray.kill`ed or ends
with `ray stop --force` or its node's raylet, the EngineCore is re-parented to PID 1 and keeps its memory (and
on a GPU node its GPU memory), with its Workers under it.

Here each engine process asks the kernel for SIGKILL when its parent dies (`PR_SET_PDEATHSIG`): the EngineCore
when the actor dies, a Worker when its EngineCore dies. The request is made in the engine process itself, by
`die_with_parent`, which vLLM calls in each of its processes as a general plugin (the `vllm.general_plugins`
entry point of this package). The module imports nothing heavy: every vLLM process loads it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time

import psutil

GUARD_ENV = "AVOCADO_RAY_ENGINE_GUARD"  # set by a replica before its engine starts; its engine processes inherit it
PLUGIN = "avocado_ray_engine_guard"  # the entry point's name, for VLLM_PLUGINS
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ENGINE_TITLES = ("VLLM::EngineCore", "VLLM::Worker")  # vLLM's process titles (setproctitle)


def die_with_parent() -> None:
    """In a replica's engine process: be SIGKILLed by the kernel when the parent process dies.

    The signal follows the parent *thread* that started this process: vLLM starts the EngineCore from the
    thread that builds the `AsyncLLM` (the actor's main thread, which lives as long as the actor) and a Worker
    from the EngineCore's main thread. A parent that died before the request is caught by comparing
    `getppid()` with the parent multiprocessing recorded."""
    parent = multiprocessing.parent_process()
    if os.environ.get(GUARD_ENV) != "1" or parent is None or not sys.platform.startswith("linux"):
        return  # not a replica's engine process: the actor itself, vLLM's Ray workers, or vLLM used elsewhere
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent.pid:  # re-parented already: the parent died before the request
        os.kill(os.getpid(), signal.SIGKILL)


def guard_missing() -> str | None:
    """Why vLLM would not load `die_with_parent` in the engine's processes, or None when it will."""
    from importlib.metadata import entry_points

    if not any(e.name == PLUGIN for e in entry_points(group="vllm.general_plugins")):
        return (
            f"the vllm.general_plugins entry point {PLUGIN} is not installed "
            "(install the avocado-ray package on every node: pip install -e . in a checkout)"
        )
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN not in allowed.split(","):
        return f"VLLM_PLUGINS={allowed!r} leaves out {PLUGIN}"
    return None


def process_tree(pids: list[int]) -> list[psutil.Process]:
    """The processes `pids` and all their descendants that are alive now."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[int]:
    """Wait up to `timeout_s` for `processes` to end; returns the PIDs still running then. A zombie (ended, not yet
    reaped by its new parent) holds no memory and counts as gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    running.append(process.pid)
            except psutil.NoSuchProcess:
                continue
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.05)


def end_processes(processes: list[psutil.Process], timeout_s: float) -> list[int]:
    """SIGKILL those of `processes` still alive (by PID: these are known engine processes, not a sweep by name)
    and wait up to `timeout_s` for them to go; returns the PIDs still running then."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    return wait_gone(processes, timeout_s)


def _title(process: psutil.Process) -> str:
    return " ".join(process.cmdline()).strip()  # setproctitle pads the title


def unowned_engines() -> list[dict]:
    """vLLM engine processes on this node that no live Ray worker owns: the nearest ancestor that is not an engine
    process is not a Ray worker (`ray::...`), e.g. PID 1 after the worker died. vLLM run by hand outside Ray (its
    owner is that program) is listed too, with its owner, for the operator to judge."""
    engines = {}
    for process in psutil.process_iter():
        try:
            if process.cmdline() and _title(process).startswith(ENGINE_TITLES):
                engines[process.pid] = process
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    left = []
    for process in engines.values():
        try:
            owner = process.parent()
            while owner is not None and owner.pid in engines:
                owner = owner.parent()
            owner_title = _title(owner) if owner is not None else ""
            if owner_title.startswith("ray::"):
                continue
            left.append(
                {
                    "pid": process.pid,
                    "title": _title(process),
                    "ppid": process.ppid(),
                    "owner_pid": owner.pid if owner is not None else None,
                    "owner": owner_title[:200],
                    "rss_mib": round(process.memory_info().rss / 2**20),
                }
            )
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return sorted(left, key=lambda e: e["pid"])
