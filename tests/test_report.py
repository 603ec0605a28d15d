"""`avocado-ray report` and `status`: on a synthetic run directory (fast) and on the real demo run (slow)."""

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from avocado_ray.cli import main
from avocado_ray.report import _tokens_per_second, run_status, write_report

PLOTS = ("loss", "throughput", "prompts", "wait")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path):
    """A PNG file that decodes and is not one flat colour."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100, path
    assert np.var(pixels) > 0, f"{path} is blank"


@pytest.fixture
def synthetic_run(tmp_path):
    """A finished run's files as the pipeline writes them: 12 train steps with two loss terms, 3 teachers' batches."""
    t0 = 1_700_000_000.0
    records = []
    for i in range(60):  # one batch every 0.5 s per teacher, over 30 s
        for r, (teacher, tokens) in enumerate((("qwen", 400), ("gemma", 250), ("gptoss", 120))):
            records.append(
                {
                    "kind": "generate",
                    "time": t0 + 2 + i * 0.5 + r * 0.1,
                    "teacher": teacher,
                    "replica": i % 2,
                    "samples": 4,
                    "tokens": tokens + 10 * (i % 5),
                    "batch_s": 1.0,
                }
            )
    for step in range(1, 13):
        records.append(
            {
                "kind": "train",
                "step": step,
                "loss": 8.0 - 0.3 * step,
                "loss_sft": 5.0 - 0.2 * step,
                "loss_kl": 3.0 - 0.1 * step,
                "samples": 8,
                "tokens": 300,
                "wait_s": 20.0 if step == 1 else 0.01 * step,
                "step_s": 0.2,
                "time": t0 + 5 + 2 * step,
            }
        )
    records.append({"kind": "train_end", "steps": 12, "samples_not_trained": 0, "time": t0 + 40})
    records.sort(key=lambda r: r["time"])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "run_dir": str(tmp_path),
        "prompts_in": 96,
        "rejected": 0,
        "counts_add_up": True,
        "per_domain": {"code": 40, "chinese": 20, "math": 16, "general": 20},
        "per_teacher": {"qwen": 60, "gemma": 20, "gptoss": 16},
        "per_domain_teacher": {
            "code": {"qwen": 40},
            "chinese": {"qwen": 20},
            "math": {"gptoss": 16},
            "general": {"gemma": 20},
        },
        "train_steps": 12,
        "last_loss": 4.4,
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return tmp_path


def test_report_writes_html_with_every_plot_embedded_and_as_png(synthetic_run):
    report = write_report(synthetic_run)
    assert report == synthetic_run / "report.html"
    page = report.read_text()
    for name in PLOTS:
        png = synthetic_run / "report" / f"{name}.png"
        assert_real_png(png)
        assert base64.b64encode(png.read_bytes()).decode() in page  # embedded: the page reads offline on its own
    assert len(re.findall(r'src="data:image/png;base64,', page)) == len(PLOTS)
    assert "<th>prompts_in</th><td>96</td>" in page and "http" not in page  # summary table, nothing fetched


def test_throughput_bins_keep_every_generated_token(synthetic_run):
    records = [json.loads(line) for line in (synthetic_run / "metrics.jsonl").read_text().splitlines()]
    generate = [r for r in records if r["kind"] == "generate"]
    centres, rates = _tokens_per_second(generate)
    width = centres[1] - centres[0]
    for teacher, rate in rates.items():
        total = sum(r["tokens"] for r in generate if r["teacher"] == teacher)
        assert rate.sum() * width == pytest.approx(total)
    assert rates["qwen"][5] == pytest.approx(2 * (400 + 10 * 2), rel=0.1)  # 400-440 tokens per 0.5 s


def test_report_leaves_out_plots_without_data(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 2.0, "wait_s": 0.1}) + "\n")
    page = write_report(tmp_path).read_text()
    assert_real_png(tmp_path / "report" / "loss.png")
    assert not (tmp_path / "report" / "throughput.png").exists()
    assert page.count("No data for this plot yet") == 2  # throughput, prompts (no generate records, no shards)


def test_status_of_a_finished_run(synthetic_run, capsys):
    assert main(["status", str(synthetic_run)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "finished" and status["summary"]["train_steps"] == 12
    assert status["steps_trained"] == 12 and status["last_loss"] == pytest.approx(4.4)
    assert status["generated_per_teacher"]["qwen"]["samples"] == 240


def test_status_of_a_run_still_writing(synthetic_run):
    (synthetic_run / "summary.json").unlink()
    lines = (synthetic_run / "metrics.jsonl").read_text().splitlines()
    (synthetic_run / "metrics.jsonl").write_text("\n".join(lines[:50]) + '\n{"kind": "tra')  # a line half appended
    status = run_status(synthetic_run)
    assert status["state"] == "running" and "summary" not in status
    assert status["steps_trained"] == sum('"train"' in line for line in lines[:50]) and not status["training_ended"]


def test_report_and_status_of_a_missing_run_directory_exit_2(tmp_path, capsys):
    for command in ("report", "status"):
        assert main([command, str(tmp_path / "nope")]) == 2
        assert "no such run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_report_of_the_demo_run(demo_run):
    assert main(["report", demo_run["run_dir"]]) == 0
    folder = Path(demo_run["run_dir"])
    for name in PLOTS:
        assert_real_png(folder / "report" / f"{name}.png")
    assert run_status(folder)["state"] == "finished"
