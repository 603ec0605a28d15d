"""The config: one schema, strict about keys and types, and checked before anything starts."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

from avocado_ray.cli import main
from avocado_ray.config import ConfigError, config_path, load_config

LOCAL = config_path("builtin:local")


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def local_with(tmp_path, old, new):
    return write(tmp_path, LOCAL.read_text().replace(old, new, 1))


def test_the_embedded_default_config_is_valid():
    config = load_config(LOCAL)
    assert [t.name for t in config.teachers] == ["qwen", "gemma", "gptoss"]
    assert config.trainer.zero_stage == 3


def test_an_unknown_key_is_named_with_its_file_and_line(tmp_path):
    path = local_with(tmp_path, "  lr: 3.0e-3", "  lr: 3.0e-3\n  learning_rate: 0.1")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and "trainer.learning_rate: unknown key" in message
    line = path.read_text().splitlines().index("  learning_rate: 0.1") + 1
    assert f"line {line}:" in message


def test_a_wrong_type_is_named_with_its_key_path(tmp_path):
    path = local_with(tmp_path, "  batch_size: 8\n  lr", "  batch_size: eight\n  lr")
    with pytest.raises(ConfigError, match=r"trainer\.batch_size: Input should be a valid integer"):
        load_config(path)


def test_every_problem_is_listed_not_only_the_first(tmp_path):
    path = local_with(tmp_path, "seed: 0", "seed: zero\nextra_thing: 1")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert len(error.value.problems) == 2


def test_a_routing_table_naming_a_missing_teacher_is_refused(tmp_path):
    path = local_with(tmp_path, "math: gptoss", "math: llama")
    with pytest.raises(ConfigError, match="routing.table.math names teacher 'llama'"):
        load_config(path)


def test_dotted_overrides_are_typed_and_validated():
    assert load_config(LOCAL, ["trainer.lr=1e-5"]).trainer.lr == 1e-5
    with pytest.raises(ConfigError, match="trainer.lr"):
        load_config(LOCAL, ["trainer.lr=-1"])


def test_config_check_exits_non_zero_and_names_the_problem(tmp_path, capsys):
    path = local_with(tmp_path, "model: tiny:student", "model: /nowhere/student")
    assert main(["config", "check", str(path)]) == 2
    assert "student.model: model path '/nowhere/student' does not exist" in capsys.readouterr().err
    assert main(["config", "check", str(LOCAL)]) == 0


def test_config_check_without_paths_checks_a_clusters_config_off_the_cluster(tmp_path, capsys):
    gpu_cluster = pathlib.Path(__file__).resolve().parents[1] / "configs" / "gpu-cluster.yaml"
    on_shared_disk = ["--set", "data.input=/mnt/shared/prompts/mix.jsonl"]
    assert main(["config", "check", str(gpu_cluster), *on_shared_disk]) == 2  # a prompt file on the cluster's disk
    assert "data.input: input '/mnt/shared/prompts/mix.jsonl' does not exist" in capsys.readouterr().err
    assert main(["config", "check", str(gpu_cluster), *on_shared_disk, "--no-paths"]) == 0
    assert "ok (3 teachers" in capsys.readouterr().out


def test_config_check_warns_when_a_cluster_run_is_given_a_local_run_directory(tmp_path, capsys, monkeypatch):
    gpu_cluster = pathlib.Path(__file__).resolve().parents[1] / "configs" / "gpu-cluster.yaml"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["config", "check", str(gpu_cluster)]) == 0  # run_dir and input on object storage
    assert "warning" not in capsys.readouterr().err
    assert main(["config", "check", str(gpu_cluster), "--set", f"run_dir={tmp_path}"]) == 0
    assert f"run_dir: '{tmp_path}' is a local folder, but the run is for a cluster (trainer.use_gpu)" in (
        capsys.readouterr().err
    )
    assert main(["config", "check", str(LOCAL), "--set", "ray.address=10.0.0.1:6379"]) == 0
    assert "is a local folder, but the run is for a cluster (ray.address 10.0.0.1:6379)" in capsys.readouterr().err
    assert main(["config", "check", str(LOCAL)]) == 0 and "warning" not in capsys.readouterr().err


def test_distill_with_a_missing_model_fails_before_ray_starts(tmp_path):
    path = local_with(tmp_path, "model: tiny:gemma-trained", "model: /nowhere/gemma")
    result = subprocess.run(
        [sys.executable, "-m", "avocado_ray", "distill", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "teachers.1.model: model path '/nowhere/gemma' does not exist" in result.stderr
    assert "ray:" not in result.stderr  # the pipeline logs how it reached Ray; it never got there


def test_the_configuration_reference_matches_the_schema():
    root = pathlib.Path(__file__).resolve().parents[1]
    generated = subprocess.run(
        [sys.executable, str(root / "scripts" / "config_reference.py")], capture_output=True, text=True, check=True
    ).stdout
    assert (root / "docs" / "configuration.md").read_text() == generated, "run scripts/config_reference.py"


def test_the_gpu_cluster_example_is_a_valid_config():
    config = load_config(
        pathlib.Path(__file__).resolve().parents[1] / "configs" / "gpu-cluster.yaml", check_paths=False
    )
    assert {t.name: t.tensor_parallel_size for t in config.teachers} == {"qwen": 4, "gemma": 2, "gptoss": 2}
