"""Launchers: Ray and submitit's local executor give the serial runs' numbers, a preempted job
resumes to the metrics of an uninterrupted run, the resources reach sbatch, two launchers on one
directory train each run once, and a failing run is reported and retried alone."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launch_helpers import attempts, metrics, summary, write_experiment
from normlab.cli import main
from normlab.experiments import load_experiment, run_experiment
from normlab.experiments.claims import ClaimPolicy, read_claim
from normlab.experiments.launchers import LaunchOptions
from normlab.experiments.spec import Launcher

VARIANTS = ("bn", "gn", "ln", "none")
STEPS = 150  # long enough for a signal to reach a job while it trains


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The experiment and its serial runs (one torch thread each, as in every launcher)."""
    tmp = tmp_path_factory.mktemp("launchers")
    path = write_experiment(tmp, steps=STEPS)
    exp = load_experiment(path)
    run_experiment(exp, tmp / "serial", threads=1)

    class Lab:
        pass

    lab = Lab()
    lab.tmp, lab.path, lab.exp = tmp, path, exp
    lab.serial = {v: tmp / "serial" / v / "seed0" for v in VARIANTS}
    return lab


def _spans(run_dir: Path) -> tuple[float, float]:
    """First and last time stamp of a run's ``run.log``."""
    lines = (run_dir / "run.log").read_text().splitlines()

    def t(line: str) -> float:
        return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()

    return t(lines[0]), t(lines[-1])


def test_ray_trains_two_runs_at_a_time_with_the_serial_numbers(lab):
    pytest.importorskip("ray")
    out = lab.tmp / "ray"
    lines: list[str] = []
    suite = run_experiment(lab.exp, out, launcher="ray", jobs=2, log=lines.append)
    assert [r["status"] for r in suite["runs"]] == ["trained"] * 4
    assert sum("best " in line for line in lines) == 4  # one line per finished run
    for v in VARIANTS:
        d = out / v / "seed0"
        assert summary(d) == summary(lab.serial[v]), v
        assert metrics(d) == metrics(lab.serial[v]), v
        assert not (d / "claim.lock").exists()
    # a local Ray with 2 CPUs and one CPU per run: two runs at a time, never more
    spans = [_spans(out / v / "seed0") for v in VARIANTS]
    at_once = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert at_once == 2


def _preempt_signal() -> int:
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def test_slurm_job_array_on_the_local_executor_resumes_a_preempted_run(lab):
    pytest.importorskip("submitit")
    out = lab.tmp / "slurm"
    opts = LaunchOptions(wait=True, cluster="local", claims=ClaimPolicy(0.1, 60.0))
    result: dict = {}

    def launch() -> None:
        result.update(
            run_experiment(
                lab.exp, out, launcher="slurm", variants=["bn", "gn", "ln"], options=opts
            )
        )

    launcher = threading.Thread(target=launch)
    launcher.start()
    # once gn's job reports a step, send it the signal Slurm sends before preempting a job
    victim, deadline, pid = out / "gn" / "seed0", time.time() + 240, None
    while pid is None and time.time() < deadline and launcher.is_alive():
        claim = read_claim(victim)
        if claim and not claim.get("unreadable") and claim.get("step"):
            pid = claim["pid"]
            os.kill(pid, _preempt_signal())
        time.sleep(0.02)
    launcher.join(timeout=300)
    assert pid is not None, "gn's job never reported a step"
    status = {r["variant"]: r for r in result["runs"]}
    assert status["gn"]["status"] == "resumed"
    assert status["bn"]["status"] == status["ln"]["status"] == "trained"
    jobs = json.loads((out / "jobs.json").read_text())
    assert {r["job_id"] for r in status.values()} == {j["job_id"] for j in jobs.values()}
    log = (victim / "run.log").read_text()
    assert "checkpointed at step" in log and attempts(victim) == 2
    assert json.loads((victim / "env.json").read_text())["resumed"]
    for v in ("bn", "gn", "ln"):  # the interrupted run ends where an uninterrupted one does
        assert metrics(out / v / "seed0") == metrics(lab.serial[v]), v
        assert summary(out / v / "seed0") == summary(lab.serial[v]), v


