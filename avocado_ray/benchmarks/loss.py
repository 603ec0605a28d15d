"""The loss benchmark: memory of the chunked loss + backward against full logits, and their agreement."""

from __future__ import annotations

import time

from avocado_ray.benchmarks.common import Benchmark, in_fresh_process

LOSS_WEIGHTS = {"supervised": 1.0, "forward_kl": 1.0}  # the bench's loss: top-k distillation, supervised fallback


def _loss_case(tokens: int, vocab: int, hidden: int, k: int, seed: int = 0):
    """Hidden states, an output weight, teacher top-k targets (a fifth of the rows without a teacher) and a mask."""
    import torch

    from avocado_ray.training.losses import Targets

    torch.manual_seed(seed)
    h = torch.randn(tokens, hidden).requires_grad_()
    w = torch.randn(vocab, hidden).div_(hidden**0.5).requires_grad_()  # in place: no second copy in the RSS peak
    targets = Targets(
        labels=torch.randint(vocab, (tokens,)),
        topk_ids=torch.randint(vocab, (tokens, k)),  # repeats within a row are rare at this vocabulary
        topk_logprobs=torch.log_softmax(torch.randn(tokens, k), -1) - 0.05,
        distill=torch.rand(tokens) > 0.2,
    )
    return h, w, targets, torch.ones(tokens, dtype=torch.bool)


def _loss_and_grads(side: str, case: tuple, chunk_tokens: int):
    """Loss + backward of one side: `mix` of the full logits (naive) or `chunked_mix` (chunked)."""
    from avocado_ray.training.losses import LossOptions, chunked_mix, mix

    h, w, targets, mask = case
    options = LossOptions(chunk_tokens=chunk_tokens)
    if side == "naive":
        loss = mix(h @ w.T, targets, mask, LOSS_WEIGHTS, options).total
    else:
        loss = chunked_mix(h, w, targets, mask, LOSS_WEIGHTS, options).total
    loss.backward()
    return loss


def _tracked_peak_mb(side: str, tokens: int, vocab: int, hidden: int, k: int, chunk_tokens: int) -> float:
    """Peak MB of live tensors during one side's loss + backward beyond its inputs, as torch's MemTracker counts
    them under FakeTensorMode (shapes without storage: nothing is allocated or computed)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        case = _loss_case(tokens, vocab, hidden, k)
        tracker = MemTracker()
        tracker.track_external(*case[:2])
        with tracker:
            _loss_and_grads(side, case, chunk_tokens)
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    inputs = sum(t.numel() * t.element_size() for t in case[:2])
    return (peak - inputs) / 2**20


def _loss_side(side: str, tokens: int, vocab: int, hidden: int, k: int, chunk_tokens: int, out: str) -> dict:
    """One side for real in this (fresh) process: returns the peak RSS delta and seconds of its loss + backward,
    and saves the loss and gradients to `out`."""
    import resource

    import torch

    case = _loss_case(tokens, vocab, hidden, k)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    loss = _loss_and_grads(side, case, chunk_tokens)
    seconds = time.perf_counter() - started
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # ru_maxrss is in KiB
    torch.save({"loss": loss.detach(), "h": case[0].grad, "w": case[1].grad}, out)
    return {"rss_mb": round(peak_mb), "s": round(seconds, 2)}


def _bench_loss(
    tokens: int = 8192,
    vocab: int = 151_936,
    hidden: int = 1024,
    k: int = 20,
    chunk_tokens: int = 1024,
    check_tokens: int = 2048,
) -> dict:
    """Memory of the distillation loss + backward over `tokens` answer positions with full logits (`mix` of
    hidden @ W^T, "naive") against the chunked loss (`chunked_mix`), on the same inputs.

    Peaks at `tokens` are counted by torch's MemTracker on fake tensors (the naive side needs about 11 GB there, more
    than a shared 24 GB machine spares). At `check_tokens` both sides also run for real, each in a fresh process:
    the peak RSS delta checks the tracker's count, and the loss and gradients of the two are compared.
    The loss's memory is its peak beyond the inputs (hidden states, weight) and the gradients it returns for them,
    which any implementation holds; the ratio with those included is reported too.
    """
    import tempfile

    import torch

    shape = {"tokens": tokens, "vocab": vocab, "hidden": hidden, "k": k, "chunk_tokens": chunk_tokens}
    peaks = {side: _tracked_peak_mb(side, **shape) for side in ("naive", "chunked")}
    check = {**shape, "tokens": check_tokens}
    real, results = {}, {}
    with tempfile.TemporaryDirectory(prefix="avocado-bench-loss-") as folder:
        for side in ("naive", "chunked"):
            out = f"{folder}/{side}.pt"
            real[side] = in_fresh_process(_loss_side, side, **check, out=out)
            real[side]["tracked_mb"] = round(_tracked_peak_mb(side, **check))
            results[side] = torch.load(out)
    inputs_mb = (tokens + vocab) * hidden * 4 / 2**20  # float32 hidden states and weight; their gradients alike
    loss_mb = {side: peak - inputs_mb for side, peak in peaks.items()}  # peaks count the gradients, not the inputs
    naive, chunked = results["naive"], results["chunked"]
    diffs = {name: float((chunked[name] - naive[name]).abs().max() / naive[name].abs().max()) for name in naive}
    return {
        "benchmark": "loss",
        **shape,
        "losses": LOSS_WEIGHTS,
        "memory": "peak MB of live tensors in loss + backward beyond the inputs (hidden states, weight) and the "
        "gradients returned for them: torch MemTracker under FakeTensorMode",
        "naive_peak_mb": round(loss_mb["naive"]),
        "chunked_peak_mb": round(loss_mb["chunked"]),
        "ratio": round(loss_mb["chunked"] / loss_mb["naive"], 4),
        "inputs_mb": round(inputs_mb),
        "gradients_mb": round(inputs_mb),
        "ratio_with_inputs_and_gradients": round((peaks["chunked"] + inputs_mb) / (peaks["naive"] + inputs_mb), 4),
        "check": {
            "tokens": check_tokens,
            "memory": "peak RSS delta of a fresh process over its loss + backward (rss_mb, beyond the inputs, the "
            "gradients included) beside the tracker's count of the same (tracked_mb)",
            **{side: real[side] for side in ("naive", "chunked")},
        },
        "max_rel_diff": max(diffs.values()),
        "rel_diff": {"loss": diffs["loss"], "grad_hidden": diffs["h"], "grad_weight": diffs["w"]},
        "rel_diff_is": "max |chunked - naive| / max |naive|, for the loss and each gradient",
        "torch_threads": torch.get_num_threads(),
    }


BENCHMARK = Benchmark(
    "loss",
    _bench_loss,
    "memory of the chunked loss + backward against full logits at a 151,936 vocabulary, and their agreement",
)
