#!/usr/bin/env python3
"""Train the `linear` router classifier (avocado_ray/routing/linear.py) on the DEV half of the labelled prompts, of
the requests and questions in words and on the Debian changelog paragraphs (all dev), and write
avocado_ray/resources/router_linear.npz. No test half is read.

Model: scikit-learn's LinearSVC (C=1, an intercept) over the byte n-grams of `feature_columns` (single bytes
present, hashed 2-4-grams counted, divided by the square root of their number), classes code / math / general.
Training targets: a row's domain; Chinese rows are "general" (not code) unless they are Chinese around a command
(domain code); rows that accept code as a second domain (a manual section naming commands and options) are "code";
the requests and questions in words have their domain (code: perlfaq and Python FAQ questions; general: WordNet,
GNOME Help, Ding, TruthfulQA; math: GSM8K word problems); the changelog paragraphs are general.
These choices, the n-gram lengths (1-4), the 2**16 buckets and C were picked by 5-fold cross-validation on the dev
half grouped by source file (as the test half is split), never by the test half; `--cv` prints that comparison
for the training sets (the labelled prompts alone, with the requests, with the changelogs too) and the rules'
vocabulary of requests for code asked in no, every or one-line prompts. Counting grams instead of marking them
present was chosen for speed (no sort: 1.5 times the rate) at a cost on the labelled prompts (measured before the
rules' code markers were asked: 28 errors against 22 there, 151 against 152 on the requests, 13 and 13 on the
changelogs). Leaving out the words that
open a question was chosen on a spot check of everyday questions instead (the cross-validation, whose code
questions mostly open with "how do I", scores it worse).

How to rerun (scikit-learn is needed here only, not at run time):
    .venv/bin/pip install scikit-learn==1.9.1
    .venv/bin/python scripts/train_router_linear.py [--cv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.sparse as sparse
from sklearn.model_selection import GroupKFold
from sklearn.svm import LinearSVC

from avocado_ray.config import config_path, load_config
from avocado_ray.resources.labelled import changelogs, labelled_prompts, requests_in_words
from avocado_ray.routing.linear import FEATURES, WEIGHTS, LinearClassifier, feature_columns

OUT = Path(__file__).resolve().parent.parent / "avocado_ray" / "resources" / WEIGHTS


def target(row: dict) -> str:
    """What the model should answer for a dev row (see the module's docstring)."""
    if "code" in row.get("accept", ()) or row["domain"] == "code":
        return "code"
    return "general" if row["domain"] == "chinese" else row["domain"]


def features(texts: list[str]) -> sparse.csr_matrix:
    rows = [feature_columns(text) for text in texts]
    indptr = np.cumsum([0] + [len(r) for r in rows])
    data = np.concatenate([np.full(len(r), 1 / np.sqrt(max(len(r), 1))) for r in rows])
    matrix = sparse.csr_matrix((data, np.concatenate(rows), indptr), shape=(len(rows), FEATURES))
    matrix.sum_duplicates()  # a bucket's grams counted together
    return matrix


def fit(x: sparse.csr_matrix, y: np.ndarray) -> LinearSVC:
    return LinearSVC(C=1.0, max_iter=20000, random_state=0).fit(x, y)


def routed(rows: list[dict], model_domains: list[str], vocabulary: str) -> list[str]:
    """The routing domain of each row as LinearClassifier labels it from the model's domains, with the rules'
    vocabulary of requests for code asked in no prompt, in every prompt, or in one-line requests (the default)."""
    classifier, routing = LinearClassifier(), load_config(config_path("builtin:local"), check_paths=False).routing
    asks = {"none": False, "all": True, "one-line": None}[vocabulary]
    out = []
    for row, domain in zip(rows, model_domains):
        found = routing.domain_of(classifier.labels_given(row["prompt"], domain, vocabulary=asks))
        out.append(row["domain"] if found in row.get("accept", ()) else found)
    return out


def cross_validate(dev: list[dict], changelog_rows: list[dict], requests: list[dict]) -> None:
    """Errors on the labelled dev prompts, on the changelog paragraphs and on the dev requests and questions in
    words, each prompt scored only in the fold that held it out (5 folds grouped by source), for the choices of the
    module's docstring: which sets the model is trained with, where the rules' vocabulary is asked."""
    rows = dev + changelog_rows + requests
    x, y = features([row["prompt"] for row in rows]), np.array([target(row) for row in rows])
    groups = [row["source"] for row in rows]
    kind = np.array(["labelled"] * len(dev) + ["changelogs"] * len(changelog_rows) + ["requests"] * len(requests))
    for trained_with in (("labelled",), ("labelled", "requests"), ("labelled", "requests", "changelogs")):
        predicted = np.empty(len(rows), dtype=object)
        for train, held in GroupKFold(n_splits=5).split(x, y, groups):
            train = train[np.isin(kind[train], trained_with)]
            predicted[held] = fit(x[train], y[train]).predict(x[held])
        for vocabulary in ("none", "all", "one-line"):
            wrong = np.array([d != row["domain"] for d, row in zip(routed(rows, list(predicted), vocabulary), rows)])
            missed = {
                domain: int(wrong[(kind == "requests") & (y == domain)].sum()) for domain in ("code", "general", "math")
            }
            print(
                f"trained with {'+'.join(trained_with):25} vocabulary {vocabulary:9}: errors on {len(dev)} labelled "
                f"dev prompts {wrong[kind == 'labelled'].sum()}, on {len(changelog_rows)} changelog paragraphs "
                f"{wrong[kind == 'changelogs'].sum()}; of {len(requests)} requests {missed} wrong"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cv", action="store_true", help="print the grouped cross-validation, write nothing")
    dev, changelog_rows, requests = labelled_prompts("dev"), changelogs(), requests_in_words("dev")
    if parser.parse_args().cv:
        cross_validate(dev, changelog_rows, requests)
        return
    rows = dev + changelog_rows + requests
    x, y = features([row["prompt"] for row in rows]), np.array([target(row) for row in rows])
    model = fit(x, y)
    np.savez_compressed(
        OUT,
        weights=np.ascontiguousarray(model.coef_.T.astype(np.float32)),  # a bucket's class weights side by side
        intercept=model.intercept_.astype(np.float32),
        classes=np.array(model.classes_, dtype=str),
    )
    accuracy = float((model.predict(x) == y).mean())
    print(f"trained on {len(rows)} dev prompts: classes {list(model.classes_)}, fit {accuracy:.4f}; wrote {OUT}")


if __name__ == "__main__":
    main()
