"""The Arrow schema of a teacher sample: the one format teacher outputs travel and rest in.

Its columns, version and shards are described in docs/data-schema.md (tests/test_docs.py keeps the two in step).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "3"  # 2: the reasoning column; 3: answer_token_start
VERSION_KEY = b"avocado_ray.schema_version"

CANDIDATE = pa.struct(
    [
        pa.field("teacher", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("reason", pa.string()),
    ]
)

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("teacher", pa.string(), nullable=False),
        pa.field("replica", pa.int32()),
        pa.field("messages", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("reasoning", pa.string()),
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("answer_token_start", pa.int32()),
        pa.field("token_logprobs", pa.list_(pa.float16())),
        pa.field("topk_ids", pa.list_(pa.list_(pa.int32()))),
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float16()))),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("latency_s", pa.float32()),
        pa.field("scorer", pa.string()),
        pa.field("candidates", pa.list_(CANDIDATE)),
    ],
    metadata={VERSION_KEY: SCHEMA_VERSION.encode()},
)


class SchemaVersionError(ValueError):
    """Data written under another schema version than this code reads."""


def check_schema_version(schema: pa.Schema, source: str) -> None:
    """Refuse data of another schema version, naming both versions and the source."""
    found = (schema.metadata or {}).get(VERSION_KEY, b"none").decode()
    if found != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{source}: teacher-sample schema version {found}, but this avocado-ray reads version {SCHEMA_VERSION}"
        )


def samples_to_batch(rows: list[dict]) -> pa.RecordBatch:
    """Build a record batch of samples from row dicts (keys: the schema's column names; missing keys are null)."""
    columns = {field.name: [row.get(field.name) for row in rows] for field in SAMPLE_SCHEMA}
    return pa.RecordBatch.from_pydict(columns, schema=SAMPLE_SCHEMA)
