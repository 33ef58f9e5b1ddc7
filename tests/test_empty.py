"""Every registered normalization on an empty batch, alone and under ``normlab.sync_stats``.

Oracle: torch's ``nn.BatchNorm2d`` behaviour. A ``(0, C)`` or ``(0, C, 4, 4)`` input, in training
and in eval, gives an empty output of the input's shape and dtype, leaves every statistics buffer
bit-for-bit untouched (the ``num_batches_tracked`` counter may count the call, as torch's does),
and back-propagates: the input gradient has the input's shape and every parameter gradient is
exactly zero (a NaN would show). A layer may instead refuse with a ``ValueError`` that says so.

Synchronised (every layer with ``sync_batch_stats = True``): two gloo processes, rank 0 holding
the samples and rank 1 none, run two training steps and an eval step. Rank 1 must join every
collective, forward and backward (a layer that skips one hangs: the collectives have a timeout,
each layer runs on its own process group, and the ranks meet on a separate group between
layers, so one hanging layer cannot disturb the next). Rank 0 must get exactly (float64,
rounding only) the one-process result on its own samples: outputs, input and parameter
gradients, buffers, eval output; rank 1's running statistics must be the same as rank 0's.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

import normlab
from normlab.nn.sync import sync_stats

C = 8
NAMES = sorted(normlab.available_norms())
SHAPES = {"NC": (0, C), "NCHW": (0, C, 4, 4)}
COUNTERS = {"num_batches_tracked"}  # torch's BatchNorm counts an empty call too


def _layer(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = normlab.make_norm(name, C).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _warm_up(layer: torch.nn.Module, shape: tuple[int, ...]) -> None:
    """Two training steps on real data, so the buffers hold non-trivial values."""
    layer.train()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(2):
            torch.manual_seed(4)
            layer(torch.randn((6, *shape[1:]), generator=gen, dtype=torch.float64).float() + 0.5)


# ---------------------------------------------------------------------------------------------
# one process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_like_batchnorm(name: str, shape_id: str, training: bool) -> None:
    shape = SHAPES[shape_id]
    layer = _layer(name)
    _warm_up(layer, shape)
    layer.train(training)
    before = {n: b.clone() for n, b in layer.named_buffers()}
    x = torch.randn(shape, requires_grad=True)
    try:
        y = layer(x)
    except ValueError as e:  # an explicit refusal is allowed, if it says what is wrong
        assert "empty" in str(e).lower() or str(tuple(shape)) in str(e), str(e)
        return
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for n, p in layer.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, torch.zeros_like(p)), f"gradient of {n}: {p.grad}"
    for n, b in layer.named_buffers():
        if n.split(".")[-1] in COUNTERS:
            assert int(b) - int(before[n]) in (0, 1), n
        else:
            assert torch.equal(b, before[n]), f"buffer {n} changed on an empty batch"


def test_torch_batchnorm_is_the_oracle() -> None:
    """What the test above asks for is what torch's own BatchNorm does."""
    bn = torch.nn.BatchNorm2d(C)
    bn.running_mean.fill_(0.5)
    x = torch.randn(0, C, 4, 4, requires_grad=True)
    y = bn(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(bn.running_mean, torch.full((C,), 0.5))
    assert torch.equal(bn.weight.grad, torch.zeros(C)) and int(bn.num_batches_tracked) == 1


# ---------------------------------------------------------------------------------------------
# two processes, one of them without samples
# ---------------------------------------------------------------------------------------------

SYNCED = [n for n in NAMES if getattr(type(normlab.make_norm(n, C)), "sync_batch_stats", False)]
SYNC_SHAPES = {"NC": (6, C), "NCHW": (3, C, 4, 4)}
STEPS = 2
LAYER_TIMEOUT = 20  # seconds a collective may wait before it fails (a skipped collective)
CONTROL_TIMEOUT = 120  # the ranks meet between layers; longer than any layer's timeout
DEADLINE = 600  # the whole spawn, as a last resort


def _data(shape: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS + 1):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.3
        out.append((x, torch.randn(shape, generator=gen, dtype=torch.float64)))
    return out


def _run(name: str, shape: tuple[int, ...], samples: bool, synced: bool, group=None) -> dict:
    """Two training steps and an eval step of a float64 layer on all of ``_data`` (or on none
    of it: ``samples=False``), seeded before each step; everything that comes out."""
    layer = _layer(name, torch.float64)
    if synced:
        layer = sync_stats(layer, group)
    out: dict[str, torch.Tensor] = {}
    for step, (x, gy) in enumerate(_data(shape)):
        training = step < STEPS
        layer.train(training)
        xr = (x if samples else x[:0]).clone().requires_grad_()
        torch.manual_seed(10 + step)
        y = layer(xr)
        (y * (gy if samples else gy[:0])).sum().backward()
        out[f"{step} y"], out[f"{step} x.grad"] = y.detach(), xr.grad
        for n, p in layer.named_parameters():
            if p.grad is not None:
                out[f"{step} {n}.grad"] = p.grad.clone()
                p.grad = None
        for n, b in layer.named_buffers():
            out[f"{step} buffer {n}"] = b.clone()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str, cases: list[tuple[str, str]]) -> None:
    torch.set_num_threads(1)
    dist = torch.distributed
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=CONTROL_TIMEOUT),
    )
    try:
        for name, sid in cases:
            group = dist.new_group([0, 1], timeout=timedelta(seconds=LAYER_TIMEOUT))
            try:
                result: dict | str = _run(name, SYNC_SHAPES[sid], rank == 0, True, group)
            except Exception:  # recorded and reported by the test; the next layer still runs
                result = traceback.format_exc(limit=4)
            torch.save({"result": result}, os.path.join(out_dir, f"{name}-{sid}-rank{rank}.pt"))
            dist.barrier()  # the default group: both ranks are done with this layer
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict:
    """``{(name, shape_id): [rank 0's, rank 1's]}``, each a dict or the error text (or
    ``None``: no result before the deadline)."""
    tmp = tmp_path_factory.mktemp("empty_sync")
    cases = [(n, s) for n in SYNCED for s in SYNC_SHAPES]
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(tmp), cases), nprocs=2, join=False, start_method="spawn"
    )
    stop = time.monotonic() + DEADLINE
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > stop:
                break
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = {}
    for case in cases:
        paths = [tmp / f"{case[0]}-{case[1]}-rank{r}.pt" for r in (0, 1)]
        out[case] = [
            torch.load(p, weights_only=True)["result"] if p.exists() else None for p in paths
        ]
    return out


