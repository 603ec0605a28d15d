"""The docs against the code they describe: the sample schema's column table, and links between the docs.

Pure Python: no Ray, no engines; it reads files and the pyarrow schema only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from avocado_ray.dataplane.schema import SAMPLE_SCHEMA, SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]
DATA_SCHEMA = ROOT / "docs" / "data-schema.md"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def column_table(text: str) -> dict[str, str]:
    """Column name -> Arrow type of the doc's teacher-sample table (the one headed `| column | Arrow type |`)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*column\s*\|\s*Arrow type\s*\|", line))
    columns = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        assert cells[0] not in columns, f"column {cells[0]} listed twice"
        columns[cells[0]] = cells[1]
    return columns


def schema_problems(text: str, schema=SAMPLE_SCHEMA) -> list[str]:
    """Where the doc's column table and the schema disagree: missing or extra columns, wrong types."""
    documented = column_table(text)
    problems = [f"{f.name}: not in the table" for f in schema if f.name not in documented]
    problems += [
        f"{f.name}: table says {documented[f.name]!r}, schema has {str(f.type)!r}"
        for f in schema
        if f.name in documented and documented[f.name] != str(f.type)
    ]
    problems += [f"{name}: in the table, not in the schema" for name in documented if name not in schema.names]
    return problems


def test_every_sample_column_is_in_the_data_schema_doc_with_its_arrow_type():
    assert schema_problems(DATA_SCHEMA.read_text()) == []


def test_the_column_check_finds_a_missing_column_a_wrong_type_and_an_extra_column():
    text = DATA_SCHEMA.read_text()
    without = "\n".join(line for line in text.splitlines() if not line.startswith("| `latency_s` |"))
    assert schema_problems(without) == ["latency_s: not in the table"]
    retyped = text.replace("| `replica` | `int32` |", "| `replica` | `int64` |")
    assert schema_problems(retyped) == ["replica: table says 'int64', schema has 'int32'"]
    assert schema_problems(text, SAMPLE_SCHEMA.remove(SAMPLE_SCHEMA.get_field_index("scorer"))) == [
        "scorer: in the table, not in the schema"
    ]


def test_the_data_schema_doc_names_the_current_schema_version():
    assert f"the current version is `{SCHEMA_VERSION}`" in DATA_SCHEMA.read_text()


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.MULTILINE)}


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_relative_links_reach_a_file_and_heading(doc):
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no such heading in {linked.name}")
    assert broken == []
