"""Every registered layer on the device of ``pytest --device`` against the same layer on the CPU.

The oracle is the CPU: with the same parameters, inputs and random draws, two training steps (with
an SGD update between them) and an eval forward on the device must give the CPU's outputs, input
and parameter gradients and buffers in float32, up to the rounding of a different reduction order.
MixtureNorm draws its k-means++ seeds with ``torch.rand``, whose CUDA stream differs from the
CPU's; both sides get the same draws here (made on the CPU, then moved). With ``--device cpu``
the comparison runs CPU against CPU (a determinism check).

Also: a few steps of :func:`normlab.train.train` with ``run.device`` set to the device end with
finite losses; and statistics synchronised over NCCL (one process per GPU, ``sync_stats``) equal
one process holding the whole batch — two processes with two GPUs or more, one process (a
single-rank NCCL group) with one; skipped without CUDA (gloo on CPU: ``tests/test_distributed.py``).
"""

from __future__ import annotations

import copy
import math
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import normlab
from normlab.train import load_config, train

C = 16
SHAPES = [(12, C), (6, C, 3, 5)]
TOL = 1e-4  # of the reference's largest magnitude: float32 with another reduction order
# a k-means assignment or an eigendecomposition amplifies rounding differences somewhat
LOOSE = {"mixture": 1e-3, "dbn": 1e-3}
LR = 0.1
_torch_rand = torch.rand


class _CpuRand:
    """Stands in for ``torch.rand``: draws on the CPU from its own generator, then moves the
    numbers to the requested device, so every device sees the same draws."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, *size, device=None, dtype=None, generator=None, **kwargs):
        out = _torch_rand(*size, dtype=dtype, generator=self.gen, **kwargs)
        return out.to(device) if device is not None else out


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    a64, b64 = a.detach().cpu().double(), b.detach().cpu().double()
    if a.dtype == torch.bool or not a.dtype.is_floating_point:
        assert torch.equal(a64, b64), what
        return
    assert torch.isfinite(a64).all(), f"{what}: non-finite values on the device"
    scale = max(1.0, b64.abs().max().item()) if b.numel() else 1.0
    err = (a64 - b64).abs().max().item() if a.numel() else 0.0
    assert err <= tol * scale, f"{what}: max |device − cpu| = {err:.3g} (scale {scale:.3g})"


def _two_steps(
    layer: nn.Module, xs: list[torch.Tensor], gs: list[torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Two training steps (SGD between them) and an eval forward of a copy of ``layer`` on
    ``device``; every output, gradient and buffer, by name."""
    layer = copy.deepcopy(layer).to(device).train()
    out: dict[str, torch.Tensor] = {}
    for i, (x_cpu, g_cpu) in enumerate(zip(xs, gs)):
        x = x_cpu.to(device, copy=True).requires_grad_(True)  # a leaf of its own
        y = layer(x)
        (y * g_cpu.to(device)).sum().backward()
        assert x.grad is not None, "no input gradient"
        out[f"step {i} output"], out[f"step {i} input gradient"] = y.detach(), x.grad
        with torch.no_grad():
            for n, p in layer.named_parameters():
                out[f"step {i} gradient of {n}"] = p.grad.clone()
                p.sub_(LR * p.grad)
                p.grad = None
    out.update({f"buffer {n}": b for n, b in layer.named_buffers()})
    with torch.no_grad():
        out["eval output"] = layer.eval()(xs[0].to(device))
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(normlab.available_norms()))
def test_layer_on_device_matches_cpu(name, shape, device, monkeypatch) -> None:
    torch.manual_seed(0)
    layer = normlab.make_norm(name, C)
    with torch.no_grad():  # non-trivial parameters, so that their gradients are checked
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    xs = [torch.randn(shape) * 1.5 + 0.3 for _ in range(2)]
    gs = [torch.randn(shape) for _ in range(2)]
    monkeypatch.setattr(torch, "rand", _CpuRand(1))
    ref = _two_steps(layer, xs, gs, torch.device("cpu"))
    monkeypatch.setattr(torch, "rand", _CpuRand(1))  # the same draws again
    got = _two_steps(layer, xs, gs, device)
    assert got.keys() == ref.keys()
    for what, value in got.items():
        assert value.device.type == device.type, f"{what} is on {value.device}, not {device}"
        _close(value, ref[what], LOOSE.get(name, TOL), what)


