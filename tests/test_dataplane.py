"""The data plane: versioned Arrow schema, atomic Parquet shards, torn-shard detection, and resume."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from avocado_ray.dataplane.schema import SAMPLE_SCHEMA, VERSION_KEY, SchemaVersionError, samples_to_batch
from avocado_ray.dataplane.spill import ShardWriter, answered_prompt_ids, complete_shards, open_samples


def sample(i):
    return dict(sample_id=f"p{i}:t", prompt_id=f"p{i}", domain="general", teacher="t",
                messages=json.dumps([{"role": "user", "content": str(i)}]), answer=f"a{i}",
                token_ids=[1, 2], topk_ids=[[1, 3], [2, 4]], topk_logprobs=[[-0.1, -2.0], [-0.2, -3.0]])


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
    assert answered_prompt_ids(tmp_path) == {"p0", "p1", "p4"}  # p2 and p3 will be asked again
    assert ShardWriter(str(tmp_path)).shard_index == 3  # never overwrites a shard


def test_a_shard_of_another_schema_version_fails_naming_both_versions(tmp_path):
    table = pa.Table.from_batches([samples_to_batch([sample(0)])])
    old = table.replace_schema_metadata({VERSION_KEY: b"0"})
    pq.write_table(old, tmp_path / "shard-000000.parquet")
    with pytest.raises(SchemaVersionError, match="schema version 0, but this avocado-ray reads version 1"):
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


@pytest.mark.slow
def test_a_resumed_run_answers_only_the_missing_prompts_and_trains_each_sample_once(
    demo_run, local_config, tmp_path, ray_cluster
):
    from avocado_ray.pipeline import run_distill

    # An interrupted run: 20 answered prompts in a complete shard, and a torn shard that was being written.
    done = open_samples(demo_run["run_dir"] + "/samples").to_table().slice(0, 20)
    samples = tmp_path / "samples"
    samples.mkdir()
    pq.write_table(done, samples / "shard-000000.parquet")
    shutil.copy(samples / "shard-000000.parquet", samples / "shard-000001.parquet")
    (samples / "shard-000001.parquet").write_bytes((samples / "shard-000001.parquet").read_bytes()[:300])
    summary = run_distill(local_config.model_copy(update={"run_dir": str(tmp_path)}))
    table = open_samples(samples).to_table()
    assert summary["counts_add_up"] and summary["samples_out"] == 48
    assert sorted(table["prompt_id"].to_pylist()) == sorted(set(table["prompt_id"].to_pylist()))  # one each
    kept = {r["sample_id"]: r["answer"] for r in table.to_pylist()}
    assert all(kept[r["sample_id"]] == r["answer"] for r in done.to_pylist())  # not asked again
    trained = (tmp_path / "trained_ids.txt").read_text().split()
    assert sorted(trained) == sorted(kept)  # every sample, old and new, trained on exactly once


@pytest.mark.slow
def test_train_only_mode_trains_once_on_every_sample_on_disk(demo_run, local_config, tmp_path, ray_cluster):
    from avocado_ray.pipeline import run_train

    data = demo_run["run_dir"] + "/samples"
    summary = run_train(local_config.model_copy(update={"run_dir": str(tmp_path)}), data)
    assert summary["samples_in"] == 48 and summary["train_steps"] == 6
    on_disk = open_samples(data).to_table(columns=["sample_id"])["sample_id"].to_pylist()
    assert sorted((tmp_path / "trained_ids.txt").read_text().split()) == sorted(on_disk)
    assert (tmp_path / "student" / "model.safetensors").is_file()
