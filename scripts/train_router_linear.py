#!/usr/bin/env python3
"""Train the `linear` router classifier (avocado_ray/routing/linear.py) on the DEV half of the labelled prompts
and write avocado_ray/resources/router_linear.npz. The test half is never read here.

Model: scikit-learn's LinearSVC (C=1, an intercept) over the binary, L2-normalised hashed byte n-grams of
`feature_buckets`, classes code / math / general. Training targets: a row's domain; Chinese rows are "general"
(not code) unless they are Chinese around a command (domain code); rows that accept code as a second domain (a
manual section naming commands and options) are "code". These choices, the n-gram lengths (1-4), the 2**16
buckets and C were picked by 5-fold cross-validation on the dev half grouped by source file (as the test half is
split), never by the test half.

How to rerun (scikit-learn is needed here only, not at run time):
    .venv/bin/pip install scikit-learn==1.9.1
    .venv/bin/python scripts/train_router_linear.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sparse
from sklearn.svm import LinearSVC

from avocado_ray.resources.labelled import labelled_prompts
from avocado_ray.routing.linear import BUCKET_BITS, WEIGHTS, feature_buckets

OUT = Path(__file__).resolve().parent.parent / "avocado_ray" / "resources" / WEIGHTS


def target(row: dict) -> str:
    """What the model should answer for a dev row (see the module's docstring)."""
    if "code" in row.get("accept", ()) or row["domain"] == "code":
        return "code"
    return "general" if row["domain"] == "chinese" else row["domain"]


def features(texts: list[str]) -> sparse.csr_matrix:
    rows = [feature_buckets(text) for text in texts]
    indptr = np.cumsum([0] + [len(r) for r in rows])
    data = np.concatenate([np.full(len(r), 1 / np.sqrt(max(len(r), 1))) for r in rows])
    return sparse.csr_matrix((data, np.concatenate(rows), indptr), shape=(len(rows), 1 << BUCKET_BITS))


def main() -> None:
    dev = labelled_prompts("dev")
    x, y = features([row["prompt"] for row in dev]), np.array([target(row) for row in dev])
    model = LinearSVC(C=1.0, max_iter=20000, random_state=0).fit(x, y)
    fit = float((model.predict(x) == y).mean())
    np.savez_compressed(
        OUT,
        weights=np.ascontiguousarray(model.coef_.T.astype(np.float32)),  # a bucket's class weights side by side
        intercept=model.intercept_.astype(np.float32),
        classes=np.array(model.classes_, dtype=str),
    )
    print(f"trained on {len(dev)} dev prompts: classes {list(model.classes_)}, fit {fit:.4f}; wrote {OUT}")


if __name__ == "__main__":
    main()
