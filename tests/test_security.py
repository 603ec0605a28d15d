"""Security: config values are data, names never become paths, secrets stay in the environment, and the
code-test sandbox can neither write outside its own tmpfs nor flood its caller with output."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avocado_ray.config import ConfigError, config_path, load_config
from avocado_ray.routing.sandbox import run_python_tests

PACKAGE = Path(__file__).resolve().parents[1] / "avocado_ray"
LOCAL = config_path("builtin:local")


def test_no_module_of_the_package_evaluates_or_imports_strings():
    """The one way from a config string to code is the classifier entry-point lookup (config checks the name,
    routing/classifier.py loads it); teachers/engines.py only asks whether its own vLLM plugin is installed."""
    builtins = {"eval", "exec", "compile", "__import__"}  # called by bare name; `model.eval()` is torch's
    importers = {"import_module", "entry_points", "unsafe_load", "full_load"}
    unpicklers = {"pickle", "yaml", "marshal", "cloudpickle"}
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                bare = getattr(node.func, "id", None)
                name = bare or getattr(node.func, "attr", None)
                owner = getattr(getattr(node.func, "value", None), "id", None)
                shell = any(k.arg == "shell" and getattr(k.value, "value", False) for k in node.keywords)
                if (
                    bare in builtins
                    or name in importers
                    or shell
                    or (name in ("load", "loads") and owner in unpicklers)
                ):
                    found.add((str(path.relative_to(PACKAGE)), name))
    assert found == {
        ("config/routing.py", "entry_points"),
        ("routing/classifier.py", "entry_points"),
        ("teachers/engines.py", "entry_points"),
    }


@pytest.mark.parametrize(
    "override, refused",
    [
        ("teachers.0.engine.extra_args.trust_remote_code=true", "trust_remote_code"),
        ("teachers.0.engine.extra_args.worker_extension_cls=os.system", "worker_extension_cls"),
        ("teachers.0.engine.extra_args.logits_processors=[os.system]", "logits_processors"),
        ("teachers.0.engine.extra_args.compilation_config={backend: os.system}", "compilation_config"),
        ("teachers.0.engine.extra_args.hf_token=hf_secret", "hf_token"),
        ("teachers.0.engine.extra_args.seed=1", "seed"),  # set from the config's own seed: no second way
        (
            "trainer.deepspeed={torch_autocast: {enabled: true, lower_precision_safe_modules: [os.system]}}",
            "lower_precision_safe_modules",
        ),
        ("routing.classifier=os:system", "no classifier 'os:system'"),
    ],
)
def test_config_strings_that_would_name_code_or_secrets_are_refused(override, refused):
    with pytest.raises(ConfigError, match=refused):
        load_config(LOCAL, [override])


def test_data_only_engine_arguments_pass():
    config = load_config(LOCAL, ["teachers.0.engine.extra_args={enable_prefix_caching: true, block_size: 16}"])
    assert config.teachers[0].engine.extra_args == {"enable_prefix_caching": True, "block_size": 16}


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", "Qwen", ".hidden"])
def test_a_teacher_name_cannot_be_a_path(name):
    with pytest.raises(ConfigError, match="teachers.0.name: String should match pattern"):
        load_config(LOCAL, [f"teachers.0.name={name}"])


def test_a_prompt_id_that_looks_like_a_path_is_only_data(tmp_path):
    """Ids go into Parquet and JSONL records, never into file names: the dry run writes its two files only."""
    source = tmp_path / "in.jsonl"
    rows = [{"id": "../../../tmp/escape", "prompt": "hello"}, {"id": "/etc/passwd", "prompt": "hi", "teacher": "x"}]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out" / "routed.jsonl"
    out.parent.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "avocado_ray", "route", "--input", str(source), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path / "out",
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["routed.jsonl", "routed.rejected.jsonl"]
    assert json.loads(out.read_text())["id"] == "../../../tmp/escape"


def test_a_hub_token_in_the_environment_reaches_no_log_output_or_report(tmp_path):
    """The command line never prints or writes the environment, even with debug logging."""
    token = "hf_avocadoFakeCliToken0123456789"
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "hello"}\n{"bad json\n')
    env = {**os.environ, "HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token}
    outputs = []
    for argv in (
        ["-v", "config", "check", "builtin:local"],
        ["-v", "config", "check", str(source)],
        ["-v", "route", "--input", str(source), "--output", str(tmp_path / "routed.jsonl")],
        ["-v", "status", str(tmp_path)],
        ["-v", "report", str(tmp_path)],
    ):
        done = subprocess.run([sys.executable, "-m", "avocado_ray", *argv], env=env, capture_output=True, timeout=120)
        outputs += [done.stdout, done.stderr]
    assert b"routed" in b"".join(outputs)  # the commands did run
    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert not [blob for blob in outputs + written if token.encode() in blob]


def test_a_hub_token_in_the_environment_of_a_whole_run_reaches_none_of_its_files_or_logs(demo_run):
    """conftest puts a fake HF_TOKEN in the environment of the driver and every Ray process of the session.

    Ray's own logs count too: a token passed on in an actor's runtime env would be logged by its agent.
    """
    import ray

    token = os.environ["HF_TOKEN"].encode()
    assert token.startswith(b"hf_avocadoFake")
    files = [p for p in Path(demo_run["run_dir"]).rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any(p.name == "metrics.jsonl" for p in files)
    logs = [p for p in Path(ray._private.worker._global_node.get_logs_dir_path()).rglob("*") if p.is_file()]
    assert any(p.name.startswith("worker-") for p in logs)  # the run's actors logged here
    assert [str(p) for p in files + logs if token in p.read_bytes()] == []


def test_the_sandbox_cannot_write_outside_its_own_tmpfs(tmp_path):
    outside = tmp_path / "escape.txt"
    code = f"""
