"""Reading prompts as a stream: every non-empty input line becomes exactly one prompt or one rejection.

A source is a JSONL or Parquet file, a folder of them, or a glob, on any filesystem pyarrow knows (a local
path, `file://`, `s3://`, `gs://`); it is read in bounded batches (`PromptReader`), never whole.

Input rows are JSON objects with an optional `id`, and either `prompt` (a string) or `messages`
(OpenAI-style chat), plus an optional `teacher` that overrides routing. A row without an id gets a
stable one, a hash of its content. Malformed rows are rejected with the line and the reason, and so
are rows over a byte limit: a 10 MB prompt is turned away here, before any teacher tokenizes it. A
file that cannot be read at all is an `InputError` naming it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from avocado_ray.config import MAX_PROMPT_BYTES
from avocado_ray.dataplane.idset import IdSet

BUILTIN_PREFIX = "builtin:"
INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")  # the files a folder of prompts contributes
READ_BUFFER_BYTES = 1 << 20


@dataclass
class Prompt:
    """One valid input row."""

    id: str
    messages: list[dict]
    line: int
    teacher: str | None = None
    file: str | None = None  # the input file of the row (the source itself when it is one file)
    tests: str | None = None  # Python asserts for the code_tests scorer
    sampling: dict | None = None  # overrides of the teacher's sampling defaults for this row (ROW_SAMPLING_KEYS)

    @property
    def text(self) -> str:
        """All message text, for classification."""
        return "\n".join(part for m in self.messages for part in _text_parts(m["content"]))

    @property
    def has_image(self) -> bool:
        return bool(image_urls(self.messages))


@dataclass
class Rejected:
    """One input row that will not be answered, and why."""

    line: int
    id: str | None
    reason: str
    # kind of reason, for counts: bad_row, too_large, duplicate_id, unknown_teacher; from a teacher replica: too_long,
    # no_vision, bad_image, refused; teacher_error (its calls raised every try); all_rejected (every best-of
    # teacher rejected it)
    code: str = "bad_row"
    file: str | None = None


class InputError(Exception):
    """An input that cannot be read at all (a missing prompt file, not Parquet, no sample shards); the message
    names it."""


@dataclass
class PromptSet:
    """What a prompt file holds: valid prompts and rejected rows, in input order."""

    source: str
    prompts: list[Prompt] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def image_urls(messages: list[dict]) -> list[str]:
    """The URLs (http(s) or base64 `data:`) of the image parts of chat messages, in order: OpenAI-style
    `{"type": "image_url", "image_url": {"url": ...}}`, and `{"type": "image", "image": ...}`."""
    urls = []
    for message in messages:
        parts = message["content"] if isinstance(message["content"], list) else []
        for part in parts:
            if isinstance(part, dict) and part.get("type") in ("image_url", "image"):
                image = part.get(part["type"])
                urls.append(image.get("url", "") if isinstance(image, dict) else str(image))
    return urls


def _text_parts(content) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]


def _valid_messages(messages) -> str | None:
    """The reason `messages` is not a usable chat, or None."""
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"messages[{index}] must be an object with a string 'role'"
        content = message.get("content")
        if not isinstance(content, (str, list)):
            return f"messages[{index}].content must be a string or a list of parts"
    if not any(part.strip() for m in messages for part in _text_parts(m["content"])):
        return "messages hold no text"
    return None


# What a row may override of its teacher's sampling (SamplingConfig). Not logprobs (bounded by the engine's
# max_logprobs) and not regex (structured outputs compile per pattern: a cost a prompt file should not choose).
ROW_SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "repetition_penalty", "stop")


def _sampling_problem(sampling) -> str | None:
    """Why a row's `sampling` overrides cannot be used, or None; values obey the config's own rules."""
    from pydantic import ValidationError

    from avocado_ray.config import SamplingConfig

    if not isinstance(sampling, dict):
        return "field 'sampling' must be an object"
    unknown = sorted(set(sampling) - set(ROW_SAMPLING_KEYS))
    if unknown:
        return f"field 'sampling' may set only {', '.join(ROW_SAMPLING_KEYS)}, not {', '.join(map(str, unknown))}"
    try:
        SamplingConfig.model_validate(sampling)
    except ValidationError as error:
        first = error.errors()[0]
        return f"field 'sampling.{'.'.join(map(str, first['loc']))}': {first['msg']}"
    return None


def parse_line(raw: bytes, line: int, max_bytes: int = MAX_PROMPT_BYTES) -> Prompt | Rejected:
    """Turn one JSONL line into a prompt, or a rejection that says why."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        return Rejected(line, None, f"invalid UTF-8 at byte {error.start + 1} of the line")
    except json.JSONDecodeError as error:
        return Rejected(line, None, f"invalid JSON: {error.msg} at column {error.colno}")
    except (ValueError, RecursionError) as error:  # nesting too deep, integers too long
        return Rejected(line, None, f"invalid JSON: {error}")
    return parse_row(row, line, max_bytes)


