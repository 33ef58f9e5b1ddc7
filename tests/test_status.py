"""``normlab status``: finished, running, queued and failed runs with their details and totals,
read from the run directories."""

from __future__ import annotations

import json

from launch_helpers import sleeper, write_experiment, write_lock
from normlab.cli import main
from normlab.experiments import load_experiment, run_experiment


def _lines(text: str) -> dict[str, str]:
    """The line of each run, by variant."""
    return {line.split()[0]: line for line in text.splitlines()[3:] if not line.startswith(" ")}


def test_status_shows_every_state_with_its_details_and_the_totals(tmp_path, capsys):
    exp = load_experiment(write_experiment(tmp_path, steps=10, broken=True))
    out = tmp_path / "out"
    other = sleeper()  # another launcher, training gn and about to train ln
    try:
        write_lock(out / "gn" / "seed0", pid=other.pid, step=7, total=10)
        write_lock(out / "ln" / "seed0", pid=other.pid)
        suite = run_experiment(exp, out, keep_going=True, variants=["bn", "gn", "ln", "broken"])
        assert [r["status"] for r in suite["runs"]] == ["trained", "busy", "busy", "failed"]
        (out / "ln" / "seed0" / "claim.lock").unlink()  # it never started
        assert main(["status", str(out)]) == 0
        text = capsys.readouterr().out
        assert "4 runs: 1 finished, 1 running, 1 queued, 1 failed" in text.splitlines()[0]
        runs = _lines(text)
        assert runs["bn"].split()[2] == "finished"
        assert "final " in runs["bn"] and "best " in runs["bn"] and "10 steps" in runs["bn"]
        gn = runs["gn"]
        assert gn.split()[2] == "running" and f"pid {other.pid}" in gn
        assert "since 2024-01-01" in gn and "step 7/10" in gn and "heartbeat" in gn
        assert runs["ln"].split()[2] == "queued" and "not started" in runs["ln"]
        broken = runs["broken"]
        assert broken.split()[2] == "failed" and "MissingFileError" in broken
        assert "attempt 1" in broken
        log = [line for line in text.splitlines() if line.lstrip().startswith("|")]
        assert len(log) == 8  # the end of its log: the traceback's last lines
        assert "MissingFileError" in log[-1] or "MissingFileError" in log[-2]
        assert main(["status", str(out), "--json"]) == 0
        states = [r["state"] for r in json.loads(capsys.readouterr().out)]
        assert states == ["finished", "running", "queued", "failed"]
    finally:
        other.kill()
        other.wait()
    # the other launcher died: its run is queued again (a stale claim), here after 4 steps
    (out / "gn" / "seed0" / "metrics.jsonl").write_text(json.dumps({"step": 4}) + "\n")
    assert main(["status", str(out)]) == 0
    gn = _lines(capsys.readouterr().out)["gn"]
    assert gn.split()[2] == "queued"
    assert "stopped after step 4" in gn and "stale claim of" in gn and "has ended" in gn


def test_status_of_a_directory_that_is_no_suite(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not an experiment run directory" in capsys.readouterr().err
