"""Progress lines: throttled plain lines in a job log, a bar redrawn in place on a terminal, and the records the
generation monitor adds to metrics.jsonl."""

import io

from avocado_ray.dataplane.prompts import Rejected
from avocado_ray.dataplane.requests import Request
from avocado_ray.progress import GenerationMonitor, Progress, TrainMonitor
from avocado_ray.teachers.pool import CallReport


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_non_interactive_log_gets_plain_lines_at_most_every_interval_and_the_last_one():
    out = io.StringIO()
    progress = Progress("generate", total=1000, stream=out, every_s=60)
    for done in range(1000):
        progress.update(done, "qwen 100 tok/s")
    progress.finish(1000, "qwen 100 tok/s")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()  # the first update, then the end
    assert lines[0].endswith("generate 0/1000 (0%) | qwen 100 tok/s | 0s")
    assert "generate 1000/1000 (100%)" in lines[1]
    progress.finish(1000)
    assert len(out.getvalue().splitlines()) == 2  # the end is not shown twice


def test_a_terminal_gets_one_bar_redrawn_in_place():
    out = Terminal()
    progress = Progress("generate", total=4, stream=out)
    progress.update(1)
    progress.finish(4)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, ended once the task is done
    assert text.count("\r") == 2 and "[" + "#" * 24 + "] 4/4 (100%)" in text


def test_the_generation_monitor_counts_routes_answers_and_teachers_in_metrics_jsonl():
    records, out = [], io.StringIO()
    work = {
        ("qwen", False): [Request(f"p{i}", "code", ["code"], []) for i in range(6)],
        ("gptoss", True): [Request("m", "math", ["math"], [])],  # a best-of prompt goes to two teachers
        ("gemma", True): [Request("m", "math", ["math"], [])],
    }
    monitor = GenerationMonitor(work, records.append, out)
    monitor.tick({("qwen", False): [work["qwen", False][4:]]}, [("qwen", False)])
    answer = CallReport(
        samples=3, rejected=[Rejected(0, "p3", "too long", "too_long")], tokens=96, batch_s=2.0, replica=0
    )
    monitor.answered("qwen", answer)
    monitor.tick({}, [], final=True)
    assert records[0] == {
        "kind": "route",
        "per_domain": {"code": 6, "math": 1},
        "per_teacher": {"gemma": 1, "gptoss": 1, "qwen": 6},
    }
    first, last = records[1], records[2]
    assert first["kind"] == "dispatch" and first["queued"]["qwen"] == 2 and first["in_flight"] == {"qwen": 1}
    assert last["answered"] == {"qwen": 4} and 0 < last["tokens_per_s"]["qwen"] <= 48  # 96 tokens over >= 2 s
    assert "generate 4/8 (50%)" in out.getvalue().splitlines()[-1]


def test_the_train_monitor_line_has_step_loss_and_samples_per_second():
    out = io.StringIO()
    monitor = TrainMonitor(out)
    monitor.step({"step": 7, "samples": 8, "loss": 2.5, "step_s": 0.5})
    monitor.finish()
    assert out.getvalue().splitlines()[-1].endswith("train step 7 | loss 2.5000 | 16.0 samples/s | 0.50 s/step | 0s")