@pytest.mark.parametrize(
    "sets",
    [
        ["model.norm=bn"],
        ["model.norm=mixture(k=2, em_iters=2)", "model.conv=ws"],
        ["model.norm=iternorm", "model.std_loss_weight=0.1"],
    ],
    ids=["bn", "mixture-ws", "iternorm-stdloss"],
)
def test_training_on_device_ends_finite(sets, device) -> None:
    overrides = [
        *sets,
        "train.steps=4",
        "train.batch_size=32",
        "run.progress=off",
        "run.save_checkpoints=false",
        f"run.device={device}",
    ]
    result = train(load_config(None, overrides), write=False)
    assert next(result.model.parameters()).device.type == device.type
    last = result.history[-1]
    assert result.summary["steps"] == 4
    for key in ("train_loss", "test_loss"):
        assert isinstance(last[key], float) and math.isfinite(last[key]), (key, last)


# ----------------------------------------------------------------------------------------------
# NCCL: one process per GPU, synchronised statistics, against one process with the whole batch.
# ----------------------------------------------------------------------------------------------

SPLIT = {1: (8,), 2: (5, 3)}  # samples per process (uneven on purpose); one process holds all 8
DIST_STEPS = 2
DIST_TOL = LOOSE["mixture"]  # the last layer is a MixtureNorm: everything depends on its fit


def _dist_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        normlab.make_norm("bn", 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        normlab.make_norm("mode(k=2)", 8),
        normlab.make_norm("iternorm(group_size=4)", 8),
        normlab.make_norm("bcn(num_groups=2)", 8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        normlab.make_norm("mixture(k=2, em_iters=2)", 6),
    )


def _dist_data() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 3, 4, 4, generator=gen) * 2 + 1 for _ in range(DIST_STEPS)]
    gs = [torch.randn(8, 6, 4, 4, generator=gen) for _ in range(DIST_STEPS)]
    return xs, gs


def _dist_steps(model: nn.Module, part: slice, device: torch.device, rank: int) -> dict:
    """Training steps on this process's part of every batch; outputs, gradients, buffers.
    Convolutions in true float32 (TF32 off), as on both sides of the comparison."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return _dist_steps_tf32_off(model, part, device, rank)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _dist_steps_tf32_off(model: nn.Module, part: slice, device: torch.device, rank: int) -> dict:
    xs, gs = _dist_data()
    dist = torch.distributed
    synced = dist.is_initialized()
    out: dict[str, torch.Tensor] = {}
    for i in range(DIST_STEPS):
        # rank 0 seeds like the single process (MixtureNorm uses rank 0's k-means++ draws)
        torch.manual_seed(10 + i + 100 * rank)
        y = model(xs[i][part].to(device))
        (y * gs[i][part].to(device)).sum().backward()
        out[f"step {i} output"] = y.detach().cpu()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if synced:  # the loss is the sum of the processes' losses
                    dist.all_reduce(p.grad)
                out[f"step {i} gradient of {n}"] = p.grad.cpu()
                p.sub_(LR * p.grad)
                p.grad = None
    out.update({f"buffer {n}": b.cpu() for n, b in model.named_buffers()})
    return out


def _nccl_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        "nccl",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        model = normlab.sync_stats(_dist_net().to(device))
        start = sum(SPLIT[world][:rank])
        part = slice(start, start + SPLIT[world][rank])
        torch.save(_dist_steps(model, part, device, rank), f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2])
def test_nccl_sync_stats_equals_one_process(world, device, tmp_path) -> None:
    if device.type != "cuda":
        pytest.skip("NCCL needs CUDA (run with --device cuda); gloo is tests/test_distributed.py")
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, this machine has {torch.cuda.device_count()}")
    if not torch.distributed.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    mp.spawn(
        _nccl_worker,
        args=(world, str(tmp_path / "init"), str(tmp_path)),
        nprocs=world,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    ref = _dist_steps(_dist_net().to("cuda:0"), slice(0, 8), torch.device("cuda:0"), 0)
    assert all(r.keys() == ref.keys() for r in ranks)
    for what, value in ref.items():
        if what.endswith("output"):
            got = torch.cat([r[what] for r in ranks])
        else:  # gradients are all-reduced and buffers synchronised: every rank holds them
            got = ranks[0][what]
            for rank, res in enumerate(ranks[1:], 1):
                _close(res[what], got, DIST_TOL, f"{what} (rank {rank} vs rank 0)")
        _close(got, value, DIST_TOL, what)
