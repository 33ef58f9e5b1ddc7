"""A failure on one process of a multi-process run reaches the others as the failing rank's error.

Two gloo processes train together; one raises in a callback while the other goes on into the
next step's gradient all-reduce. Without forwarding, that process waits in the collective until
the peer process exits and then fails with gloo's "connection closed by peer" (or waits for the
timeout). With it, it raises :class:`RemoteRankError` naming the rank, the exception type and
its message, long before the collective's timeout. The store that carries the record is rank 0's
TCP store, so the case where rank 0 itself fails is covered too.
"""

from __future__ import annotations

import pickle
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from normlab.train import RemoteRankError, load_config
from normlab.train.ddp import DDPContext
from normlab.train.loop import Trainer

pytestmark = pytest.mark.distributed

TIMEOUT_S = 120  # the process group's collective timeout
SET = [
    "train.steps=6",
    "train.batch_size=32",
    "model.kwargs.width=0.5",
    "run.progress=off",
    "run.threads=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fail_rank: int, out: str) -> None:
    torch.set_num_threads(1)
    dist = torch.distributed
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    res: dict = {"rank": rank}
    try:
        trainer = Trainer(load_config(None, SET), write=False)
        trainer.dist.failure_grace_s = 0.5
        trainer.dist.ack_timeout_s = TIMEOUT_S / 2  # a peer left hanging shows in its time

        def fail(tr: Trainer) -> None:
            if tr.step == 3 and rank == fail_rank:
                raise ValueError(f"boom on rank {rank} at step 3")

        trainer.callbacks.append(fail)
        t0 = time.monotonic()
        try:
            trainer.fit()
        except Exception as e:
            res["seconds"] = time.monotonic() - t0
            res["type"] = type(e).__name__
            res["message"] = str(e)
            res["attrs"] = {k: getattr(e, k, None) for k in ("rank", "exc_type", "remote_message")}
            res["traceback"] = getattr(e, "remote_traceback", "")
        res["group_alive"] = dist.is_initialized()
        res["step"] = trainer.step
    finally:
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(res))
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(fail_rank: int, out: Path) -> list[dict]:
    ctx = mp.start_processes(
        _worker,
        args=(_free_port(), fail_rank, str(out)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 3 * TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a process hung after its peer failed")
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]


@pytest.mark.parametrize("fail_rank", [1, 0])
def test_the_failing_rank_error_reaches_the_other_process(tmp_path, fail_rank):
    results = _spawn(fail_rank, tmp_path)
    failed, other = results[fail_rank], results[1 - fail_rank]
    message = f"boom on rank {fail_rank} at step 3"
    # the failing process raises its own exception
    assert (failed["type"], failed["message"]) == ("ValueError", message), failed
    # the other one the forwarded error: rank, type and message, well before the timeout
    assert other["type"] == "RemoteRankError", other
    assert other["attrs"] == {
        "rank": fail_rank,
        "exc_type": "ValueError",
        "remote_message": message,
    }
    assert other["message"] == f"rank {fail_rank} failed with ValueError: {message}"
    assert "ValueError" in other["traceback"] and "fail" in other["traceback"]
    assert other["seconds"] < TIMEOUT_S / 4, other
    assert other["step"] == 3  # it never completed the step its peer left
    # the group is gone on both (it cannot be used once a process left it)
    assert not failed["group_alive"] and not other["group_alive"]


def test_remote_rank_error_pickles_and_one_process_is_untouched():
    e = RemoteRankError(1, "ValueError", "boom", "Traceback ...")
    again = pickle.loads(pickle.dumps(e))
    assert (again.rank, again.exc_type, again.remote_message) == (1, "ValueError", "boom")
    assert str(again) == str(e) == "rank 1 failed with ValueError: boom"
    # one process: the guard lets the exception through unchanged, on_main just calls
    ctx = DDPContext(torch.device("cpu"))
    assert not ctx.enabled and ctx.on_main(lambda: 7) == 7
    with pytest.raises(KeyError, match="x"), ctx.guard():
        raise KeyError("x")