import errno
for path in [{str(outside)!r}, "/tmp/avocado-escape", __file__]:
    try:
        open(path, "a").write("x")
    except OSError as error:
        assert error.errno == errno.EROFS, (path, error)
    else:
        raise AssertionError(path + " was writable")
open("inside.txt", "w").write("the working directory is writable")
"""
    result = run_python_tests(code, "assert open('inside.txt').read().startswith('the working')")
    assert result.passed, result.reason
    assert not outside.exists() and not Path("/tmp/avocado-escape").exists()


def test_sandboxed_code_cannot_undo_the_read_only_view(tmp_path):
    """Not even by making a user namespace of its own and remounting: the sandbox user has no privileges."""
    code = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.unshare(0x10000000 | 0x00020000)  # a nested user and mount namespace
libc.mount(None, b"/", None, 0x20 | 0x1000, None)  # MS_REMOUNT | MS_BIND, without MS_RDONLY
open({str(tmp_path / "escape.txt")!r}, "w").write("x")
"""
    result = run_python_tests(code, "")
    assert not result.passed and "Read-only file system" in result.reason
    assert not (tmp_path / "escape.txt").exists()


def test_sandboxed_code_sees_no_secret_of_its_caller(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_avocadoFakeSandboxToken")
    code = "import os\nassert 'HF_TOKEN' not in os.environ\nopen(f'/proc/{os.getppid()}/environ', 'rb').read()"
    result = run_python_tests(code, "")
    assert not result.passed and "PermissionError" in result.reason, result.reason


@pytest.mark.parametrize(
    "code",
    [
        "import sys\nwhile True:\n    sys.stdout.write('y' * 4096)",
        "open('big.bin', 'wb').write(b'x' * 10_000_000)",
        "for i in range(100):\n    open(f'f{i}', 'wb').write(b'x' * 60_000)",
    ],
    ids=["stdout", "one file", "many files"],
)
def test_the_sandbox_bounds_its_output(code):
    started = time.monotonic()
    result = run_python_tests(code, "", timeout_s=10.0)
    assert not result.passed and ("File too large" in result.reason or "No space left" in result.reason), result.reason
    assert time.monotonic() - started < 8  # stopped by the bound, not by the time limit