def _id_problem(row_id) -> str | None:
    """Why an `id` cannot be used, or None: ids go to Parquet and one per line into trained_ids.txt."""
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        return "field 'id' must be a string or an integer"
    if isinstance(row_id, str) and (not row_id or any(c.isspace() or not c.isprintable() for c in row_id)):
        return "field 'id' must be non-empty, without whitespace or control characters"
    return None


def _size_problem(row: dict, max_bytes: int) -> tuple[str, str] | None:
    """(code, reason) when a row is not valid Unicode (a lone surrogate escaped in JSON) or over the byte limit."""
    try:
        size = len(json.dumps(row, ensure_ascii=False, default=str).encode("utf-8"))  # default: Parquet types
    except UnicodeEncodeError as error:
        return "bad_row", f"row holds a lone surrogate {error.object[error.start]!r}, which is not valid Unicode"
    if size > max_bytes:
        return "too_large", f"row of {size} bytes is over the limit of {max_bytes} (data.max_prompt_bytes)"
    return None


def parse_row(row, line: int, max_bytes: int = MAX_PROMPT_BYTES) -> Prompt | Rejected:
    """Turn one decoded row (from JSONL or Parquet) into a prompt, or a rejection that says why."""
    if not isinstance(row, dict):
        return Rejected(line, None, "row must be a JSON object")
    row_id = row.get("id")
    if row_id is not None and (reason := _id_problem(row_id)):
        return Rejected(line, None, reason)
    row_id = None if row_id is None else str(row_id)
    if problem := _size_problem(row, max_bytes):
        return Rejected(line, row_id, problem[1], problem[0])
    if "prompt" in row and "messages" in row:
        return Rejected(line, row_id, "row has both 'prompt' and 'messages'")
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            return Rejected(line, row_id, "field 'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": row["prompt"]}]
    elif "messages" in row:
        reason = _valid_messages(row["messages"])
        if reason:
            return Rejected(line, row_id, reason)
        messages = row["messages"]
    else:
        return Rejected(line, row_id, "row has neither 'prompt' nor 'messages'")
    teacher = row.get("teacher")
    if teacher is not None and not isinstance(teacher, str):
        return Rejected(line, row_id, "field 'teacher' must be a string")
    tests = row.get("tests")
    if tests is not None and not isinstance(tests, str):
        return Rejected(line, row_id, "field 'tests' must be a string of Python asserts")
    sampling = row.get("sampling")
    if sampling is not None and (reason := _sampling_problem(sampling)):
        return Rejected(line, row_id, reason)
    if row_id is None:
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        row_id = f"h-{digest[:16]}"
    return Prompt(id=row_id, messages=messages, line=line, teacher=teacher, tests=tests, sampling=sampling)


def _builtin_path(source: str) -> str:
    return str(resources.files("avocado_ray.resources").joinpath(f"{source[len(BUILTIN_PREFIX) :]}_prompts.jsonl"))


