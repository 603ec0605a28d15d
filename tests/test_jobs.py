"""`ray job submit` end to end on a real Ray head started with `ray start` (loopback, token auth): a submitted
distillation answers every prompt once, trains on every sample once and exports the student; its job log shows
plain progress lines, and the head's metrics endpoint the run's Ray metrics. In the soak suite, a submitted
distillation is stopped with `ray job stop` midway, leaves nothing running, and a resubmission on the same run
directory finishes it; the teachers-only and trainer-only jobs, submitted one after the other, make a student of
the first one's answers; `ray stop --force` during a job leaves none of the engine processes its replicas reported.
Every job runs directly too.

The head has its own temp dir and ports, beside the test session's own Ray (conftest's `ray.init`) and any
other Ray on the machine. It is not ended with `ray stop`, which stops every Ray of the machine (the session's
too), but by ending the processes that name its session folder, and their children.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from avocado_ray.dataplane.spill import open_samples
from avocado_ray.teachers.engines import process_tree, wait_gone

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CONFIG = ROOT / "tests" / "data" / "job.yaml"  # qwen alone, 32 prompts, a checkpoint every step
PROMPTS = 32
DEMO_CONFIG, DEMO_PROMPTS = ROOT / "configs" / "local.yaml", 48  # what docs/usage.md submits on one machine
# The logical CPUs of docs/usage.md's one-machine head: the demo's resource plan (3 teachers and a trainer worker)
DOCS_CPUS = int(re.search(r"ray start --head .*--num-cpus (\d+)", (ROOT / "docs" / "usage.md").read_text()).group(1))
METRICS = {  # as Prometheus shows them (Ray's `ray_` prefix)
    "ray_avocado_prompts_routed_total",
    "ray_avocado_queue_depth",
    "ray_avocado_requests_in_flight",
    "ray_avocado_teacher_tokens_per_second",
    "ray_avocado_trainer_step_seconds_bucket",
    "ray_avocado_trainer_loss",
    "ray_avocado_trainer_samples_per_second",
}
RAY_TRAIN_SINGLETONS = {"_AutoscalingCoordinatorActor"}  # Ray Train's detached per-cluster actor, not the job's


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Head:
    """A one-node Ray cluster from `ray start --head`, driven through the `ray` CLI and its HTTP API."""

    def __init__(self, num_cpus: int = DOCS_CPUS):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="arj-", dir="/tmp"))  # short: Ray's socket paths have a limit
        gcs, dashboard, client, agent, metrics = _free_ports(5)
        self.url = f"http://127.0.0.1:{dashboard}"
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # The job's `python` is the venv's. RAY_API_SERVER_ADDRESS points the `ray job`/`ray list` commands at this
        # head, and Ray's own state API calls inside the cluster (Ray Train's placement group cleaner) too, which
        # would otherwise guess among the machine's Rays.
        self.env = {
            **env,
            "RAY_AUTH_MODE": "token",
            "PATH": f"{VENV_BIN}:{env['PATH']}",
            "RAY_API_SERVER_ADDRESS": self.url,
        }
        self.ray(
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--dashboard-host",
            "127.0.0.1",
            "--temp-dir",
            str(self.temp_dir),
            "--port",
            str(gcs),
            "--dashboard-port",
            str(dashboard),
            "--ray-client-server-port",
            str(client),
            "--dashboard-agent-listen-port",
            str(agent),
            "--metrics-export-port",
            str(metrics),
            "--num-cpus",
            str(num_cpus),
            "--object-store-memory",
            str(500 * 2**20),
            "--disable-usage-stats",
        )
        self.token = (Path.home() / ".ray" / "auth_token").read_text().strip()

    def ray(self, *args: str, timeout: float = 300) -> str:
        """Run the `ray` CLI against this head; returns its output, fails the test on a non-zero exit."""
        command = [str(VENV_BIN / "ray"), *args]
        done = subprocess.run(
            command, check=False, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout + done.stderr

    def submit(
        self,
        submission_id: str,
        run_dir: Path,
        job: str = "distill",
        *args: str,
        config: Path = CONFIG,
        wait: bool = False,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess:
        """The command of docs/usage.md: the repository as working dir through deploy/runtime_env.yaml. With `wait`,
        `ray job submit` follows the job to its end (its exit status says whether it failed), else it returns."""
        command = [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--submission-id",
            submission_id,
            "--runtime-env",
            "deploy/runtime_env.yaml",
            *([] if wait else ["--no-wait"]),
            "--",
            "python",
            f"jobs/{job}.py",
            "--config",
            str(config),
            "--run-dir",
            str(run_dir),
            *args,
        ]
        done = subprocess.run(
            command, check=False, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert wait or done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    def wait(self, submission_id: str, timeout_s: float = 900, on_poll=lambda: None) -> str:
        """Wait for a submitted job to end; returns its log, failing the test unless it succeeded."""
        _wait_for(
            lambda: self.job(submission_id)["status"] not in ("PENDING", "RUNNING"), submission_id, timeout_s, on_poll
        )
        log = self.ray("job", "logs", submission_id)
        assert self.job(submission_id)["status"] == "SUCCEEDED", log[-5000:]
        return log

    def get(self, path: str, token: bool = True) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        request = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def job(self, submission_id: str) -> dict:
        return self.get(f"/api/jobs/{submission_id}")

    def actors(self, job_id: str) -> list[dict]:
        """The job's actors that are alive, from the state API (`ray list actors`)."""
        out = self.ray(
            "list",
            "actors",
            "--format",
            "json",
            "--limit",
            "1000",
            "--filter",
            f"job_id={job_id}",
            "--filter",
            "state=ALIVE",
        )
        return json.loads(out[out.index("[") :])

    def live_placement_groups(self, job_id: str) -> list[dict]:
        out = self.ray("list", "placement-groups", "--format", "json", "--filter", f"creator_job_id={job_id}")
        groups = json.loads(out[out.index("[") :]) if "[" in out else []  # none: Ray prints a notice, no list
        return [g for g in groups if g["state"] != "REMOVED"]

    def metric_names(self) -> set[str]:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
                text = response.read().decode()
        except OSError:  # the metrics agent starts a little after the head
            return set()
        return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_avocado_")}

    def processes(self) -> dict[int, psutil.Process]:
        """This head's processes (those naming its session folder) and their children: workers, engines."""
        marker = f"{self.temp_dir}/session_"
        roots = []
        for process in psutil.process_iter(["cmdline"]):
            if process.pid != os.getpid() and any(marker in arg for arg in process.info["cmdline"] or []):
                roots.append(process)
        processes = {}
        for root in roots:
            try:
                processes.update({p.pid: p for p in [root, *root.children(recursive=True)]})
            except psutil.NoSuchProcess:
                continue
        return processes

    def stop_force(self) -> None:
        """`ray stop --force` for this head alone (the command itself ends every Ray of the machine): SIGKILL of
        each of its processes that `ray stop` matches by name or command line, with Ray's own list; a vLLM
        engine process is on no such list."""
        from ray.autoscaler._private.constants import RAY_PROCESSES

        for process in self.processes().values():
            try:
                name, args = process.name(), subprocess.list2cmdline(process.cmdline())
                if any(keyword in (name if by_name else args) for keyword, by_name in RAY_PROCESSES):
                    process.kill()
            except psutil.NoSuchProcess:
                continue

    def stop(self) -> None:
        """End this head's processes (those naming its session folder) and their children: workers, engines."""
        processes = self.processes()
        for process in processes.values():
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(list(processes.values()), timeout=10)
        for process in alive:
            process.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_heads():
    """Start heads with `ray_heads(num_cpus)` (default: as docs/usage.md starts one); all end after the test."""
    heads: list[Head] = []

    def start(num_cpus: int = DOCS_CPUS) -> Head:
        heads.append(Head(num_cpus))
        return heads[-1]

    try:
        yield start
    finally:
        for head in heads:
            head.stop()


