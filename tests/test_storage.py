"""Run directories on object storage: a real S3-protocol server (moto, on loopback) reached with pyarrow's S3
client, as a cluster without a shared disk reaches S3 or MinIO. Shards are committed by their sidecars, the
accounting comes from the sidecars, and a whole run killed with SIGKILL resumes on the same bucket."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from avocado_ray.config import StorageConfig
from avocado_ray.dataplane import rundir, spill
from avocado_ray.dataplane.rundir import MANIFEST, METRICS, SUMMARY, TRAINED_IDS, Log, RunDir, canonical
from avocado_ray.dataplane.schema import samples_to_batch
from avocado_ray.dataplane.spill import ShardWriter, complete_shards, open_samples, prompt_ids_in, sample_counts
from avocado_ray.report import read_metrics, run_status, write_report


def sample(i, domain="general", teacher="t"):
    return dict(
        sample_id=f"p{i}:{teacher}",
        prompt_id=f"p{i}",
        domain=domain,
        teacher=teacher,
        messages=json.dumps([{"role": "user", "content": str(i)}]),
        answer=f"a{i}",
        token_ids=[1, 2, 3],
    )


@pytest.fixture
def bucket_run(s3_server, request):
    """A fresh run directory under the loopback bucket."""
    return RunDir(f"s3://avocado/{request.node.name}", StorageConfig(s3_endpoint=s3_server, log_flush_s=3600))


def test_an_s3_run_directory_stays_a_uri_and_never_becomes_a_local_folder(bucket_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert canonical("s3://avocado/run/") == "s3://avocado/run" and canonical("file:///x/../y") == "/y"
    bucket_run.make()
    bucket_run.write_text(SUMMARY, "{}")
    assert not bucket_run.local and bucket_run.read_text(SUMMARY) == "{}"
    assert not list(tmp_path.iterdir())  # no folder named `s3:` here
    with pytest.raises(FileNotFoundError, match="bucket 'nobucket' does not exist"):
        RunDir("s3://nobucket/run", bucket_run.storage).make()


def test_a_shard_on_s3_counts_only_once_its_sidecar_commits_it_with_its_accounting(bucket_run, monkeypatch):
    samples = bucket_run.child("samples")
    writer = ShardWriter(samples, rows_per_shard=3)
    for i in range(4):
        writer.write(samples_to_batch([sample(i, domain="code" if i % 2 else "math", teacher=f"t{i % 3}")]))
    names = sorted(i.base_name for i in samples.list())
    assert names == ["shard-000000.json", "shard-000000.parquet"]  # shard 1's upload is not visible until complete
    assert [s.name for s in complete_shards(samples)] == ["shard-000000.parquet"]
    writer.close()
    monkeypatch.setattr(spill, "_checked", None)  # committed and unchanged: no shard is read to list or count them
    shards = complete_shards(samples)
    counts = sample_counts(shards)
    assert counts["samples"] == 4 and counts["tokens"] == 12
    assert counts["per_domain_teacher"] == {"code": {"t0": 1, "t1": 1}, "math": {"t0": 1, "t2": 1}}
    assert prompt_ids_in(shards) == {"p0", "p1", "p2", "p3"}
    assert ShardWriter(samples).shard_index == 2  # never overwrites a shard


def test_a_shard_changed_after_its_commit_is_checked_and_a_torn_one_set_aside_on_s3(bucket_run):
    samples = bucket_run.child("samples")
    writer = ShardWriter(samples, rows_per_shard=2)
    for i in range(4):
        writer.write(samples_to_batch([sample(i)]))
    writer.close()
    torn = samples.read_bytes("shard-000000.parquet")[:100]
    samples.write_bytes("shard-000000.parquet", torn)  # replaced by a shorter object: its fingerprint changed
    assert [s.name for s in complete_shards(samples)] == ["shard-000001.parquet"]
    assert samples.exists("shard-000000.parquet.corrupt") and not samples.exists("shard-000000.json")
    assert open_samples(samples).to_table().num_rows == 2


def test_a_shard_without_its_sidecar_is_checked_and_committed_when_whole(bucket_run):
    samples = bucket_run.child("samples")
    writer = ShardWriter(samples, rows_per_shard=2)
    writer.write(samples_to_batch([sample(0), sample(1)]))
    samples.delete("shard-000000.json")  # the writer died between the shard and its sidecar
    assert sample_counts(complete_shards(samples))["samples"] == 2
    assert json.loads(samples.read_text("shard-000000.json"))["rows"] == 2


def test_logs_on_object_storage_are_parts_per_process_read_back_in_time_order(bucket_run):
    first, second = Log(bucket_run, METRICS), Log(bucket_run, METRICS)
    first.append({"kind": "generate", "time": 1.0})
    second.append({"kind": "train", "step": 1, "time": 2.0})
    first.append({"kind": "generate", "time": 3.0})
    assert read_metrics(bucket_run) == []  # nothing uploaded before a flush
    first.flush()
    second.flush()
    assert [r["time"] for r in read_metrics(bucket_run)] == [1.0, 2.0, 3.0]


def test_a_log_part_that_grew_large_is_final_and_the_next_lines_start_a_new_part(bucket_run, monkeypatch):
    monkeypatch.setattr(rundir, "PART_BYTES", 100)
    log = Log(bucket_run, METRICS)
    for i in range(6):
        log.append({"kind": "generate", "time": float(i), "pad": "x" * 40})
        log.flush()
    assert len(bucket_run.list(METRICS + rundir.PARTS)) == 3  # two lines of ~80 bytes per part
    assert [r["time"] for r in read_metrics(bucket_run)] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.slow
def test_a_run_on_s3_killed_with_sigkill_resumes_on_the_same_bucket_one_sample_per_prompt_each_trained_once(
    tiny_models, ray_cluster, s3_server, tmp_path, one_teacher_config
):
    storage = StorageConfig(s3_endpoint=s3_server, log_flush_s=1)
    run = RunDir("s3://avocado/killed-run", storage)
    inputs = RunDir("s3://avocado/inputs", storage)
    inputs.write_bytes(
        "prompts.jsonl", (Path(__file__).parents[1] / "avocado_ray/resources/demo_prompts.jsonl").read_bytes()
    )
    config = one_teacher_config(run.location, storage=storage.model_dump(), data={"input": inputs.uri("prompts.jsonl")})
    command = [sys.executable, "-m", "avocado_ray", "distill", "--config", str(config)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # the tests' Ray cluster
    trained_step = lambda: json.loads(run.read_text(MANIFEST)).get("trained", {}).get("step", 0)  # noqa: E731
    with open(tmp_path / "killed.log", "w") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.monotonic() + 600
        while not (run.exists(MANIFEST) and trained_step() >= 2):
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)  # the driver dies mid-run: no cleanup of any kind
        driver.wait()
    killed_at = json.loads(run.read_text(MANIFEST))["trained"]
    assert killed_at["samples"] < 48
    samples = run.child("samples")
    shards = complete_shards(samples)
    torn_prompts = set(
        pq.read_table(shards[0].path, columns=["prompt_id"], filesystem=samples.fs)["prompt_id"].to_pylist()
    )
    samples.write_bytes(shards[0].name, samples.read_bytes(shards[0].name)[:200])  # one shard replaced, torn

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads(run.read_text(SUMMARY))
    assert summary["counts_add_up"] and summary["samples_out"] == 48 and summary["rejected"] == 0
    assert summary["run_dir"] == run.location == "s3://avocado/killed-run"
    assert summary["student_dir"] == "s3://avocado/killed-run/student"
    table = open_samples(samples).to_table(columns=["sample_id", "prompt_id"])
    prompt_ids = table["prompt_id"].to_pylist()
    assert len(prompt_ids) == len(set(prompt_ids)) == 48  # one sample per prompt
    assert torn_prompts <= set(prompt_ids)  # the torn shard's prompts were answered again
    trained = run.read_text(TRAINED_IDS).split()
    assert sorted(trained) == sorted(table["sample_id"].to_pylist())  # each sample trained on once
    assert json.loads(run.read_text(MANIFEST))["trained"]["samples"] == 48
    assert run.exists("student/config.json") and run.exists("student/model.safetensors")
    assert {r["kind"] for r in read_metrics(run)} >= {"generate", "train", "train_end"}
    assert not list(tmp_path.glob("s3*"))  # nothing went to a local folder named after the URI


def test_status_and_report_read_a_run_on_s3_from_its_uri_alone(bucket_run, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", bucket_run.storage.s3_endpoint)  # as a user's shell names the store
    writer = ShardWriter(bucket_run.child("samples"), rows_per_shard=2)
    for i in range(3):
        writer.write(samples_to_batch([sample(i)]))
    metrics = Log(bucket_run, METRICS)
    metrics.append({"kind": "train", "step": 1, "loss": 2.0, "wait_s": 0.1, "time": time.time()})
    metrics.flush()
    status = run_status(bucket_run.location)
    assert (status["state"], status["samples_on_disk"], status["shards"], status["steps_trained"]) == (
        "running",
        2,
        1,
        1,
    )
    writer.close()
    assert run_status(bucket_run.location)["samples_on_disk"] == 3
    assert write_report(bucket_run.location) == bucket_run.uri("report.html")
    assert bucket_run.exists("report/loss.png") and "Loss per term over steps" in bucket_run.read_text("report.html")


def multinode_scenario(endpoint: str, student: str) -> dict:
    """The driver, the shard writer and the trainer on three nodes of a simulated cluster, the run directory on S3.

    Simulated: `ray.cluster_utils.Cluster` starts three Ray nodes (raylets) on this machine: the driver's (no
    CPUs), the writer's (custom resource `writer`, no CPUs) and the trainer's (the only CPUs, so the Ray Train
    worker lands there). They share this machine's disk, which real nodes would not; the run directory is
    `s3://` on the loopback S3 server, so every file goes through pyarrow.fs and none through a local folder.
    Runs in its own process (the test session has its own single-node Ray)."""
    import threading

    from ray._private.state import state
    from ray.cluster_utils import Cluster

    from avocado_ray.config import TrainerConfig
    from avocado_ray.dataplane.stream import SampleStream
    from avocado_ray.training.trainer import make_trainer

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    writer_node = cluster.add_node(num_cpus=0, resources={"writer": 1})
    trainer_node = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    run = RunDir("s3://avocado/multinode", StorageConfig(s3_endpoint=endpoint, log_flush_s=1))
    samples = run.child("samples")
    writer = ray.remote(ShardWriter).options(num_cpus=0, resources={"writer": 1}).remote(samples, 8)
    stream = SampleStream(4)
    trainer = make_trainer(
        TrainerConfig(num_workers=1, batch_size=4, checkpoint_every=2, losses={"supervised": 1.0}),
        student,
        stream,
        run,
        writer,
        None,
        samples,
    )
    fit = threading.Thread(target=trainer.fit)
    fit.start()
    for seq in range(1, 7):  # as the dispatcher does: each batch to the writer and to the trainer's stream
        batch = ray.put(samples_to_batch([sample(i) for i in range(4 * seq - 4, 4 * seq)]))
        writer.write.remote(batch, seq)
        stream.put(batch, seq)
    stream.close()
    fit.join()
    ray.get(writer.close.remote())
    nodes = {}  # actor class -> the nodes its actors ran on
    for actor in state.actor_table(None).values():
        nodes.setdefault(actor["ActorClassName"], set()).add(actor["Address"]["NodeID"])
    result = {
        "driver_node": ray.get_runtime_context().get_node_id() == cluster.head_node.node_id,
        "writer_node": nodes.get("ShardWriter") == {writer_node.node_id},
        "trainer_nodes": nodes.get("RayTrainWorker") == {trainer_node.node_id},
        "samples": sample_counts(complete_shards(samples))["samples"],
        "trained": sorted(run.read_text(TRAINED_IDS).split()),
        "manifest": json.loads(run.read_text(MANIFEST))["trained"],
        "student": run.exists("student/config.json"),
        "train_records": sum(r["kind"] == "train" for r in read_metrics(run)),
    }
    ray.shutdown()
    cluster.shutdown()
    return result


@pytest.mark.slow
def test_the_writer_the_trainer_and_the_driver_on_different_nodes_share_only_the_s3_run_directory(
    tiny_models, s3_server, tmp_path
):
    code = (
        "import json, sys, tests.test_storage as t; "
        "print('RESULT', json.dumps(t.multinode_scenario(sys.argv[1], sys.argv[2])))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, s3_server, str(tiny_models["student"])],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[1],
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["driver_node"] and result["writer_node"] and result["trainer_nodes"]
    assert result["samples"] == 24 and result["trained"] == sorted(f"p{i}:t" for i in range(24))
    assert result["manifest"]["step"] == 6 and result["manifest"]["samples"] == 24
    assert result["student"] and result["train_records"] == 6
