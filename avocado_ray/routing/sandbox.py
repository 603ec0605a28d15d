"""Running a candidate's code against a prompt's tests, in a sandboxed subprocess.

The child gets: a fresh network namespace (no interface but a downed loopback: no network at all),
CPU-time, address-space, file-size and process limits, an empty temporary working directory, an
isolated interpreter (`-I`: no user site, no environment paths) and a wall-clock timeout. Where the
kernel refuses a new network namespace the sandbox refuses to run the code (it fails closed).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


@dataclass
class SandboxResult:
    passed: bool
    reason: str


def _isolate(cpu_s: int, memory_mb: int, output_bytes: int) -> None:
    """Runs in the child before exec: drop the network, then cap CPU, memory, files and processes."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(flags) != 0:
        os._exit(120)  # no network namespace, no run
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python_tests(
    code: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512, output_bytes: int = 1 << 16
) -> SandboxResult:
    """Run `code` then `tests` (Python asserts) in the sandbox; passed means exit status 0 in time."""
    with tempfile.TemporaryDirectory(prefix="avocado-sandbox-") as workdir:
        program = os.path.join(workdir, "candidate.py")
        with open(program, "w") as f:
            f.write(code + "\n\n" + tests + "\n")
        try:
            done = subprocess.run(
                [sys.executable, "-I", program],
                cwd=workdir,
                env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout_s,
                preexec_fn=lambda: _isolate(max(1, int(timeout_s)), memory_mb, output_bytes),
            )
        except subprocess.TimeoutExpired:
            return SandboxResult(False, f"killed at the time limit of {timeout_s} s")
    if done.returncode == 120:
        return SandboxResult(False, "sandbox unavailable: the kernel refused a network namespace")
    if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return SandboxResult(False, f"killed at the CPU time limit of {max(1, int(timeout_s))} s")
    if done.returncode != 0:
        last_line = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        return SandboxResult(False, f"exit {done.returncode}: {last_line[:200]}")
    return SandboxResult(True, "tests passed")