@pytest.fixture
def ray_head(ray_heads):
    return ray_heads()


def _wait_for(condition, what: str, timeout_s: float, on_poll=lambda: None, every_s: float = 2.0):
    """Poll `condition` until it returns something truthy; `on_poll` runs on every poll (e.g. a metrics scrape)."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        on_poll()
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(every_s)
    return result


def _descendants(pid: int) -> list[psutil.Process]:
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


@pytest.mark.slow
@pytest.mark.soak
def test_a_submitted_job_stopped_midway_leaves_nothing_running_and_resumes_to_each_sample_trained_once(
    tiny_models, ray_head, tmp_path
):
    head, run_dir, seen_metrics = ray_head, tmp_path / "run", set()
    manifest = run_dir / "manifest.json"

    def scrape() -> None:
        seen_metrics.update(head.metric_names())

    def running_or_fail(submission_id: str) -> None:
        info = head.job(submission_id)
        assert info["status"] in ("PENDING", "RUNNING"), (info, head.ray("job", "logs", submission_id)[-5000:])
        scrape()

    head.submit("distill-1", run_dir)
    metrics_jsonl = run_dir / "metrics.jsonl"
    _wait_for(
        lambda: metrics_jsonl.is_file() and '"generate"' in metrics_jsonl.read_text(),
        "a first answer",
        900,
        lambda: running_or_fail("distill-1"),
    )
    job_id = head.job("distill-1")["job_id"]
    replicas = [a for a in head.actors(job_id) if a["class_name"] == "TeacherReplica"]
    engine_processes = [p for a in replicas for p in _descendants(a["pid"])]  # the actor and its vLLM engine
    assert replicas and len(engine_processes) > len(replicas)
    _wait_for(
        lambda: manifest.is_file() and json.loads(manifest.read_text()).get("trained", {}).get("step", 0) >= 1,
        "a first checkpoint",
        600,
        lambda: running_or_fail("distill-1"),
        every_s=0.5,
    )

    head.ray("job", "stop", "distill-1")
    assert head.job("distill-1")["status"] == "STOPPED"
    stopped_at = json.loads(manifest.read_text())["trained"]
    assert stopped_at["samples"] < PROMPTS  # stopped midway

    def nothing_left() -> bool:
        left = {a["class_name"] for a in head.actors(job_id)} - RAY_TRAIN_SINGLETONS
        return not left and not head.live_placement_groups(job_id)

    _wait_for(nothing_left, "the stopped job's actors and placement groups to go", 60, every_s=3)
    _, alive = psutil.wait_procs(engine_processes, timeout=30)
    assert not alive, f"engine processes left after the stop: {alive}"
    log = head.ray("job", "logs", "distill-1")
    assert "stopped: rerun on the same run directory to resume" in log
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
    # a stop is not the end of the data: the trainer did not finish the run on what it had
    assert not (run_dir / "summary.json").exists() and not (run_dir / "student").exists()
    assert "train_end" not in {r["kind"] for r in records}

    head.submit("distill-2", run_dir)
    log = head.wait("distill-2", on_poll=scrape)
    resumed_from = int(re.search(r"resuming: (\d+) prompts already answered", log).group(1))
    assert stopped_at["samples"] <= resumed_from < PROMPTS

    _check_finished_run(run_dir, log, PROMPTS - resumed_from)
    _wait_for(lambda: METRICS <= seen_metrics, f"the metrics {sorted(METRICS - seen_metrics)}", 30, scrape)


def _check_finished_run(run_dir: Path, log: str, answered: int | None, prompts: int = PROMPTS) -> None:
    """A finished distillation of `prompts` prompts: every prompt answered once, each sample trained once, the
    student exported, and the job log (of the job that ended it, which answered `answered` prompts) with plain
    progress lines."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts_add_up"] and summary["samples_out"] == prompts and summary["rejected"] == 0
    table = open_samples(run_dir / "samples").to_table(columns=["sample_id", "prompt_id"])
    prompt_ids = table["prompt_id"].to_pylist()
    assert len(prompt_ids) == len(set(prompt_ids)) == prompts  # every prompt answered once
    trained = (run_dir / "trained_ids.txt").read_text().split()
    assert sorted(trained) == sorted(table["sample_id"].to_pylist())  # each sample trained on once
    assert json.loads((run_dir / "manifest.json").read_text())["trained"]["samples"] == prompts
    assert (run_dir / "student" / "model.safetensors").is_file()

    # progress in a non-interactive log: plain lines, no carriage returns
    generate = [line for line in log.split("\n") if " generate " in line and " tok/s" in line]
    train = [line for line in log.split("\n") if re.search(r"train step \d+ \| loss [\d.]+ \| [\d.]+ samples/s", line)]
    done = f"generate {answered}/{answered} (100%)" if answered else " (100%) |"  # best-of: answers > prompts
    assert any(done in line for line in generate), generate
    assert train and not any("\r" in line for line in generate + train)
    kinds = {r["kind"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert {"route", "dispatch", "generate", "train", "train_end"} <= kinds


@pytest.mark.slow
def test_the_demo_submitted_to_a_head_started_as_the_docs_say_answers_every_prompt_trains_once_and_exports_metrics(
    tiny_models, ray_head, tmp_path
):
    head, run_dir, seen_metrics = ray_head, tmp_path / "run", set()
    with pytest.raises(urllib.error.HTTPError, match="401"):
        head.get("/api/jobs/", token=False)  # token authentication is on

    def scrape() -> None:
        seen_metrics.update(head.metric_names())

    head.submit("distill", run_dir, config=DEMO_CONFIG)
    log = head.wait("distill", on_poll=scrape)
    _check_finished_run(run_dir, log, None, DEMO_PROMPTS)  # math prompts are answered by two teachers (best-of)
    assert f"CPU {DOCS_CPUS:g} of CPU {DOCS_CPUS:g}" in log and "\n  fits\n" in log  # the plan, at the start
    _wait_for(lambda: METRICS <= seen_metrics, f"the metrics {sorted(METRICS - seen_metrics)}", 30, scrape)


def _engine_pids(log: str) -> dict[int, list[int]]:
    """The replicas' PIDs and their engines' PIDs, as the job logs them when its teachers are ready."""
    return {
        int(pid): [int(p) for p in engines.split(",")]
        for pid, engines in re.findall(r"'pid': (\d+), 'engine_pids': \[([\d, ]+)\]", log)
    }


@pytest.mark.slow
@pytest.mark.soak
def test_ray_stop_force_during_a_job_leaves_none_of_its_engine_processes_and_status_lists_no_leftover(
    tiny_models, ray_head, tmp_path
):
    head = ray_head
    head.submit("generate", tmp_path / "run", "generate")
    engines = _wait_for(lambda: _engine_pids(head.ray("job", "logs", "generate")), "the teachers' engines", 600)
    engine_pids = [pid for pids in engines.values() for pid in pids]
    assert engine_pids and all(pids for pids in engines.values())  # each replica's EngineCore (runs the model on CPU)
    status = [sys.executable, "-m", "avocado_ray", "status"]
    listed = json.loads(subprocess.run(status, check=True, capture_output=True, text=True).stdout)["unowned_engines"]
    assert not {e["pid"] for e in listed} & set(engine_pids)  # owned by live replicas

    processes = process_tree(engine_pids)
    assert sorted(p.pid for p in processes) == sorted(engine_pids)  # alive, and nothing else under them
    head.stop_force()
    alive = wait_gone(processes, timeout_s=10)
    assert not alive, f"engine processes left 10 s after `ray stop --force`: {alive}"
    listed = json.loads(subprocess.run(status, check=True, capture_output=True, text=True).stdout)["unowned_engines"]
    assert not {e["pid"] for e in listed} & set(engine_pids)


@pytest.mark.slow
def test_the_demo_submitted_to_a_head_with_too_few_cpus_fails_within_a_minute_saying_what_is_missing(
    tiny_models, ray_heads, tmp_path
):
    head = ray_heads(num_cpus=2)
    started = time.monotonic()
    done = head.submit("distill-small", tmp_path / "run", config=DEMO_CONFIG, wait=True, timeout=60)
    assert time.monotonic() - started < 60 and done.returncode != 0, done.stdout[-3000:]
    assert head.job("distill-small")["status"] == "FAILED"
    log = head.ray("job", "logs", "distill-small")
    assert "needs 4 CPU, the cluster has 2: qwen 1, gemma 1, gptoss 1, trainer 1" in log, log[-3000:]
    assert "Traceback" not in log and "TrainingFailedError" not in log  # one line, not Ray Train's startup error
    assert not head.live_placement_groups(head.job("distill-small")["job_id"])  # nothing was started


@pytest.mark.slow
@pytest.mark.soak
def test_submitted_generate_then_train_jobs_answer_every_prompt_and_train_a_student_on_the_answers(
    tiny_models, ray_head, tmp_path
):
    head, answers, student = ray_head, tmp_path / "generate", tmp_path / "train"
    head.submit("generate", answers, "generate")
    log = head.wait("generate")
    summary = json.loads((answers / "summary.json").read_text())
    assert summary["counts_add_up"] and summary["samples_out"] == PROMPTS, log[-3000:]
    assert not (answers / "student").exists() and not (answers / "ray_train").exists()  # teachers only

    head.submit("train", student, "train", "--data", str(answers / "samples"))
    log = head.wait("train")
    summary = json.loads((student / "summary.json").read_text())
    assert summary["samples_in"] == PROMPTS and summary["train_steps"] == PROMPTS // 4, log[-3000:]
    assert (student / "student" / "model.safetensors").is_file()
    trained = (student / "trained_ids.txt").read_text().split()
    table = open_samples(answers / "samples").to_table(columns=["sample_id"])
    assert sorted(trained) == sorted(table["sample_id"].to_pylist())


@pytest.mark.parametrize("job", ["distill", "generate", "train"])
def test_each_job_runs_directly_and_explains_its_options(job):
    done = subprocess.run(
        [sys.executable, f"jobs/{job}.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert f"usage: avocado-ray {job}" in done.stdout and "--config" in done.stdout and "--set" in done.stdout