def _filesystem(source: str, storage=None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a local path or a URI (`file://`, `s3://bucket/key`, `gs://`, ...: whatever
    pyarrow.fs knows; S3 with `storage`'s endpoint and region, else the AWS_* variables)."""
    from avocado_ray.dataplane.rundir import filesystem

    if source.startswith(BUILTIN_PREFIX):
        return pafs.LocalFileSystem(), _builtin_path(source)
    if "://" not in source:
        return pafs.LocalFileSystem(), str(Path(source).absolute())
    try:
        return filesystem(source, storage)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise InputError(f"{source}: cannot open this location: {error}") from None


def input_files(source: str, storage=None) -> tuple[pafs.FileSystem, list[str]]:
    """The files a source names, in a stable order: one file, every JSONL/Parquet file under a folder, or the
    files a glob (`*`, `?`, `[...]` in the last parts of the path) matches."""
    fs, path = _filesystem(source, storage)
    pattern = None
    parts = path.split("/")
    glob_at = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
    if glob_at is not None:
        pattern, path = path, "/".join(parts[:glob_at]) or "/"
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File and pattern is None:
            return fs, [path]
        if info.type != pafs.FileType.Directory:
            raise InputError(f"{source}: cannot read prompts: No such file or directory")
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except (pa.ArrowException, OSError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{source}: cannot read prompts: {error}") from None
    files = sorted(
        f.path
        for f in found
        if f.type == pafs.FileType.File
        and not f.base_name.startswith((".", "_"))
        and (fnmatch.fnmatchcase(f.path, pattern) if pattern else f.base_name.endswith(INPUT_SUFFIXES))
    )
    if not files:
        raise InputError(f"{source}: no prompt files ({', '.join(INPUT_SUFFIXES)}) there")
    return fs, files


def _parquet_rows(fs: pafs.FileSystem, path: str, name: str, max_bytes: int, batch_rows: int):
    """(row number from 1, prompt or rejection) of one Parquet file, scanned in batches by pyarrow.dataset."""
    try:
        batches = ds.dataset(path, filesystem=fs, format="parquet").to_batches(batch_size=batch_rows)
        line = 0
        for batch in batches:
            for row in batch.to_pylist():
                line += 1
                yield line, parse_row({k: v for k, v in row.items() if v is not None}, line, max_bytes)
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{name}: cannot read as Parquet: {error}") from None


def _jsonl_rows(fs: pafs.FileSystem, path: str, name: str, max_bytes: int):
    """(line, prompt or rejection) of every non-empty line of one JSONL file, read as a buffered stream.

    pyarrow's JSON reader is not used: it fails a whole block on one bad line and infers one schema for all
    rows (a `content` that is a string in one row and a list of parts in the next), and every row must be
    turned into a prompt or a dead letter of its own."""
    try:
        stream = io.BufferedReader(fs.open_input_stream(path), buffer_size=READ_BUFFER_BYTES)
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{name}: cannot read prompts: {getattr(error, 'strerror', None) or error}") from None
    with stream:
        for line, raw in enumerate(stream, start=1):
            if raw.strip():
                yield line, parse_line(raw.rstrip(b"\r\n"), line, max_bytes)


def _parsed_rows(source: str, max_bytes: int, batch_rows: int, storage=None):
    """(file, line, prompt or rejection) for every non-empty JSONL line or every Parquet row of a source's files
    (lines and row numbers from 1 in each file)."""
    fs, files = input_files(source, storage)
    for path in files:
        name = source if len(files) == 1 else path
        rows = (
            _parquet_rows(fs, path, name, max_bytes, batch_rows)
            if path.endswith(".parquet")
            else _jsonl_rows(fs, path, name, max_bytes)
        )
        for line, parsed in rows:
            parsed.file = name
            yield line, parsed


class PromptReader:
    """Streams a prompt source in batches of at most `batch_rows` rows, so that memory does not grow with the
    input: every row becomes one prompt or one rejection (duplicate ids after the first are rejected, and so are
    rows over `max_bytes`); ids in `skip` (answered by an earlier attempt of the run) are passed over."""

    def __init__(
        self,
        source: str,
        max_prompts: int | None = None,
        max_bytes: int = MAX_PROMPT_BYTES,
        batch_rows: int = 1000,
        skip: IdSet | None = None,
        storage=None,
    ):
        self.source, self.max_prompts, self.max_bytes, self.batch_rows = source, max_prompts, max_bytes, batch_rows
        self.skip, self.storage = skip, storage
        self.valid = self.rejected = self.skipped = 0  # rows so far: prompts, rejections, answered before

    def batches(self):
        """Yield (prompts, rejections) per batch of rows, in input order."""
        seen = IdSet()
        prompts, rejected = [], []
        for line, parsed in _parsed_rows(self.source, self.max_bytes, self.batch_rows, self.storage):
            if self.max_prompts is not None and self.valid >= self.max_prompts:
                break
            if isinstance(parsed, Prompt) and parsed.id in seen:
                parsed = Rejected(line, parsed.id, f"duplicate id {parsed.id!r}", "duplicate_id", parsed.file)
            if isinstance(parsed, Prompt):
                seen.add(parsed.id)
                self.valid += 1
                if self.skip is not None and parsed.id in self.skip:
                    self.skipped += 1
                else:
                    prompts.append(parsed)
            else:
                self.rejected += 1
                rejected.append(parsed)
            if len(prompts) + len(rejected) >= self.batch_rows:
                yield prompts, rejected
                prompts, rejected = [], []
        if prompts or rejected:
            yield prompts, rejected


def read_prompts(
    source: str, max_prompts: int | None = None, max_bytes: int = MAX_PROMPT_BYTES, storage=None
) -> PromptSet:
    """All of a (small) source at once: for tests; a run (and the dry run) streams with `PromptReader`."""
    result = PromptSet(source=source)
    for prompts, rejected in PromptReader(source, max_prompts, max_bytes, storage=storage).batches():
        result.prompts += prompts
        result.rejected += rejected
    return result
