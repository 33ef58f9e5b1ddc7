"""Claims: one owner per run directory; a live claim is respected, a dead owner, an expired
heartbeat or an earlier attempt of the same job is taken over (by exactly one contender); the
heartbeat keeps a claim fresh and notices its loss; a failure leaves a marker."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

import pytest

from launch_helpers import sleeper, write_experiment, write_lock
from normlab.experiments import load_experiment, plan_runs
from normlab.experiments.claims import (
    ClaimPolicy,
    RunClaim,
    clear_failure,
    read_claim,
    read_failure,
    record_failure,
)
from normlab.experiments.runs import execute_claimed
from normlab.train import read_metrics

FAST = ClaimPolicy(heartbeat_s=0.05, expire_s=30.0)


def test_a_live_claim_is_respected_and_a_dead_owner_is_taken_over(tmp_path):
    proc = sleeper()
    try:
        write_lock(tmp_path, pid=proc.pid)
        claim = RunClaim(tmp_path, policy=FAST)
        assert not claim.acquire()
        assert claim.holder["pid"] == proc.pid
        assert read_claim(tmp_path)["pid"] == proc.pid  # untouched
    finally:
        proc.kill()
        proc.wait()
    claim = RunClaim(tmp_path, policy=FAST)
    assert claim.acquire()
    assert f"process {proc.pid}" in claim.took_over and "ended" in claim.took_over
    info = read_claim(tmp_path)
    assert info["token"] == claim.token and info["pid"] == os.getpid()
    claim.release()
    assert read_claim(tmp_path) is None


def test_an_expired_heartbeat_is_taken_over_a_fresh_one_is_not(tmp_path):
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    write_lock(fresh, host="another-node", pid=1, heartbeat=time.time() - 5)
    write_lock(old, host="another-node", pid=1, heartbeat=time.time() - 100)
    assert not RunClaim(fresh, policy=FAST).acquire()
    claim = RunClaim(old, policy=FAST)
    assert claim.acquire() and "no heartbeat for 100 s" in claim.took_over
    claim.release()
    # a claim whose owner is still writing it (unreadable) is live until it is old
    half = tmp_path / "half"
    half.mkdir()
    (half / "claim.lock").write_text('{"tok')
    assert not RunClaim(half, policy=FAST).acquire()
    past = time.time() - 100
    os.utime(half / "claim.lock", (past, past))
    assert RunClaim(half, policy=FAST).acquire()


def test_a_requeued_job_takes_over_the_claim_of_its_earlier_attempt(tmp_path):
    write_lock(tmp_path, host="node-7", pid=1234, job_id="55_3")  # a fresh heartbeat
    assert not RunClaim(tmp_path, job_id="55_4", policy=FAST).acquire()  # another array task
    claim = RunClaim(tmp_path, job_id="55_3", policy=FAST)
    assert claim.acquire() and "earlier attempt of job 55_3" in claim.took_over
    claim.release()


def test_the_heartbeat_refreshes_the_claim_and_notices_its_loss(tmp_path):
    claim = RunClaim(tmp_path, job_id="7", launcher="ray", policy=FAST)
    assert claim.acquire()
    first = read_claim(tmp_path)
    assert (first["job_id"], first["launcher"], first["expire_s"]) == ("7", "ray", 30.0)
    claim.progress(7, 30)
    time.sleep(0.4)
    info = read_claim(tmp_path)
    assert info["heartbeat"] > first["heartbeat"] and (info["step"], info["total_steps"]) == (7, 30)
    assert not claim.lost.is_set()
    write_lock(tmp_path, host="another-node", pid=1)  # taken over behind its back
    for _ in range(100):
        if claim.lost.is_set():
            break
        time.sleep(0.02)
    assert claim.lost.is_set()
    claim.release()
    assert read_claim(tmp_path)["host"] == "another-node"  # not removed: it is not ours


def _contend(run_dir, barrier, results) -> None:
    barrier.wait()
    claim = RunClaim(run_dir, policy=FAST)
    results.put(claim.acquire())
    time.sleep(1.0)  # hold it while the others look
    claim.release()


@pytest.mark.parametrize("stale", [False, True], ids=["fresh-directory", "stale-claim"])
def test_of_many_contenders_exactly_one_wins(tmp_path, stale):
    if stale:
        write_lock(tmp_path, host="another-node", pid=1, heartbeat=time.time() - 1000)
    ctx = mp.get_context("fork")
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(tmp_path, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    won = [results.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
    assert sorted(won) == [False] * (n - 1) + [True]
    assert not list(tmp_path.glob(".claim.takeover-*"))


def test_claim_policy_and_failure_markers(tmp_path):
    with pytest.raises(ValueError, match="heartbeat_s"):
        ClaimPolicy(heartbeat_s=0)
    with pytest.raises(ValueError, match="must exceed heartbeat_s"):
        ClaimPolicy(heartbeat_s=10, expire_s=5)
    for attempt in (1, 2):
        try:
            raise OSError("disk full")
        except OSError as e:
            rec = record_failure(tmp_path, e)
        assert rec["attempt"] == attempt
    marker = read_failure(tmp_path)
    assert marker["error"] == "OSError: disk full" and "Traceback" in marker["traceback"]
    assert marker["owner"]["pid"] == os.getpid()
    clear_failure(tmp_path)
    assert read_failure(tmp_path) is None


@pytest.fixture
def spec(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, steps=150))
    (s,) = plan_runs(exp, tmp_path / "out", variants=["gn"])
    return exp, s


def test_a_run_with_a_live_claim_elsewhere_or_finished_meanwhile_is_not_trained(spec):
    exp, s = spec
    proc = sleeper()
    try:
        write_lock(s.run_dir, pid=proc.pid)
        out = execute_claimed(exp, s, policy=FAST)
        assert out["status"] == "busy" and f"pid {proc.pid}" in out["holder"]
        assert not (s.run_dir / "config.toml").exists()
    finally:
        proc.kill()
        proc.wait()
    (s.run_dir / "summary.json").write_text("{}")  # another launcher finished it
    assert execute_claimed(exp, s, policy=FAST)["status"] == "skipped"
    assert read_claim(s.run_dir) is None and not (s.run_dir / "metrics.jsonl").exists()


def test_a_launcher_that_loses_its_claim_stops_its_run(spec):
    exp, s = spec
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(execute_claimed(exp, s, policy=FAST)))
    run.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        info = read_claim(s.run_dir)
        if info and info.get("step"):
            break
        time.sleep(0.01)
    write_lock(s.run_dir, host="another-node", pid=1)  # another launcher took it over
    run.join(timeout=60)
    assert result["status"] == "lost"
    assert not (s.run_dir / "summary.json").exists()
    steps = [r["step"] for r in read_metrics(s.run_dir)]  # none if it stopped before step 10
    assert steps == sorted(set(steps)) and all(k < 150 for k in steps)
    assert "stopped: " in (s.run_dir / "run.log").read_text()
