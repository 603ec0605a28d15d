"""What the benchmarks share: the registry entry, stdout kept for the one JSON object, synthetic samples."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class Benchmark(NamedTuple):
    """One `avocado-ray bench NAME`: its function (keyword options, such as `prompts`, to one JSON-able dict) and
    its line of help."""

    name: str
    run: Callable[..., dict]
    help: str


def _synthetic_samples(count: int, tokens: int, k: int, vocab: int, seed: int = 0) -> list[dict]:
    """Teacher samples shaped like real ones: token ids drawn Zipf-like over the vocabulary (as token
    frequencies in text are), top-k logprobs decreasing by rank."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        ids = ((rng.zipf(1.2, size=(tokens, k)) - 1) % vocab).astype(np.int32)
        top1 = -rng.exponential(0.5, size=(tokens, 1))
        logprobs = (top1 - np.cumsum(rng.exponential(0.4, size=(tokens, k)), axis=1) + 0.4).clip(max=0)
        samples.append(
            dict(
                sample_id=f"p{i}:t",
                prompt_id=f"p{i}",
                domain="general",
                labels=["general"],
                teacher="t",
                replica=0,
                messages=json.dumps([{"role": "user", "content": f"prompt {i}"}]),
                answer="x " * tokens,
                token_ids=ids[:, 0].tolist(),
                token_logprobs=logprobs[:, 0].tolist(),
                topk_ids=ids.tolist(),
                topk_logprobs=logprobs.tolist(),
                finish_reason="length",
                prompt_tokens=16,
                latency_s=0.1,
            )
        )
    return samples


def in_fresh_process(function: Callable[..., dict], *args, **kwargs) -> dict:
    """`function(*args, **kwargs)` (JSON-able arguments) in a fresh Python process, for figures that are a
    process's own (peak memory, imports, an environment read once): the dict it returns, from the last line of its
    stdout."""
    import subprocess
    import sys

    code = (
        f"import json, sys; from {function.__module__} import {function.__name__}; "
        f"args, kwargs = json.loads(sys.argv[1]); print(json.dumps({function.__name__}(*args, **kwargs)))"
    )
    call = json.dumps([args, kwargs])
    done = subprocess.run([sys.executable, "-c", code, call], stdout=subprocess.PIPE, check=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stdout_on_stderr(bench):
    """`bench` with file descriptor 1 on stderr: DeepSpeed's logs and op builds (and vLLM's) print to stdout,
    which stays for the one JSON object."""
    import functools

    @functools.wraps(bench)
    def run(**options) -> dict:
        import os
        import sys

        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        try:
            return bench(**options)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)

    return run
