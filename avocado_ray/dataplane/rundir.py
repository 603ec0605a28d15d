"""The run directory on any filesystem pyarrow knows: a local folder, `file://...`, or object storage (`s3://...`).

Every file of a run is named here once. What is atomic (docs/cluster.md, "Where data lives"):
- `write_text`/`write_bytes` replace a file whole: locally a temporary file renamed over it; on object storage one
  PUT, which the store makes visible whole or not at all (there is no rename there, and none is needed).
- Object storage has no append. A `Log` appends in place on a local run directory; on object storage each process
  keeps its lines in a local spool and uploads them whole as its own part object `NAME.parts/<start>-<pid>`
  (at most every `storage.log_flush_s` seconds, and at `flush()`; a part of PART_BYTES is final and the next
  lines start a new one); readers concatenate the parts in time order.
- A sample shard counts as complete only once its sidecar `shard-N.json` exists (dataplane/spill.py).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from avocado_ray.config import StorageConfig

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"
SAMPLES = "samples"
STUDENT = "student"
RAY_TRAIN = "ray_train"
TRAINED_IDS = "trained_ids.txt"  # the sample ids the student has been trained on, one per line, in order
TAKEN_SEQ = "trainer_taken_seq"  # the highest writer seq the trainer's feeder took from the stream in this run
REPORT = "report.html"
REPORT_PLOTS = "report"
PLAN = "plan.json"  # the resource plan of the run's last start, for `avocado-ray status`
CHECKPOINT_STATE = "state.json"  # in a checkpoint folder (ray_train/student/checkpoint-N), beside TRAINED_IDS
TEMP_SUFFIX = ".tmp"  # a file still being written locally (`.NAME.tmp`), or a sample shard still open
PARTS = ".parts"  # suffix of the folder of a log's part objects on object storage
PART_BYTES = 8 << 20  # a log part this large is final: the next lines go to a new part (no upload grows forever)


def is_uri(location: str) -> bool:
    return "://" in location


def canonical(location: str | Path) -> str:
    """One spelling per run directory: an absolute path for a local one, the URI without a trailing / otherwise.
    A URI is never turned into a local path (no folder named `s3:`)."""
    location = str(location)
    if location.startswith("file://"):
        return str(Path(location[len("file://") :]).resolve())
    return location.rstrip("/") if is_uri(location) else str(Path(location).resolve())


def filesystem(location: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a local path or URI; S3 takes `storage`'s endpoint and region (else
    pyarrow's: AWS_ENDPOINT_URL, AWS_REGION and the usual AWS credential chain)."""
    location = canonical(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    storage = storage or StorageConfig()
    if location.startswith("s3://") and (storage.s3_endpoint or storage.s3_region):
        options: dict = {"region": storage.s3_region} if storage.s3_region else {}
        if storage.s3_endpoint:
            scheme, _, host = storage.s3_endpoint.rpartition("://")
            options.update(endpoint_override=host, scheme=scheme or "https")
        return pafs.S3FileSystem(**options), location[len("s3://") :]
    return pafs.FileSystem.from_uri(location)


def discard(fs: pafs.FileSystem, stream, path: str) -> None:
    """Give up a file being written: pyarrow cannot abort an upload, so close it and delete what it left."""
    try:
        stream.close()
    except OSError:  # e.g. the disk is full: nothing more to keep
        pass
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


def checkpoint_name(step: int) -> str:
    """The folder of the checkpoint taken after `step` in ray_train/student."""
    return f"checkpoint-{step:06d}"


class RunDir:
    """A run's folder (or object prefix) with whole-file reads and writes. Picklable: a Ray actor or Train worker
    rebuilds the filesystem from the location and `storage` (credentials come from that process's environment,
    never from the pickle)."""

    def __init__(self, location: str | Path, storage: StorageConfig | None = None):
        self.location, self.storage = canonical(location), storage
        self.fs, self.root = filesystem(self.location, storage)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    @classmethod
    def of(cls, location: str | Path | RunDir, storage: StorageConfig | None = None) -> RunDir:
        return location if isinstance(location, RunDir) else cls(location, storage)

    def __getstate__(self) -> dict:
        return {"location": self.location, "storage": self.storage}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["location"], state["storage"])

    def __str__(self) -> str:
        return self.location

    def child(self, name: str) -> RunDir:
        """The run directory's subfolder `name` as a RunDir of its own (e.g. the sample shards)."""
        return RunDir(f"{self.location}/{name}", self.storage)

    def uri(self, *names: str) -> str:
        """How a user names a file of the run (a local path, or the URI)."""
        return "/".join([self.location, *names])

    def path(self, *names: str) -> str:
        """The path of a file of the run inside `fs`."""
        return "/".join([self.root, *names])

    def local_path(self, *names: str) -> Path:
        assert self.local, "a local path of an object-storage run directory"
        return Path(self.path(*names))

    def make(self) -> None:
        """Create the folder (on object storage: check that the bucket exists; prefixes need no creating)."""
        if self.local:
            self.fs.create_dir(self.root)
        else:
            bucket = self.root.split("/", 1)[0]
            if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"{self.location}: bucket {bucket!r} does not exist")

    def info(self, name: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(name))

    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(self.path(name) if name else self.root).type != pafs.FileType.NotFound

    def list(self, name: str = "") -> list[pafs.FileInfo]:
        """Files and folders directly in `name` (none if it does not exist)."""
        selector = pafs.FileSelector(self.path(name) if name else self.root, allow_not_found=True)
        return self.fs.get_file_info(selector)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Replace the file whole (see the module docstring for what is atomic)."""
        with self.atomic_output(name) as f:
            f.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    @contextmanager
    def atomic_output(self, name: str):
        """A stream whose file appears whole once the block ends, and not at all if it raises: locally written
        under a temporary name and renamed; on object storage an upload completed only at close."""
        final = self.path(name)
        target = (
            str(PurePosixPath(final).with_name(f".{PurePosixPath(final).name}{TEMP_SUFFIX}")) if self.local else final
        )
        if self.local:
            self.fs.create_dir(str(PurePosixPath(final).parent))
        stream = self.fs.open_output_stream(target)
        try:
            yield stream
        except BaseException:
            discard(self.fs, stream, target)
            raise
        stream.close()
        if self.local:
            self.fs.move(target, final)

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            pass

    def move(self, name: str, to: str) -> None:
        """Rename (object storage: copy, then delete)."""
        self.fs.move(self.path(name), self.path(to))

    @contextmanager
    def staged(self, name: str):
        """A local folder that becomes the run's folder `name`: the folder itself on a local run directory, else
        a temporary one uploaded when the block ends (e.g. the exported student, written by rank 0)."""
        if self.local:
            self.local_path(name).mkdir(parents=True, exist_ok=True)
            yield self.local_path(name)
            return
        folder = Path(tempfile.mkdtemp(prefix="avocado-stage-"))
        try:
            yield folder
            pafs.copy_files(
                str(folder), self.path(name), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def read_log(self, name: str) -> str:
        """All lines of a `Log`: the local file, or the parts of every process in time order."""
        if self.local:
            return self.read_text(name) if self.exists(name) else ""
        parts = sorted(i.base_name for i in self.list(name + PARTS) if i.type == pafs.FileType.File)
        return "".join(self.read_text(f"{name}{PARTS}/{part}") for part in parts)


class Log:
    """Lines appended to a file of the run by one process (see the module docstring for object storage)."""

    def __init__(self, run: RunDir, name: str, flush_s: float | None = None):
        self.run, self.name = run, name
        self.flush_s = flush_s if flush_s is not None else (run.storage or StorageConfig()).log_flush_s
        self.flushed = time.monotonic()
        if run.local:
            self._end_torn_record()
            self.spool = None
        else:
            self._new_part()

    def _new_part(self) -> None:
        self.part = f"{self.name}{PARTS}/{time.time_ns():020d}-{os.getpid()}"
        self.spool = io.StringIO()

    def _end_torn_record(self) -> None:
        """A process that died mid-append (a full disk) left half a record: end its line, so the next one stays
        whole."""
        path = self.run.local_path(self.name)
        if path.is_file() and path.stat().st_size:
            with open(path, "rb+") as f:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self.spool is None:
            with open(self.run.local_path(self.name), "a") as f:
                f.write(line)
            return
        self.spool.write(line)
        if time.monotonic() - self.flushed >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Upload this process's part whole (object storage; a local log is always up to date)."""
        if self.spool is not None:
            self.run.write_text(self.part, self.spool.getvalue())
            self.flushed = time.monotonic()
            if self.spool.tell() >= PART_BYTES:
                self._new_part()
