"""Durable copies of every teacher batch: Parquet shards (zstd) in the run directory, local or on object storage.

A shard counts as complete only once its sidecar `shard-N.json` exists: the writer writes the shard (locally under
a temporary name, renamed when complete; on object storage as one upload that appears whole when it completes),
then the sidecar, which commits it. The sidecar holds the shard's accounting (rows, samples per domain and
teacher, tokens) and its fingerprint (bytes, modification time) as written, so a summary, a resume and a status
come from sidecars and footers, and only a shard whose fingerprint changed since (or one without a sidecar, from
a writer killed between the two writes) is read whole to check its page checksums. `ShardWriter` runs as a Ray
actor; batches reach it by reference from the object store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from avocado_ray.dataplane.rundir import MANIFEST, TEMP_SUFFIX, RunDir, discard
from avocado_ray.dataplane.schema import SAMPLE_SCHEMA, SCHEMA_VERSION, check_schema_version

SHARD_GLOB = "shard-*.parquet"
CORRUPT = ".corrupt"  # suffix of a shard set aside as damaged
_SHARD = re.compile(r"shard-(\d+)\.parquet")
_NUMBERED = re.compile(r"\.?shard-(\d+)\.")  # shards, sidecars, set-aside and temporary files: never reused
ROW_GROUP_ROWS = 1024  # batches are gathered into row groups this large: better compression, fewer pages
# Numbers compress best split by byte: logprobs keep their exponent bytes together, and token ids (BPE gives
# frequent tokens low ids) leave their high bytes nearly all zero. Text and label columns keep dictionaries.
_SPLIT_COLUMNS = (
    "token_ids.list.element",
    "token_logprobs.list.element",
    "topk_ids.list.element.list.element",
    "topk_logprobs.list.element.list.element",
)
PARQUET_OPTIONS = dict(
    compression="zstd",
    write_page_checksum=True,  # CRC per page: `complete_shards(verify=True)` finds a shard damaged in the middle
    column_encoding={column: "BYTE_STREAM_SPLIT" for column in _SPLIT_COLUMNS},
    use_dictionary=["sample_id", "prompt_id", "domain", "labels.list.element", "teacher", "finish_reason"],
)
log = logging.getLogger(__name__)


def sidecar_name(shard: str) -> str:
    return shard[: -len(".parquet")] + ".json"


@dataclass
class Shard:
    """A complete shard: its file name, its path in `fs`, and its sidecar's accounting."""

    name: str
    path: str
    facts: dict
    fs: pafs.FileSystem


def facts_of(table: pa.Table) -> dict:
    """The accounting a sidecar keeps of some samples: rows, samples per domain and teacher, tokens generated."""
    both: dict[str, dict[str, int]] = {}
    for row in table.group_by(["domain", "teacher"]).aggregate([([], "count_all")]).to_pylist():
        both.setdefault(row["domain"], {})[row["teacher"]] = row["count_all"]
    tokens = pc.sum(pc.list_value_length(table["token_ids"])).as_py() or 0
    return {"rows": table.num_rows, "tokens": tokens, "per_domain_teacher": both}


def _add(facts: dict, more: dict) -> dict:
    both = {d: dict(t) for d, t in facts["per_domain_teacher"].items()}
    for domain, teachers in more["per_domain_teacher"].items():
        for teacher, count in teachers.items():
            both.setdefault(domain, {})[teacher] = both.get(domain, {}).get(teacher, 0) + count
    return {
        "rows": facts["rows"] + more["rows"],
        "tokens": facts["tokens"] + more["tokens"],
        "per_domain_teacher": both,
    }


NO_FACTS = {"rows": 0, "tokens": 0, "per_domain_teacher": {}}