def test_two_launchers_on_one_fresh_directory_train_each_run_once(lab):
    out = lab.tmp / "two"
    cmd = [sys.executable, "-m", "normlab.cli", "run", str(lab.path), "--out", str(out)]
    procs = [
        subprocess.Popen([*cmd, "--no-report"], stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    trained = sum(line.count("best ") for err in errs for line in err.splitlines())
    assert trained == len(VARIANTS), errs  # between them, every run once
    for v in VARIANTS:
        d = out / v / "seed0"
        steps = [m[0] for m in metrics(d)]
        assert all(a < b for a, b in itertools.pairwise(steps)), (v, steps)
        assert attempts(d) == 1, (d / "run.log").read_text()
        assert "resumed" not in json.loads((d / "env.json").read_text())
        assert metrics(d) == metrics(lab.serial[v]), v


def test_a_failing_run_is_reported_the_others_finish_and_only_it_is_retried(tmp_path, capsys):
    path = write_experiment(tmp_path, steps=10, broken=True)
    out = tmp_path / "out"
    argv = ["run", str(path), "--out", str(out), "--variants", "bn,gn,broken", "--no-report"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "FAILED broken seed 0: MissingFileError" in err and "run the same command again" in err
    bad = out / "broken" / "seed0"
    marker = json.loads((bad / "failed.json").read_text())
    assert "cifar-10" in marker["error"] and marker["attempt"] == 1
    assert "Traceback" in (bad / "run.log").read_text()
    assert (out / "bn" / "seed0" / "summary.json").is_file()
    assert (out / "gn" / "seed0" / "summary.json").is_file()
    # still broken: the next invocation retries the failure alone
    assert main(argv) == 1
    assert json.loads((bad / "failed.json").read_text())["attempt"] == 2
    # repaired: it trains, the finished runs are left alone
    text = path.read_text()
    start = text.index('set = { data.name = "cifar10"')
    path.write_text(text[:start] + 'set = { model.norm = "bn" }' + text[text.index("\n", start) :])
    assert main(argv) == 0
    suite = json.loads((out / "suite.json").read_text())
    assert {r["variant"]: r["status"] for r in suite["runs"]} == {
        "bn": "skipped",
        "gn": "skipped",
        "broken": "trained",
    }
    assert not (bad / "failed.json").exists() and (bad / "summary.json").is_file()
    assert attempts(out / "bn" / "seed0") == attempts(out / "gn" / "seed0") == 1
    assert attempts(bad) == 3


def _fake_slurm(bin_dir: Path, record: Path) -> None:
    """``srun`` and an ``sbatch`` that keeps the script it is given and answers like Slurm."""
    bin_dir.mkdir()
    scripts = {
        "srun": "#!/bin/sh\nexit 0\n",
        "sbatch": f'#!/bin/sh\ncp "$1" "{record}"\necho "Submitted batch job 4242"\n',
    }
    for name, text in scripts.items():
        p = bin_dir / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)


def test_resources_reach_sbatch_from_the_file_a_config_and_the_flags(tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    path = write_experiment(tmp_path, steps=10)
    text = path.read_text().replace(
        "[scale.small]",
        '[launcher]\npartition = "cpu"\ntime = "1:00:00"\ncpus_per_run = 8\n'
        'slurm_params = { constraint = "a100" }\n\n[scale.small]',
    )
    path.write_text(text)
    assert load_experiment(path).launcher == Launcher(
        partition="cpu", time="1:00:00", cpus_per_run=8, slurm_params={"constraint": "a100"}
    )
    cluster = tmp_path / "cluster.toml"
    cluster.write_text('[launcher]\npartition = "gpu"\naccount = "lab"\n')
    record = tmp_path / "job.sh"
    _fake_slurm(tmp_path / "bin", record)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    argv = ["run", str(path), "--out", str(out), "--launcher", "slurm"]
    argv += ["--launcher-config", str(cluster), "--gpus-per-run", "2", "--time", "4:00:00"]
    argv += ["--mem", "32G", "--qos", "high", "--slurm-param", "exclude=n1"]
    argv += ["--slurm-param", "exclusive", "--variants", "bn,gn,ln"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "4242_0, 4242_1, 4242_2" in err and f"normlab status {out}" in err
    sbatch = {line for line in record.read_text().splitlines() if line.startswith("#SBATCH")}
    expected = {
        "--partition=gpu",  # the config file wins over the experiment's [launcher]
        "--account=lab",
        "--qos=high",
        "--time=240",  # the flag wins over the file
        "--mem=32G",
        "--gpus-per-node=2",
        "--ntasks-per-node=2",  # one DDP process per GPU
        "--cpus-per-task=4",  # cpus_per_run shared by the run's two processes
        "--nodes=1",
        "--constraint=a100",
        "--exclude=n1",
        "--exclusive",
        "--array=0-2%3",
    }
    assert {f"#SBATCH {e}" for e in expected} <= sbatch, sorted(sbatch)
    assert any(line.startswith("#SBATCH --signal=USR") for line in sbatch)
    suite = json.loads((out / "suite.json").read_text())
    assert [r["status"] for r in suite["runs"]] == ["submitted"] * 3
    assert [r["job_id"] for r in suite["runs"]] == ["4242_0", "4242_1", "4242_2"]
    assert main(["status", str(out)]) == 0  # queued, with their jobs
    lines = capsys.readouterr().out.splitlines()
    assert "3 runs: 0 finished, 0 running, 3 queued, 0 failed" in lines[0]
    for i, v in enumerate(("bn", "gn", "ln")):
        line = next(x for x in lines if x.startswith(v + " "))
        assert "queued" in line and f"slurm job 4242_{i} submitted" in line
    # bad resources are refused before anything is submitted
    with pytest.raises(SystemExit):
        main(["run", str(path), "--launcher", "slurm", "--time", "soon"])
    with pytest.raises(SystemExit):
        main(["run", str(path), "--launcher", "slurm", "--mem", "32GB"])
    assert main(["run", str(path), "--launcher", "slurm", "--slurm-param", "=x"]) == 2
    no_time = path.read_text().replace('time = "1:00:00"\n', "")
    path.write_text(no_time)
    assert main(["run", str(path), "--out", str(tmp_path / "o2"), "--launcher", "slurm"]) == 2
    assert "--time: a Slurm job needs a time limit" in capsys.readouterr().err


@pytest.mark.distributed
def test_a_run_with_two_gpus_per_run_trains_with_ddp_inside_its_job(lab):
    pytest.importorskip("submitit")
    # short runs: two processes sum in another order, and training amplifies the difference
    short = {"variants": ["gn"], "overrides": ["train.steps=20"], "device": "cpu"}
    run_experiment(lab.exp, lab.tmp / "one", threads=1, **short)
    out = lab.tmp / "ddp"
    opts = LaunchOptions(
        wait=True, cluster="local", resources=Launcher(gpus_per_run=2, cpus_per_run=2)
    )
    suite = run_experiment(lab.exp, out, launcher="slurm", options=opts, **short)
    assert [r["status"] for r in suite["runs"]] == ["trained"]
    d = out / "gn" / "seed0"
    assert json.loads((d / "summary.json").read_text())["world_size"] == 2
    assert attempts(d) == 1  # rank 0 alone claimed it
    ddp, one = metrics(d), metrics(lab.tmp / "one" / "gn" / "seed0")
    assert [m[:2] for m in ddp] == [m[:2] for m in one]  # steps and test accuracies
    for a, b in zip(ddp, one, strict=True):
        assert a[2:] == pytest.approx(b[2:], rel=1e-5)  # train and test loss
