"""Durable copies of every teacher batch: Parquet shards (zstd) in the run directory.

A shard is written to a temporary name and renamed when complete, so a reader never sees half a
shard. `ShardWriter` runs as a Ray actor; batches reach it by reference from the object store.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from avocado_ray.dataplane.schema import SAMPLE_SCHEMA, check_schema_version

SHARD_GLOB = "shard-*.parquet"
ROW_GROUP_ROWS = 1024  # batches are gathered into row groups this large: better compression, fewer pages
# Numbers compress best split by byte: logprobs keep their exponent bytes together, and token ids (BPE gives
# frequent tokens low ids) leave their high bytes nearly all zero. Text and label columns keep dictionaries.
_SPLIT_COLUMNS = (
    "token_ids.list.element", "token_logprobs.list.element",
    "topk_ids.list.element.list.element", "topk_logprobs.list.element.list.element",
)
PARQUET_OPTIONS = dict(
    compression="zstd",
    write_page_checksum=True,  # CRC per page: `complete_shards(verify=True)` finds a shard damaged in the middle
    column_encoding={column: "BYTE_STREAM_SPLIT" for column in _SPLIT_COLUMNS},
    use_dictionary=["sample_id", "prompt_id", "domain", "labels.list.element", "teacher", "finish_reason"],
)
log = logging.getLogger(__name__)


class ShardWriter:
    """Appends record batches to the current shard; starts a new shard every `rows_per_shard` rows."""

    def __init__(self, folder: str, rows_per_shard: int = 4096):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        existing = [int(p.name[len("shard-") : -len(".parquet")]) for p in self.folder.glob(SHARD_GLOB)]
        self.shard_index = max(existing, default=-1) + 1
        self.writer: pq.ParquetWriter | None = None
        self.pending: list[pa.RecordBatch] = []
        self.rows_in_shard = 0
        self.shards: list[str] = []
        self.last_seq = 0  # the highest batch number written (batches of one producer arrive in order)

    def _temp_path(self) -> Path:
        return self.folder / f".shard-{self.shard_index:06d}.parquet.tmp"

    @contextmanager
    def _naming_the_shard(self):
        """On a failed write (a full disk): give up the open shard, whose batches a rerun asks for again, so the
        writer can go on once there is room; and name the file, which Arrow's I/O errors do not."""
        try:
            yield
        except OSError as error:
            temp = self._temp_path()
            if self.writer is not None:
                try:
                    self.writer.close()
                except OSError:
                    pass
            temp.unlink(missing_ok=True)
            self.writer, self.pending, self.rows_in_shard = None, [], 0
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise OSError(error.errno, f"{reason} (writing a sample shard)", str(temp)) from error

    def write(self, batch: pa.RecordBatch, seq: int = 0) -> int:
        """Write one batch (numbered `seq` by its producer); returns its row count."""
        check_schema_version(batch.schema, "teacher batch")
        self.last_seq = max(self.last_seq, seq)
        if batch.num_rows == 0:
            return 0
        with self._naming_the_shard():
            if self.writer is None:
                self.writer = pq.ParquetWriter(self._temp_path(), SAMPLE_SCHEMA, **PARQUET_OPTIONS)
            self.pending.append(batch)
            self.rows_in_shard += batch.num_rows
            if sum(b.num_rows for b in self.pending) >= ROW_GROUP_ROWS:
                self._flush()
            if self.rows_in_shard >= self.rows_per_shard:
                self._finish_shard()
        return batch.num_rows

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.Table.from_batches(self.pending), row_group_size=self.rows_per_shard)
            self.pending = []

    def _finish_shard(self) -> None:
        self._flush()
        self.writer.close()
        final = self.folder / f"shard-{self.shard_index:06d}.parquet"
        os.replace(self._temp_path(), final)
        self.shards.append(final.name)
        self.shard_index += 1
        self.writer, self.rows_in_shard = None, 0

    def seal(self, upto_seq: int) -> list[str] | None:
        """Make every batch up to `upto_seq` durable by completing the open shard; None if some have not
        arrived yet (ask again). Returns the folder's complete shards."""
        if self.last_seq < upto_seq:
            return None
        self.close()
        return sorted(p.name for p in self.folder.glob(SHARD_GLOB))

    def close(self) -> list[str]:
        """Complete the open shard; returns the shards written by this writer."""
        if self.writer is not None:
            with self._naming_the_shard():
                self._finish_shard()
        return self.shards


def write_manifest(run_dir: Path, **fields) -> None:
    """Update `run_dir/manifest.json` atomically: which shards are complete, and what the trainer consumed
    up to its last checkpoint (step, sample count, checkpoint folder; the ids are in the checkpoint)."""
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest.update(fields, updated=time.time())
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temp, path)


def complete_shards(folder: str | Path, verify: bool = False) -> list[Path]:
    """Shards whose Parquet footer reads (with `verify`, whose every page also passes its CRC check), in order.
    A torn or damaged shard is renamed `*.corrupt` (kept for inspection, never read again) so its prompts count
    as unanswered; a shard of another schema version fails."""
    good = []
    for path in sorted(Path(folder).glob(SHARD_GLOB)):
        try:
            schema = pq.read_schema(path)
            check_schema_version(schema, str(path))
            if verify:
                pq.ParquetFile(path, page_checksum_verification=True).read()
        except (pa.ArrowInvalid, OSError) as error:
            log.warning("setting aside damaged shard %s: %s", path, error)
            path.rename(path.with_name(path.name + ".corrupt"))
            continue
        good.append(path)
    return good


def open_samples(folder: str | Path) -> ds.Dataset:
    """The complete shards of a run as one Arrow dataset (temporary and torn files are not shards)."""
    return ds.dataset([str(p) for p in complete_shards(folder)], format="parquet", schema=SAMPLE_SCHEMA)


def prompt_ids_in(shards: list[Path]) -> set[str]:
    """Prompts that have their sample in these shards: a resumed run does not ask the teachers again."""
    dataset = ds.dataset([str(p) for p in shards], format="parquet", schema=SAMPLE_SCHEMA)
    return set(dataset.to_table(columns=["prompt_id"])["prompt_id"].to_pylist())


def sample_counts(folder: str | Path) -> dict:
    """Counts of the samples on disk: total, per domain, per teacher, per domain and teacher, tokens generated."""
    table = open_samples(folder).to_table(columns=["domain", "teacher", "token_ids"])
    per = {}
    for column in ("domain", "teacher"):
        grouped = table.group_by(column).aggregate([([], "count_all")]).to_pylist()
        per[column] = {row[column]: row["count_all"] for row in sorted(grouped, key=lambda r: r[column])}
    both: dict[str, dict[str, int]] = {}
    for row in sorted(table.group_by(["domain", "teacher"]).aggregate([([], "count_all")]).to_pylist(),
                      key=lambda r: (r["domain"], r["teacher"])):
        both.setdefault(row["domain"], {})[row["teacher"]] = row["count_all"]
    tokens = pc.sum(pc.list_value_length(table["token_ids"])).as_py() or 0
    return {"samples": table.num_rows, "per_domain": per["domain"], "per_teacher": per["teacher"],
            "per_domain_teacher": both, "tokens": tokens}
