"""Reading prompt files: every non-empty input line becomes exactly one prompt or one rejection.

Input rows are JSON objects with an optional `id`, and either `prompt` (a string) or `messages`
(OpenAI-style chat), plus an optional `teacher` that overrides routing. A row without an id gets a
stable one, a hash of its content. Malformed rows are rejected with the line and the reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


@dataclass
class Prompt:
    """One valid input row."""

    id: str
    messages: list[dict]
    line: int
    teacher: str | None = None
    tests: str | None = None  # Python asserts for the code_tests scorer

    @property
    def text(self) -> str:
        """All message text, for classification."""
        return "\n".join(part for m in self.messages for part in _text_parts(m["content"]))


@dataclass
class Rejected:
    """One input row that will not be answered, and why."""

    line: int
    id: str | None
    reason: str
    code: str = "bad_row"  # short kind of reason, for counts: bad_row, duplicate_id, unknown_teacher, too_long


@dataclass
class PromptSet:
    """What a prompt file holds: valid prompts and rejected rows, in input order."""

    source: str
    prompts: list[Prompt] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


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


def parse_line(raw: bytes, line: int) -> Prompt | Rejected:
    """Turn one JSONL line into a prompt, or a rejection that says why."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        return Rejected(line, None, f"invalid UTF-8 at byte {error.start}")
    except json.JSONDecodeError as error:
        return Rejected(line, None, f"invalid JSON: {error.msg} at column {error.colno}")
    return parse_row(row, line)


def parse_row(row, line: int) -> Prompt | Rejected:
    """Turn one decoded row (from JSONL or Parquet) into a prompt, or a rejection that says why."""
    if not isinstance(row, dict):
        return Rejected(line, None, "row must be a JSON object")
    row_id = row.get("id")
    if row_id is not None and not isinstance(row_id, (str, int)):
        return Rejected(line, None, "field 'id' must be a string or an integer")
    row_id = None if row_id is None else str(row_id)
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
    if row_id is None:
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        row_id = f"h-{digest[:16]}"
    return Prompt(id=row_id, messages=messages, line=line, teacher=teacher, tests=tests)


def _parsed_rows(source: str):
    """(line, prompt or rejection) for every non-empty JSONL line or every Parquet row (row numbers from 1)."""
    if source.endswith(".parquet"):
        import pyarrow.parquet as pq

        for line, row in enumerate(pq.read_table(source).to_pylist(), start=1):
            yield line, parse_row({k: v for k, v in row.items() if v is not None}, line)
        return
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        data = resources.files("avocado_ray.resources").joinpath(f"{name}_prompts.jsonl").read_bytes()
    else:
        data = Path(source).read_bytes()
    for line, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            yield line, parse_line(raw, line)


def read_prompts(source: str, max_prompts: int | None = None) -> PromptSet:
    """Read a JSONL or Parquet prompt file (or `builtin:NAME`); duplicate ids after the first are rejected."""
    result = PromptSet(source=source)
    seen: set[str] = set()
    for line, parsed in _parsed_rows(source):
        if max_prompts is not None and len(result.prompts) >= max_prompts:
            break
        if isinstance(parsed, Prompt) and parsed.id in seen:
            parsed = Rejected(line, parsed.id, f"duplicate id {parsed.id!r}", "duplicate_id")
        if isinstance(parsed, Prompt):
            seen.add(parsed.id)
            result.prompts.append(parsed)
        else:
            result.rejected.append(parsed)
    return result
