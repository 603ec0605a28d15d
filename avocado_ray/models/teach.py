"""A short causal-LM training of the tiny teachers on text of their domains (and some other text), so that they
know something.

A randomly initialised teacher answers every prompt with noise, and a student distilled from noise shows
nothing. Trained here for a fixed number of AdamW steps (about a minute on 2 CPU cores, see docs/training.md),
each teacher answers in its domain's style: the Qwen-family teacher with Python code and Chinese, Gemma with
English prose, gpt-oss with worked arithmetic in its harmony channels (reasoning, then the answer). The text is
real and ships offline (corpus.py: the standard library's sources, its help topics, its codec test text);
arithmetic is generated. Every example is a chat in the teacher's own template: a piece of text as the user
turn and the text that follows it as the assistant turn (for arithmetic: a question and its worked answer),
with the loss on the answer and its end token only, exactly as the student's trainer encodes samples
(`SampleEncoder`).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

from avocado_ray.models import corpus

TRAIN_STEPS = 150  # the default; the cached `NAME-trained` teachers are trained this many steps
# What each teacher is trained on: kinds of example and their weights. Its own domains most, and other text too:
# a real teacher is a general model with strengths, and a tiny one that never saw English (or Chinese) answers
# such a prompt by looping its commonest token ("the the the") or its template ("The answer is 14."), text any
# student predicts almost for free (docs/training.md).
TEACHER_MIX: dict[str, dict[str, int]] = {
    "qwen": {"code": 3, "chinese": 3, "english": 1},
    "gemma": {"english": 6, "code": 1, "chinese": 1},
    "gptoss": {"arithmetic": 3, "english": 1, "chinese": 1},
}
RECORD = "avocado_training.json"  # in a trained model's folder: steps, seconds, losses, mix
BATCH_SIZE, LR, MAX_SEQ_LEN = 16, 3e-3, 256
# characters of (user turn, assistant turn) cut from each corpus; Chinese packs more per character
CHARS = {"code": (240, 200), "english": (240, 200), "chinese": (60, 60)}


@cache
def _lines(domain: str) -> list[str]:
    sources = {"code": corpus.code_corpus, "english": corpus.english_corpus, "chinese": corpus.chinese_corpus}
    return [line for line in sources[domain]().splitlines(keepends=True) if line.strip()]


def _take(lines: list[str], start: int, chars: int) -> tuple[str, int]:
    """Whole lines from `start` up to `chars` characters (at least one line, cut if longer); returns the end."""
    text, end = "", start
    while end < len(lines) and (not text or len(text) + len(lines[end]) <= chars):
        text += lines[end]
        end += 1
    return text[:chars].strip("\n"), end


def continuation(domain: str, rng: random.Random) -> tuple[str, str]:
    """A (user, assistant) pair from a corpus: a run of lines and the lines that follow it."""
    lines = _lines(domain)
    prompt_chars, answer_chars = CHARS[domain]
    prompt, end = _take(lines, rng.randrange(max(len(lines) - 1, 1)), prompt_chars)
    answer, _ = _take(lines, end % len(lines), answer_chars)
    return prompt, answer


_NAMES = ("Ann", "Bob", "Carla", "Dev", "Mei", "Omar")
_THINGS = ("apples", "books", "coins", "marbles", "pencils", "stamps")


# gpt-oss's harmony turn: reasoning in the analysis channel, the answer in the final channel (after the
# `<|start|>assistant` of the generation prompt); vLLM's `openai_gptoss` parser splits them again.
HARMONY = (
    "<|channel|>analysis<|message|>{work}<|end|><|start|>assistant<|channel|>final<|message|>The answer is {result}."
)


def arithmetic(rng: random.Random) -> tuple[str, str]:
    """A generated arithmetic question (sums, products, division, linear equations, word problems) and its
    worked answer, written as gpt-oss writes: the working as reasoning, then the result."""
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 20)
    name, things = rng.choice(_NAMES), rng.choice(_THINGS)
    question, work, result = [
        (f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", a + b),
        (f"Calculate {a}*{c} - {b}.", f"{a}*{c} = {a * c}, and {a * c} - {b} = {a * c - b}.", a * c - b),
        (f"What is {a * c} divided by {c}?", f"{a * c} / {c} = {a}.", a),
        (
            f"Solve {c}*x + {b} = {c * a + b} for x.",
            f"{c}*x = {c * a + b} - {b} = {c * a}, so x = {c * a}/{c} = {a}.",
            a,
        ),
        (
            f"{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?",
            f"{a} + {b} = {a + b}, so {name} has {a + b} {things}.",
            a + b,
        ),
    ][rng.randrange(5)]
    return question, HARMONY.format(work=work, result=result)


PAIRS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "code": lambda rng: continuation("code", rng),
    "english": lambda rng: continuation("english", rng),
    "chinese": lambda rng: continuation("chinese", rng),
    "arithmetic": arithmetic,
}


def examples(mix: dict[str, int], count: int, rng: random.Random) -> list[dict]:
    """`count` chat samples, as the trainer's `SampleEncoder` reads them, of kinds drawn by the `mix` weights."""
    kinds, weights = list(mix), list(mix.values())
    rows = []
    for _ in range(count):
        prompt, answer = PAIRS[rng.choices(kinds, weights)[0]](rng)
        rows.append({"messages": json.dumps([{"role": "user", "content": prompt}]), "answer": answer})
    return rows


def train_teacher(folder: Path, mix: dict[str, int], steps: int, seed: int) -> dict:
    """Train the model in `folder` in place with plain AdamW for `steps` steps (one-cycle learning rate) on
    examples of the `mix`; writes and returns the training record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from avocado_ray.config import TrainerConfig
    from avocado_ray.training.batching import SampleEncoder
    from avocado_ray.training.losses import CausalLMLoss, LossOptions
    from avocado_ray.training.student import micro_loss

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    encoder = SampleEncoder(tokenizer, TrainerConfig(max_seq_len=MAX_SEQ_LEN))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps, pct_start=0.1)
    losses, started, cpu_started = [], time.monotonic(), time.process_time()
    for _ in range(steps):
        micro = encoder.collate(examples(mix, BATCH_SIZE, rng))
        mixed = micro_loss(CausalLMLoss(model), micro, {"supervised": 1.0}, LossOptions())
        loss = mixed.total / max(micro.tokens, 1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.save_pretrained(folder)
    tail = losses[-10:]
    record = {
        "steps": steps,
        "mix": mix,
        "seconds": round(time.monotonic() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),  # all threads; wall time on a busy machine varies
        "first_loss": round(losses[0], 4),
        "last_loss": round(sum(tail) / len(tail), 4),  # mean of the last 10 steps
    }
    (folder / RECORD).write_text(json.dumps(record) + "\n")
    return record


def training_record(folder: Path) -> dict | None:
    """The training record of a trained teacher's folder, None if it was not trained (or not finished)."""
    path = folder / RECORD
    return json.loads(path.read_text()) if path.is_file() else None
