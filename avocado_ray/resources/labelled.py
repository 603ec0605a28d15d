"""Labelled prompts: real prompts of every domain with their true domain, shipped as package data (the
router_*.jsonl files beside this module, built by scripts/build_router_eval.py), so that the benchmarks and the
quality check run from an installed package too."""

from __future__ import annotations

import json
from importlib import resources


def labelled_prompts(split: str = "dev") -> list[dict]:
    """Real prompts of every domain with their true domain.

    'dev': router_eval.jsonl, which the rules were written against, and the dev halves of router_heldout.jsonl
    (code, math, general) and router_heldout_cjk.jsonl (Chinese poetry, sayings, manuals, the Debian Reference and
    UI phrases; Japanese, Korean and English with Han names), used to tune them since. 'test': the other halves
    (other files, modules, seeds and request wordings than router_eval.jsonl, other sources than the dev halves),
    never used to tune the rules, only to report them.
    """
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', not {split!r}")

    def read(name: str) -> list[dict]:
        text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    heldout = [
        row
        for name in ("router_heldout.jsonl", "router_heldout_cjk.jsonl")
        for row in read(name)
        if row["split"] == split
    ]
    return (read("router_eval.jsonl") if split == "dev" else []) + heldout
