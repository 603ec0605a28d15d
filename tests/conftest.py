"""Shared fixtures: one local Ray for the session, the tiny models, and one real distillation run.

Everything here is real: Ray on loopback, vLLM's CPU engine, DeepSpeed on gloo, pyarrow. Starting
vLLM engines is the slow part, so the end-to-end run happens once and many tests read its outputs.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

from avocado_ray.cluster import start_local
from avocado_ray.config import config_path, load_config
from avocado_ray.models.tiny import UNTRAINED_ENV, build_all, cache_root

# The demo config names trained teachers (tiny:NAME-trained, about a minute of training each on a fresh machine);
# the suite checks the machinery, not what teachers know, so it serves them untrained (tests/test_models.py
# trains one briefly). Set AVOCADO_RAY_UNTRAINED_TEACHERS= (empty) to run it with the trained ones.
os.environ.setdefault(UNTRAINED_ENV, "1")

# As in an activated venv: the venv's tools come first on PATH, for this process and for every Ray process it
# starts, as they do for the jobs tests/test_jobs.py submits. DeepSpeed JIT-builds its CPU ops with the first
# `ninja` on PATH, and the venv's (1.13) and a system one (1.11) read each other's build log as foreign and
# rebuild both ops (minutes) each time the other one built them.
VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != VENV_BIN:
    os.environ["PATH"] = VENV_BIN + os.pathsep + os.environ.get("PATH", "")

# Credentials for the loopback S3 server of `s3_server` (moto accepts any), set before Ray starts so that the run's
# actors and trainer workers reach it as a cluster's processes reach a real store: from their own environment.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "avocado-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "avocado-test")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

# The fault suite draws its injection points from this seed; a failure replays with AVOCADO_FAULT_SEED=N.
FAULT_SEED = int(os.environ.get("AVOCADO_FAULT_SEED") or random.SystemRandom().randrange(1_000_000))


def pytest_report_header(config):
    return f"fault seed: {FAULT_SEED} (replay with AVOCADO_FAULT_SEED={FAULT_SEED})"


@pytest.fixture
def fault_seed() -> int:
    return FAULT_SEED


@pytest.fixture(scope="session")
def image_part():
    """Makes an OpenAI-style image part holding a small PNG of one colour as a base64 data URL."""
    import base64
    import io

    from PIL import Image

    def make(color: tuple[int, int, int] = (200, 10, 10)) -> dict:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        return {"type": "image_url", "image_url": {"url": url}}

    return make


@pytest.fixture
def tmpfs():
    """Mounts a small tmpfs on a folder, for a disk that fills (mounting needs root, as the tests have in CI);
    unmounted after the test."""
    mounted: list[Path] = []

    def mount(folder: Path, size: str) -> Path:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if done.returncode:
            pytest.skip(f"a full disk needs a tmpfs, and mount refused: {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny teachers and student, built once into the shared cache (the demo uses the same)."""
    return build_all(cache_root())


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray on loopback with enough logical CPUs for three teachers and two trainer workers.

    The driver and every Ray process see a fake hub token, as a cluster's would see a real one:
    test_security checks that it reaches none of the run's outputs.
    """
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_TOKEN", "hf_avocadoFakeSessionToken0123456789")
        start_local(num_cpus=8, log_to_driver=False)
        yield
        ray.shutdown()


@pytest.fixture(scope="session")
def local_config(tmp_path_factory):
    """The embedded default config with its run directory in a temporary folder."""
    run_dir = tmp_path_factory.mktemp("run")
    return load_config(config_path("builtin:local"), [f"run_dir={run_dir}"])


@pytest.fixture(scope="session")
def demo_run(tiny_models, ray_cluster, local_config):
    """One real distillation of the tiny student from the three tiny teachers on the demo prompts."""
    from avocado_ray.pipeline import run_distill

    return run_distill(local_config)


@pytest.fixture(scope="session")
def teacher_pools(tiny_models, ray_cluster, local_config):
    """Real qwen and gemma replicas (vLLM CPU engines in Ray actors) for tests that call teachers directly."""
    from avocado_ray.teachers.pool import TeacherPool

    pools = {
        name: TeacherPool(local_config.teacher(name), str(tiny_models[name]), use_gpu=False, max_in_flight=4)
        for name in ("qwen", "gemma")
    }
    for pool in pools.values():
        pool.ready()
    yield pools
    for pool in pools.values():
        pool.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-protocol server (moto in server mode, its own process) bound to 127.0.0.1 only, with an empty
    bucket `avocado`; yields its endpoint URL (config `storage.s3_endpoint`)."""
    import pyarrow.fs as pafs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None, "the S3 server exited at start"
            time.sleep(0.1)
    s3 = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1", allow_bucket_creation=True
    )
    s3.create_dir("avocado")
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(30)
    log.close()


@pytest.fixture
def one_teacher_config(tmp_path):
    """The demo config with qwen alone answering everything, in small shards and checkpoints every step, so that a
    run has many durable points to be killed between; `(run_dir, **top-level keys)` writes it and returns its path."""

    def write(run_dir, **keys) -> Path:
        config = yaml.safe_load(config_path("builtin:local").read_text())
        config["teachers"] = [t for t in config["teachers"] if t["name"] == "qwen"]
        config["routing"] = {
            "table": {d: "qwen" for d in ("code", "chinese", "multimodal", "math", "general")},
            "fallback": "qwen",
        }
        config["run_dir"] = str(run_dir)
        config["trainer"].update(batch_size=4, checkpoint_every=1)
        config["dispatch"].update(batch_size=4, max_in_flight_per_replica=1, rows_per_shard=8)
        config.update(keys)
        path = tmp_path / "one-teacher.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write