def _ok(results: list) -> list[dict]:
    for rank, r in enumerate(results):
        assert r is not None, f"rank {rank}: no result (the spawn hung past its deadline)"
        assert isinstance(r, dict), f"rank {rank} failed:\n{r}"
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("shape_id", SYNC_SHAPES)
@pytest.mark.parametrize("name", SYNCED)
def test_rank_with_samples_gets_the_one_process_result(two_process_results, name, shape_id):
    full, _ = _ok(two_process_results[(name, shape_id)])
    alone = _run(name, SYNC_SHAPES[shape_id], samples=True, synced=False)
    assert full.keys() == alone.keys()
    for key, want in alone.items():
        torch.testing.assert_close(full[key], want, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.distributed
@pytest.mark.parametrize("shape_id", SYNC_SHAPES)
@pytest.mark.parametrize("name", SYNCED)
def test_empty_rank_uses_the_others_statistics(two_process_results, name, shape_id):
    """Rank 1 (no samples) gets empty outputs and the same running statistics as rank 0."""
    full, empty = _ok(two_process_results[(name, shape_id)])
    for key, value in empty.items():
        if key.endswith(" y") or key.endswith("x.grad"):
            assert value.shape[0] == 0 and value.shape[1:] == full[key].shape[1:], key
        elif " buffer " in key and value.is_floating_point():
            torch.testing.assert_close(value, full[key], rtol=1e-10, atol=1e-12, msg=key)


def test_layers_that_synchronise_are_found() -> None:
    assert {"bn", "iternorm", "dbn"} <= set(SYNCED)
    assert "gn" not in SYNCED


def test_one_process_oracle_differs_from_an_empty_share() -> None:
    """The two-process comparison can fail: without synchronisation an empty share keeps its
    initial statistics, unlike the rank with samples."""
    full = _run("iternorm", SYNC_SHAPES["NC"], samples=True, synced=False)
    empty = _run("iternorm", SYNC_SHAPES["NC"], samples=False, synced=False)
    assert not torch.allclose(full["1 buffer running_wm"], empty["1 buffer running_wm"])
