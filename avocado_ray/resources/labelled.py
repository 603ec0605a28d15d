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
    heldout = [row for name in ("router_heldout.jsonl", "router_heldout_cjk.jsonl") for row in _split(name, split)]
    return (_read("router_eval.jsonl") if split == "dev" else []) + heldout


def requests_in_words(split: str = "dev") -> list[dict]:
    """Short requests and questions written in words, as people type them to a chat model
    (router_heldout_requests.jsonl): code (the questions of perlfaq3-9 and the Python FAQ), general (WordNet's
    example questions, the GNOME Help's page titles, the Ding dictionary's questions, TruthfulQA's questions) and
    math (GSM8K's word problems), split by source file (Ding by a hash of the entry, TruthfulQA by category, GSM8K
    by its train and test files). Kept apart from `labelled_prompts`, whose test half the router's accuracy
    targets were set on; reported on their own by `bench router`. Many of the code ones name no language ("How do
    I find yesterday's date?"): code only beside their FAQ."""
    return _split("router_heldout_requests.jsonl", split)


def changelogs() -> list[dict]:
    """English paragraphs of Debian changelogs and NEWS files (router_dev_changelogs.jsonl), labelled general: a
    project's history told in prose around the names of its files, options and people, which a classifier of code by
    its shape may take for code. Dev only, for training and tuning: one file per Debian source package, none of a source
    package that a test half comes from (the test halves hold a few such paragraphs, with Han names)."""
    return _read("router_dev_changelogs.jsonl")


def _split(name: str, split: str) -> list[dict]:
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', not {split!r}")
    return [row for row in _read(name) if row["split"] == split]


def _read(name: str) -> list[dict]:
    text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
