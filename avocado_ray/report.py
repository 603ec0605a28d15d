"""What a run did, from its files alone: `report.html` with plots, and a cheap status read.

Both read only what a run writes (`summary.json`, `metrics.jsonl`, the shards' sidecars), so they work on a
finished run, on a run still writing, and offline on a copied run directory, without Ray or the config. A run
directory on object storage is named by its URI (the endpoint from AWS_ENDPOINT_URL, credentials from the
environment).
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.fs as pafs

from avocado_ray.dataplane.rundir import (
    METRICS,
    PARTS,
    PLAN,
    REPORT,
    REPORT_PLOTS,
    SAMPLES,
    SUMMARY,
    TEMP_SUFFIX,
    TRAINED_IDS,
    RunDir,
)
from avocado_ray.dataplane.spill import committed, complete_shards, sample_counts, sidecar_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ACTIVE_S = 300  # a run with no file written for this long is not known to be running
THROUGHPUT_BINS = 30


def read_metrics(source: Path | RunDir) -> list[dict]:
    """Records of a metrics file, or of a run's `metrics.jsonl` (on object storage: its processes' parts, in time
    order); a line being appended while we read (no newline yet, torn JSON) is skipped."""
    if isinstance(source, RunDir):
        text = source.read_log(METRICS)
    else:
        text = source.read_text() if source.is_file() else ""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if isinstance(source, RunDir) and not source.local:
        records.sort(key=lambda r: r.get("time", 0))
    return records


def _of_kind(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r.get("kind") == kind]


def train_steps(records: list[dict]) -> list[dict]:
    """The student's lineage, one record per step: a resumed run retrains the steps after its last checkpoint and
    logs them again, and the last try is the one the student kept (as the pipeline's summary counts them)."""
    by_step = {r["step"]: r for r in _of_kind(records, "train")}
    return [by_step[step] for step in sorted(by_step)]


def _run_dir(run_dir: str | Path) -> RunDir:
    run = RunDir(run_dir)
    if run.info("").type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{run}: no such run directory")
    return run


def _last_write(run: RunDir) -> float | None:
    """Newest modification time among the files a run keeps writing while it works (metrics, shards)."""
    infos = [run.info(METRICS), run.info(TRAINED_IDS), *run.list(METRICS + PARTS)]
    infos += run.list(SAMPLES)  # open shards (.tmp) too: they grow while teachers answer
    times = [i.mtime_ns / 1e9 for i in infos if i.type == pafs.FileType.File]
    return max(times, default=None)


def _shards_on_disk(samples: RunDir) -> dict:
    """Rows in complete shards from their sidecars: no sample read, and unlike `complete_shards` nothing is checked
    or renamed, so `status` stays read-only."""
    names = committed(samples)
    rows = sum(json.loads(samples.read_text(sidecar_name(name)))["rows"] for name in names)
    return {"samples_on_disk": rows, "shards": len(names)}


def _matches_files(summary: dict, status: dict, open_shards: bool) -> bool:
    """Whether summary.json describes the files on disk. It is the last file a run writes, but a resumed run keeps
    the previous run's summary until it ends, so its existence alone does not mean the run is over; file times do
    not tell either, since copying a run directory resets them."""
    if open_shards or summary.get("samples_out", status["samples_on_disk"]) != status["samples_on_disk"]:
        return False
    if "train_steps" not in summary:
        return True
    return summary["train_steps"] == status["steps_trained"] and status["training_ended"]


def run_status(run_dir: str | Path) -> dict:
    """Progress of a running or finished run, read-only: state, samples on disk, steps trained, last loss.

    `finished`: summary.json matches the files (samples, steps, no shard open); else `running` if the run wrote a
    file in the last ACTIVE_S seconds; else `unknown` (stopped, crashed, or between long batches).
    """
    run_dir = _run_dir(run_dir)
    records = read_metrics(run_dir)
    train = train_steps(records)
    generated: dict[str, dict] = {}
    for record in _of_kind(records, "generate"):
        totals = generated.setdefault(record["teacher"], {"samples": 0, "tokens": 0})
        totals["samples"] += record["samples"]
        totals["tokens"] += record["tokens"]
    # an earlier attempt's train_end does not count once a resumed run trains again
    trainer_log = [r["kind"] for r in records if r.get("kind") in ("train", "train_end")]
    last_write = _last_write(run_dir)
    status = {
        "run_dir": str(run_dir),
        "state": "unknown",
        "last_write_s_ago": None if last_write is None else round(time.time() - last_write, 1),
        **_shards_on_disk(run_dir.child(SAMPLES)),
        "generated_per_teacher": generated,
        "steps_trained": len(train),
        "last_loss": train[-1]["loss"] if train else None,
        "training_ended": trainer_log[-1:] == ["train_end"],
    }
    if run_dir.exists(PLAN):  # the resource plan of the run's last start, as its log has it
        status["plan"] = json.loads(run_dir.read_text(PLAN))
    summary = json.loads(run_dir.read_text(SUMMARY)) if run_dir.exists(SUMMARY) else None
    # ShardWriter's shard in progress (on object storage an upload is invisible until complete)
    open_shards = any(i.base_name.endswith(TEMP_SUFFIX) for i in run_dir.list(SAMPLES))
    if summary is not None and _matches_files(summary, status, open_shards):
        status.update(state="finished", summary=summary)
    elif last_write is not None and time.time() - last_write < ACTIVE_S:
        status["state"] = "running"
    return status


def _tokens_per_second(generate: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Bin centres (s since the first batch started) and tokens/s per teacher. Each batch's tokens are spread over
    the time it ran (`time - batch_s` to `time`), so a long batch does not show up as a spike in one bin."""
    ends = np.array([r["time"] for r in generate], dtype=float)
    starts = ends - np.array([max(r["batch_s"], 1e-6) for r in generate], dtype=float)
    origin, span = starts.min(), ends.max() - starts.min()
    bins = max(1, min(THROUGHPUT_BINS, int(span)))  # bins of at least 1 s
    width = max(span / bins, 1.0)
    edges = origin + width * np.arange(bins + 1)
    lo, hi = edges[:-1], edges[1:]
    rates: dict[str, np.ndarray] = {}
    for record, start, end in zip(generate, starts, ends):
        overlap = np.clip(np.minimum(end, hi) - np.maximum(start, lo), 0.0, None)
        share = record["tokens"] * overlap / (end - start)
        rates[record["teacher"]] = rates.get(record["teacher"], 0.0) + share / width
    return (lo + hi) / 2 - origin, dict(sorted(rates.items()))


def _figure(width: float = 8.0, height: float = 4.0) -> Figure:
    # A bare Figure renders PNGs with the Agg canvas and never touches pyplot's global backend or state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _loss_plot(train: list[dict]) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    terms = ["loss"] + sorted({k for r in train for k in r if k.startswith("loss_")})
    for term in terms:
        points = [(r["step"], r[term]) for r in train if term in r]
        ax.plot(*zip(*points), marker="o" if len(points) <= 50 else None, markersize=3, label=term)
    ax.set(title="Training loss per term", xlabel="step", ylabel="loss")
    ax.locator_params(axis="x", integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _throughput_plot(generate: list[dict]) -> Figure:
    centres, rates = _tokens_per_second(generate)
    fig = _figure()
    ax = fig.subplots()
    for teacher, rate in rates.items():
        ax.plot(centres, rate, marker="o", markersize=3, label=teacher)
    if len(rates) > 1:
        ax.plot(centres, sum(rates.values()), color="black", linestyle="--", linewidth=1, label="all teachers")
    ax.set(title="Teacher throughput", xlabel="seconds since the first batch started", ylabel="generated tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the lines span the whole width
    return fig


def _prompts_plot(per_domain_teacher: dict[str, dict[str, int]], per_teacher: dict[str, int]) -> Figure:
    """Samples per domain, stacked by the teacher that answered (which the routing table decides), and per teacher."""
    fig = _figure(10.0, 4.0)
    by_domain, by_teacher = fig.subplots(1, 2)
    domains, bottom = list(per_domain_teacher), np.zeros(len(per_domain_teacher))
    for teacher in sorted({t for counts in per_domain_teacher.values() for t in counts}):
        heights = np.array([per_domain_teacher[d].get(teacher, 0) for d in domains], dtype=float)
        by_domain.bar(domains, heights, bottom=bottom, label=teacher)
        bottom += heights
    for x, total in enumerate(bottom):
        by_domain.annotate(f"{total:g}", (x, total), ha="center", va="bottom")
    by_domain.legend(title="teacher")
    by_teacher.bar_label(by_teacher.bar(list(per_teacher), list(per_teacher.values()), color="tab:green"))
    for ax, title in ((by_domain, "per domain, by teacher"), (by_teacher, "per teacher")):
        ax.set(title=f"Samples {title}", ylabel="samples")
        ax.locator_params(axis="y", integer=True)
        ax.margins(y=0.15)
    return fig


def _wait_plot(train: list[dict]) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    steps = [r["step"] for r in train]
    marker = "o" if len(steps) <= 50 else None
    ax.plot(steps, [r["wait_s"] for r in train], marker=marker, markersize=3, label="waiting for samples (wait_s)")
    if all("step_s" in r for r in train):
        ax.plot(steps, [r["step_s"] for r in train], marker=marker, markersize=3, label="training step (step_s)")
    # The first wait includes engine start-up and can be 1000x the rest: a log scale keeps both readable.
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set(title="Trainer time per step", xlabel="step", ylabel="seconds (symlog)")
    ax.locator_params(axis="x", integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def write_report(run_dir: str | Path) -> Path | str:
    """Write RUN/report.html (PNG plots embedded, so the one file reads offline) and the plots as RUN/report/*.png.

    A plot with no data yet (e.g. no `train` records in a generate-only run) is left out and named in the page.
    Without `summary.json` (a run still going) the sample counts come from the complete shards.
    """
    run_dir = _run_dir(run_dir)
    summary = json.loads(run_dir.read_text(SUMMARY)) if run_dir.exists(SUMMARY) else {}
    # `train` runs read their samples from another run's folder (`data_dir` in their summary).
    counts = (
        summary
        if "per_domain_teacher" in summary
        else sample_counts(complete_shards(summary.get("data_dir") or run_dir.child(SAMPLES)))
    )
    records = read_metrics(run_dir)
    train, generate = train_steps(records), _of_kind(records, "generate")
    figures = {
        "loss": ("Loss per term over steps", _loss_plot(train) if train else None),
        "throughput": ("Tokens/s per teacher over time", _throughput_plot(generate) if generate else None),
        "prompts": (
            "Samples per domain (by teacher) and per teacher",
            _prompts_plot(counts["per_domain_teacher"], counts["per_teacher"]) if counts["per_domain"] else None,
        ),
        "wait": ("Trainer wait time per step", _wait_plot(train) if train else None),
    }
    sections = []
    for name, (title, figure) in figures.items():
        png = f"{REPORT_PLOTS}/{name}.png"
        if figure is None:
            run_dir.delete(png)  # a plot from an earlier report would no longer match this page
            sections.append(f"<h2>{title}</h2><p class=none>No data for this plot yet.</p>")
            continue
        image = io.BytesIO()
        figure.savefig(image, format="png")
        run_dir.write_bytes(png, image.getvalue())
        data = base64.b64encode(image.getvalue()).decode("ascii")
        sections.append(f'<h2>{title}</h2><img alt="{title}" src="data:image/png;base64,{data}">')
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_cell(v))}</td></tr>" for k, v in summary.items()
    )
    table = f"<table>{rows}</table>" if summary else "<p class=none>No summary.json yet: the run has not finished.</p>"
    name = run_dir.root.rsplit("/", 1)[-1]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>avocado-ray report: {html.escape(name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1050px; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
th {{ background: #f4f4f4; font-weight: 600; }} img {{ max-width: 100%; }} .none {{ color: #888; }}
</style></head><body>
<h1>avocado-ray run report</h1>
<p>{html.escape(str(run_dir))} &middot; written {time.strftime("%Y-%m-%d %H:%M:%S")}</p>
<h2>Summary</h2>
{table}
{"".join(sections)}
</body></html>
"""
    run_dir.write_text(REPORT, page)
    return run_dir.local_path(REPORT) if run_dir.local else run_dir.uri(REPORT)
