"""The data plane: versioned Arrow schema, atomic Parquet shards, torn-shard detection, and resume."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from avocado_ray.dataplane.schema import (
    SAMPLE_SCHEMA,
    SCHEMA_VERSION,
    VERSION_KEY,
    SchemaVersionError,
    samples_to_batch,
)
from avocado_ray.dataplane.spill import ShardWriter, complete_shards, open_samples, prompt_ids_in


def sample(i):
    return dict(
        sample_id=f"p{i}:t",
        prompt_id=f"p{i}",
        domain="general",
        teacher="t",
        messages=json.dumps([{"role": "user", "content": str(i)}]),
        answer=f"a{i}",
        token_ids=[1, 2],
        topk_ids=[[1, 3], [2, 4]],
        topk_logprobs=[[-0.1, -2.0], [-0.2, -3.0]],
    )


def test_shards_are_written_atomically_and_a_torn_one_is_set_aside(tmp_path):
    writer = ShardWriter(str(tmp_path), rows_per_shard=2)
    for i in range(5):
        writer.write(samples_to_batch([sample(i)]))
    assert len(list(tmp_path.glob(".shard-*.tmp"))) == 1  # the open shard is not yet a shard
    assert [p.name for p in complete_shards(tmp_path)] == ["shard-000000.parquet", "shard-000001.parquet"]
    writer.close()
    torn = tmp_path / "shard-000001.parquet"
    torn.write_bytes(torn.read_bytes()[:100])  # a shard cut short, as by a full disk
    assert [p.name for p in complete_shards(tmp_path)] == ["shard-000000.parquet", "shard-000002.parquet"]
    assert (tmp_path / "shard-000001.parquet.corrupt").is_file()
    assert prompt_ids_in(complete_shards(tmp_path)) == {"p0", "p1", "p4"}  # p2 and p3 will be asked again
    assert ShardWriter(str(tmp_path)).shard_index == 3  # never overwrites a shard


def test_sealing_waits_for_the_batches_a_checkpoint_counts_then_completes_the_open_shard(tmp_path):
    writer = ShardWriter(str(tmp_path), rows_per_shard=100)
    writer.write(samples_to_batch([sample(0)]), seq=1)
    assert writer.seal(2) is None  # batch 2 has not reached the writer yet: the trainer asks again
    writer.write(samples_to_batch([sample(1)]), seq=2)
    assert writer.seal(2) == ["shard-000000.parquet"]  # both batches are now in a complete shard
    assert prompt_ids_in(complete_shards(tmp_path)) == {"p0", "p1"}


def test_a_shard_of_another_schema_version_fails_naming_both_versions(tmp_path):
    table = pa.Table.from_batches([samples_to_batch([sample(0)])])
    old = table.replace_schema_metadata({VERSION_KEY: b"0"})
    pq.write_table(old, tmp_path / "shard-000000.parquet")
    with pytest.raises(
        SchemaVersionError, match=f"schema version 0, but this avocado-ray reads version {SCHEMA_VERSION}"
    ):
        open_samples(tmp_path)


def test_the_sample_columns_are_compact(tmp_path):
    assert SAMPLE_SCHEMA.field("topk_ids").type == pa.list_(pa.list_(pa.int32()))
    assert SAMPLE_SCHEMA.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16()))


@pytest.mark.slow
def test_the_demo_shards_load_in_datasets_and_duckdb(demo_run):
    import duckdb
    from datasets import load_dataset

    pattern = demo_run["run_dir"] + "/samples/shard-*.parquet"
    loaded = load_dataset("parquet", data_files=pattern, split="train")
    assert loaded.num_rows == demo_run["samples_out"] and "topk_logprobs" in loaded.column_names
    count = duckdb.sql(f"select count(distinct prompt_id) from read_parquet('{pattern}')").fetchall()[0][0]
    assert count == demo_run["samples_out"]


# A driver SIGKILLed mid-run and resumed: tests/test_storage.py runs it on an s3:// run directory, which goes
# through the same resume code as a local folder.


@pytest.mark.slow
def test_train_only_mode_trains_once_on_every_sample_on_disk(demo_run, local_config, tmp_path, ray_cluster):
    from avocado_ray.pipeline import run_train

    data = demo_run["run_dir"] + "/samples"
    summary = run_train(local_config.model_copy(update={"run_dir": str(tmp_path)}), data)
    assert summary["samples_in"] == 48 and summary["train_steps"] == 6
    on_disk = open_samples(data).to_table(columns=["sample_id"])["sample_id"].to_pylist()
    assert sorted((tmp_path / "trained_ids.txt").read_text().split()) == sorted(on_disk)
    assert (tmp_path / "student" / "model.safetensors").is_file()


def test_a_slow_trainer_holds_the_object_store_at_the_stream_bound(ray_cluster):
    from avocado_ray.benchmarks.common import _synthetic_samples
    from avocado_ray.benchmarks.dataplane import stream_through

    rows = _synthetic_samples(640, tokens=64, k=20, vocab=151_936)
    batches = [samples_to_batch(rows[i : i + 64]) for i in range(0, 640, 64)]  # ten batches of ~0.57 MB
    measured = stream_through(batches, buffer_batches=3, consumer_delay_s=0.3)
    assert measured["samples"] == 640
    assert measured["producer_blocked_s"] > 1  # backpressure: the producer waited for the trainer
    assert 3 <= measured["peak_batches"] <= 3 + 3  # the buffer fills, and never holds more than its bound


def test_a_stream_read_to_its_end_ends_at_once_for_a_later_reader(ray_cluster):
    """A trainer worker group restarted after the stream ended (its batches come back from the spill) must
    find the end, not wait for it forever."""
    import ray

    from avocado_ray.dataplane.stream import SampleStream

    @ray.remote(num_cpus=0)
    def rows_read(stream: SampleStream) -> int:
        return sum(batch.num_rows for batch, *_ in stream.batches())

    stream = SampleStream(4)
    stream.put(ray.put(samples_to_batch([sample(i) for i in range(3)])), seq=1)
    stream.close()
    assert ray.get(rows_read.remote(stream), timeout=60) == 3
    assert ray.get(rows_read.remote(stream), timeout=10) == 0  # the lost attempt took the end; the next finds it
    stream.shutdown()