def _fingerprint(info: pafs.FileInfo, local: bool) -> list:
    """What changes when a file's bytes change after it was written: its size and modification time (on object
    storage to the second, the precision a HEAD gives, where a listing may give milliseconds)."""
    return [info.size, info.mtime_ns if local else info.mtime_ns // 10**9]


def _commit(folder: RunDir, name: str, facts: dict) -> None:
    """Write the shard's sidecar: from now on it is complete, with this accounting and fingerprint."""
    sidecar = {**facts, "fingerprint": _fingerprint(folder.info(name), folder.local), "schema_version": SCHEMA_VERSION}
    folder.write_text(sidecar_name(name), json.dumps(sidecar) + "\n")


def committed(folder: RunDir) -> list[str]:
    """The names of the committed shards (with their sidecars), from one listing: nothing read or checked."""
    names = {i.base_name for i in folder.list()}
    return sorted(n for n in names if _SHARD.fullmatch(n) and sidecar_name(n) in names)


class ShardWriter:
    """Appends record batches to the current shard; starts a new shard every `rows_per_shard` rows. `folder` is a
    local path, a URI (s3://...) or a RunDir."""

    def __init__(self, folder: str | RunDir, rows_per_shard: int = 4096):
        self.folder = RunDir.of(folder)
        self.folder.make()
        self.rows_per_shard = rows_per_shard
        numbers = [int(m.group(1)) for i in self.folder.list() if (m := _NUMBERED.match(i.base_name))]
        self.shard_index = max(numbers, default=-1) + 1
        self.writer: pq.ParquetWriter | None = None
        self.stream = None
        self.pending: list[pa.RecordBatch] = []
        self.rows_in_shard = 0
        self.facts = NO_FACTS
        self.shards: list[str] = []
        self.last_seq = 0  # the highest batch number written (batches of one producer arrive in order)

    def _name(self) -> str:
        return f"shard-{self.shard_index:06d}.parquet"

    def _target(self) -> str:
        """Where the open shard is written: a temporary name locally, its own name on object storage (an upload
        is visible only once complete, and uncommitted until its sidecar exists)."""
        return self.folder.path(f".{self._name()}{TEMP_SUFFIX}" if self.folder.local else self._name())

    @contextmanager
    def _naming_the_shard(self):
        """On a failed write (a full disk): give up the open shard, whose batches a rerun asks for again, so the
        writer can go on once there is room; and name the file, which Arrow's I/O errors do not."""
        try:
            yield
        except OSError as error:
            target = self._target()
            if self.writer is not None:
                try:
                    self.writer.close()
                except OSError:
                    pass
                discard(self.folder.fs, self.stream, target)
            self.writer, self.stream, self.pending, self.rows_in_shard, self.facts = None, None, [], 0, NO_FACTS
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise OSError(error.errno, f"{reason} (writing a sample shard)", target) from error

    def write(self, batch: pa.RecordBatch, seq: int = 0) -> int:
        """Write one batch (numbered `seq` by its producer); returns its row count."""
        check_schema_version(batch.schema, "teacher batch")
        self.last_seq = max(self.last_seq, seq)
        if batch.num_rows == 0:
            return 0
        with self._naming_the_shard():
            if self.writer is None:
                self.stream = self.folder.fs.open_output_stream(self._target())
                self.writer = pq.ParquetWriter(self.stream, SAMPLE_SCHEMA, **PARQUET_OPTIONS)
            self.pending.append(batch)
            self.rows_in_shard += batch.num_rows
            self.facts = _add(self.facts, facts_of(pa.Table.from_batches([batch])))
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
        self.stream.close()
        name = self._name()
        if self.folder.local:
            self.folder.fs.move(self._target(), self.folder.path(name))
        try:
            _commit(self.folder, name, self.facts)
        except OSError:  # e.g. the disk filled: the shard is given up with its batches, as an open one is
            self.folder.delete(name)
            raise
        self.shards.append(name)
        self.shard_index += 1
        self.writer, self.stream, self.rows_in_shard, self.facts = None, None, 0, NO_FACTS

    def seal(self, upto_seq: int) -> list[str] | None:
        """Make every batch up to `upto_seq` durable by completing the open shard; None if some have not
        arrived yet (ask again). Returns the folder's complete shards."""
        if self.last_seq < upto_seq:
            return None
        self.close()
        return committed(self.folder)

    def close(self) -> list[str]:
        """Complete the open shard; returns the shards written by this writer."""
        if self.writer is not None:
            with self._naming_the_shard():
                self._finish_shard()
        return self.shards


def write_manifest(run_dir: str | Path | RunDir, **fields) -> None:
    """Update the run's `manifest.json`, replaced whole (one writer at a time: the trainer's rank 0 while training,
    the driver after): which shards are complete, and what the trainer consumed up to its last checkpoint (step,
    sample count, checkpoint folder; the ids are in the checkpoint)."""
    run = RunDir.of(run_dir)
    manifest = json.loads(run.read_text(MANIFEST)) if run.exists(MANIFEST) else {}
    manifest.update(fields, updated=time.time())
    run.write_text(MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _checked(folder: RunDir, name: str, commit: bool) -> dict | None:
    """Read a shard whole with its page checksums and (with `commit`: it has no sidecar, or one of other bytes)
    commit it with fresh accounting; None (and the shard set aside as `*.corrupt`, kept for inspection, never read
    again) if it is torn or damaged. A shard of another schema version fails."""
    try:
        with folder.fs.open_input_file(folder.path(name)) as f:
            parquet = pq.ParquetFile(f, page_checksum_verification=True)
            check_schema_version(parquet.schema_arrow, folder.uri(name))
            facts = facts_of(parquet.read())  # every page, for its checksum
    except (pa.ArrowInvalid, OSError) as error:
        log.warning("setting aside damaged shard %s: %s", folder.uri(name), error)
        folder.delete(sidecar_name(name))
        folder.move(name, name + CORRUPT)
        return None
    if commit:
        _commit(folder, name, facts)
    return facts


def complete_shards(folder: str | Path | RunDir, verify: bool = False) -> list[Shard]:
    """The complete shards, in order, from one listing and their sidecars. A shard whose bytes changed since it was
    committed, one without a sidecar (its writer died between the two writes), and with `verify` every shard, is
    read whole with its page checksums first; a torn or damaged one is set aside, so its prompts count as
    unanswered."""
    folder = RunDir.of(folder)
    infos = {i.base_name: i for i in folder.list() if i.type == pafs.FileType.File}
    names = sorted(n for n in infos if _SHARD.fullmatch(n))
    committed = [n for n in names if sidecar_name(n) in infos]
    with ThreadPoolExecutor(16) as pool:  # object storage: one request per sidecar, in parallel
        sidecars = dict(zip(committed, pool.map(lambda n: json.loads(folder.read_text(sidecar_name(n))), committed)))
    shards = []
    for name in names:
        facts = sidecars.get(name)
        if facts is not None and facts.get("schema_version") != SCHEMA_VERSION:
            check_schema_version(pq.read_schema(folder.path(name), filesystem=folder.fs), folder.uri(name))
        changed = facts is None or facts["fingerprint"] != _fingerprint(infos[name], folder.local)
        if verify or changed:
            facts = _checked(folder, name, commit=changed)
        if facts is not None:
            shards.append(Shard(name, folder.path(name), facts, folder.fs))
    return shards


def open_samples(folder: str | Path | RunDir) -> ds.Dataset:
    """The complete shards of a run as one Arrow dataset (temporary and uncommitted files are not shards)."""
    folder = RunDir.of(folder)
    return ds.dataset(
        [s.path for s in complete_shards(folder)], format="parquet", schema=SAMPLE_SCHEMA, filesystem=folder.fs
    )


def prompt_ids_in(shards: list[Shard]) -> set[str]:
    """Prompts that have their sample in these shards (their prompt_id column alone is read): a resumed run does
    not ask the teachers again."""
    ids: set[str] = set()
    for shard in shards:
        ids.update(pq.read_table(shard.path, columns=["prompt_id"], filesystem=shard.fs)["prompt_id"].to_pylist())
    return ids


def samples_not_in(shards: list[Shard], sample_ids: set[str], columns: list[str]) -> list[dict]:
    """The samples of `shards` whose ids are not in `sample_ids`, row group by row group: each group's sample_id
    column is read, and only a group that holds such a sample is read further (the trainer's lost attempt: the
    batches taken since the last checkpoint, so a restart reads the top-k and text columns of those alone)."""
    known = pa.array(sorted(sample_ids), pa.string())
    rows = []
    for shard in shards:
        with pq.ParquetFile(shard.path, filesystem=shard.fs) as parquet:
            for group in range(parquet.metadata.num_row_groups):
                ids = parquet.read_row_group(group, columns=["sample_id"])["sample_id"]
                if pc.all(pc.is_in(ids, known)).as_py() is not False:
                    continue
                table = parquet.read_row_group(group, columns=columns)
                rows += table.filter(pc.invert(pc.is_in(table["sample_id"], known))).to_pylist()
    return rows


def sample_counts(shards: list[Shard]) -> dict:
    """Counts of the samples in complete shards, from their sidecars: total, per domain, per teacher, per domain
    and teacher, tokens generated."""
    total = NO_FACTS
    for shard in shards:
        total = _add(total, shard.facts)
    both = {d: dict(sorted(t.items())) for d, t in sorted(total["per_domain_teacher"].items())}
    per_teacher: dict[str, int] = {}
    for teachers in both.values():
        for teacher, count in teachers.items():
            per_teacher[teacher] = per_teacher.get(teacher, 0) + count
    return {
        "samples": total["rows"],
        "per_domain": {d: sum(t.values()) for d, t in both.items()},
        "per_teacher": dict(sorted(per_teacher.items())),
        "per_domain_teacher": both,
        "tokens": total["tokens"],
    }
