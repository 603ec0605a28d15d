"""Running a candidate's code against a prompt's tests, in a sandboxed subprocess.

The child gets new user, mount and network namespaces: no network at all (no interface but a downed
loopback), no privileges (it is an ordinary user in its namespace, so even when the caller is root it
holds no capabilities once it runs the code), and a read-only view of the whole file system, in which the
one writable place is its working directory, a small tmpfs of its own. On top: CPU-time, address-space,
file-size and process limits, stdout and stderr in size-capped files (not pipes the caller would read
without bound), an isolated interpreter (`-I`) with an environment of PATH only, and a wall-clock timeout.
Where the kernel refuses any of the namespaces or the read-only remount, the sandbox refuses to run the
code (it fails closed).

This file is also the launcher: run as a script, it isolates itself and then execs the candidate. So the
isolation happens in a fresh single-threaded process, not in a `preexec_fn` of a threaded Ray actor, and
the script needs nothing but the standard library.

Limits (docs/security.md): memory is bounded per process (RLIMIT_AS), not per process tree; RLIMIT_NPROC is
not enforced for a caller that is root; the code can read whatever the caller can read (it cannot write it
anywhere or send it anywhere).
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
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
SYS_MOUNT_SETATTR = 442  # on x86-64 and arm64 alike (Linux 5.12+)
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY = 0x1
SANDBOX_ID = 1000  # the child's user and group inside its namespace: not 0, so it has no capabilities once it runs
UNAVAILABLE = 120  # the launcher's exit status when it could not isolate itself


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


@dataclass
class SandboxResult:
    passed: bool
    reason: str


def _map_ids(uid: int, gid: int) -> bool:
    """Map the caller's user and group (one each, as an unprivileged process may) to SANDBOX_ID inside."""
    try:
        for name, text in (
            ("uid_map", f"{SANDBOX_ID} {uid} 1"),
            ("setgroups", "deny"),
            ("gid_map", f"{SANDBOX_ID} {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        return False
    return True


def _isolate(scratch: str, scratch_bytes: int, cpu_s: int, memory_mb: int, output_bytes: int) -> bool:
    """Namespaces, a read-only file system with a tmpfs at `scratch` to work in, and the limits; False when the
    kernel refuses any of it."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY)
    uid, gid = os.geteuid(), os.getegid()
    isolated = (
        libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET) == 0
        and _map_ids(uid, gid)
        and libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0  # nothing propagates back out
        and libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)) == 0
        and libc.mount(b"tmpfs", scratch.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, f"size={scratch_bytes}".encode())
        == 0
    )
    if isolated:
        os.chdir(scratch)  # the tmpfs now covers the folder the launcher started in
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return isolated


def run_python_tests(
    code: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512, output_bytes: int = 1 << 16
) -> SandboxResult:
    """Run `code` then `tests` (Python asserts) in the sandbox; passed means exit status 0 in time.

    `output_bytes` caps each of stdout, stderr and any file the code writes; its tmpfs holds 16 times that.
    """
    cpu_s = max(1, int(timeout_s))
    with tempfile.TemporaryDirectory(prefix="avocado-sandbox-") as workdir:
        folder = Path(workdir)
        program, scratch = folder / "candidate.py", folder / "scratch"
        program.write_text(code + "\n\n" + tests + "\n")
        scratch.mkdir()
        limits = [str(n) for n in (16 * output_bytes, cpu_s, memory_mb, output_bytes)]
        with open(folder / "stdout", "wb") as stdout, open(folder / "stderr", "wb+") as stderr:
            try:
                done = subprocess.run(
                    [sys.executable, "-I", __file__, str(scratch), *limits, str(program)],
                    cwd=scratch,
                    env={"PATH": "/usr/bin:/bin"},  # none of the caller's variables, so none of its secrets
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    timeout=timeout_s,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                return SandboxResult(False, f"killed at the time limit of {timeout_s} s")
            stderr.seek(0)
            errors = stderr.read().decode(errors="replace")
    if done.returncode == UNAVAILABLE:
        return SandboxResult(False, "sandbox unavailable: the kernel refused a namespace or a read-only mount")
    if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return SandboxResult(False, f"killed at the CPU time limit of {cpu_s} s")
    if done.returncode != 0:
        last_line = (errors.strip().splitlines() or ["no output"])[-1]
        return SandboxResult(False, f"exit {done.returncode}: {last_line[:200]}")
    return SandboxResult(True, "tests passed")


if __name__ == "__main__":  # the launcher: isolate this process, then become the candidate's interpreter
    scratch_dir, scratch_size, cpu, memory, output, candidate = sys.argv[1:]
    if not _isolate(scratch_dir, int(scratch_size), int(cpu), int(memory), int(output)):
        os._exit(UNAVAILABLE)  # no isolation, no run
    os.execv(sys.executable, [sys.executable, "-I", candidate])
