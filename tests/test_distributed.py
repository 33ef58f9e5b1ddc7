"""Statistics synchronised across processes: ``normlab.sync_stats``.

The oracle of the two-process tests is the *unsynchronised* layer (torch's own ``F.batch_norm``
for bn/bcn, ``torch.var_mean`` for the standardization loss, the layers' own single-process code for
mode/iternorm/dbn) run in one process on the whole batch. Two gloo processes on CPU each hold part
of that batch (5 and 3 samples: uneven on purpose, so counts must be all-reduced) and must
reproduce, in float64, the outputs, the input gradients (their slice), the parameter gradients
(summed over processes: the global loss is the sum of the per-process losses) and the running
buffers, over two training steps, then the eval outputs. One DDP step (gradient averaging) must
leave the same parameters and buffers as one single-process step. All of it runs in one spawn.

MixtureNorm fits a mixture per batch from random k-means++ seeds: synchronised, the seeding uses
rank 0's draws on the global point set, so with rank 0 seeded like the single process (and rank 1
seeded differently on purpose) both sides fit the same mixture; the seeding and the whole fit of
the engine are also compared directly, and fits on per-process random subsets
(``sample_fraction < 1``) must at least be identical on every process.
"""

from __future__ import annotations

import copy
import itertools
import os
import warnings
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import normlab
from normlab.nn import gmm, stats
from normlab.nn.standard import batch_norm_from_sums
from normlab.nn.std_loss import standardization_moments, synced_standardization_moments
from normlab.nn.sync import (
    register_batch_stats_layer,
    sync_stats,
    synced_layers,
    unsync_stats,
)

pytestmark = pytest.mark.distributed

SPLIT = (5, 3)  # samples per process; the single-process run holds all 8
WORLD = len(SPLIT)
STEPS = 2


# ----------------------------------------------------------------------------------------------
# Cases: a model builder (deterministic), the per-sample input shape, data offset/scale, and
# whether a synchronised StandardizationLoss is added to the loss.
# ----------------------------------------------------------------------------------------------


def _torch_bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 1),
        nn.BatchNorm2d(5, momentum=None),
    )


def _std_conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(6, 5, 1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 7),
        nn.Tanh(),
        nn.Linear(7, 3),
    )


def _mixture_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        normlab.make_norm("mixture(k=3, em_iters=2, inference='literal')", 6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 1),
        normlab.make_norm("mixture(k=2, em_iters=1)", 4),
    )


def _std_seq_net() -> nn.Module:  # Linear on (N, T, F): channels last, statistics over N and T
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


# Layers without running statistics use their own batch's statistics in eval mode, where nothing is
# synchronised (as in nn.SyncBatchNorm): their eval oracle is the process's part alone.
EVAL_LOCAL = {"bn_no_running"}

CASES: dict[str, tuple] = {
    # name: (builder, per-sample shape, offset, scale, std_loss)
    "bn_4d": (lambda: normlab.BatchNorm(5), (5, 4, 4), 3.0, 2.0, False),
    "bn_2d_cma": (lambda: normlab.BatchNorm(5, momentum=None), (5,), -1.0, 0.5, False),
    "bn_no_running": (
        lambda: normlab.BatchNorm(4, affine=False, track_running_stats=False),
        (4, 3),
        2.0,
        1.0,
        False,
    ),
    "torch_bn_net": (_torch_bn_net, (3, 4, 4), 0.5, 1.0, False),
    "sn_4d": (lambda: normlab.SwitchNorm(5), (5, 3, 3), 1.0, 2.0, False),
    "brn_4d": (lambda: normlab.BatchRenorm(5, r_max=2.0, d_max=1.0), (5, 3, 3), 1.0, 2.0, False),
    "bcn_large": (lambda: normlab.BCNorm(6, num_groups=3), (6, 4, 4), 1.0, 2.0, False),
    "bcn_large_2d": (lambda: normlab.BCNorm(6, num_groups=2), (6,), 0.0, 1.0, False),
    "bcn_micro": (
        lambda: normlab.BCNorm(6, num_groups=2, micro_batch=True, rate=0.3),
        (6, 3, 3),
        2.0,
        1.5,
        False,
    ),
    # layers written to take every batch sum from normlab.nn.stats: synchronised by the seam alone
    "mode": (lambda: normlab.make_norm("mode(k=3)", 6), (6, 4, 4), 1.0, 2.0, False),
    "mode_2d": (lambda: normlab.make_norm("mode(k=2)", 6), (6,), -1.0, 1.0, False),
    "iternorm": (
        lambda: normlab.make_norm("iternorm(group_size=4, iters=4)", 6),
        (6, 3, 3),
        1.0,
        2.0,
        False,
    ),
    "dbn": (lambda: normlab.make_norm("dbn(group_size=3)", 6), (6, 4, 4), 1.0, 2.0, False),
    "fixedstats": (
        lambda: normlab.make_norm("fixedstats(sigma_mu=1.0, sigma_sigma=0.5, seed=3)", 5),
        (5, 3, 3),
        2.0,
        1.0,
        False,
    ),
    # MixtureNorm: the whole fit runs on the global batch; the k-means++ draws are rank 0's, which
    # equal the single process's (same seed), so both sides fit the same mixture
    "mixture": (
        lambda: normlab.make_norm("mixture(k=3, em_iters=2)", 5),
        (5, 4, 4),
        1.0,
        2.0,
        False,
    ),
    # init="warm": the second step is seeded from warm_mean, which must be the same on every rank
    "mixture_warm": (
        lambda: normlab.make_norm("mixture(k=3, em_iters=2, init='warm', warm_momentum=0.5)", 5),
        (5, 4, 4),
        1.0,
        2.0,
        False,
    ),
    "mixture_2d": (
        lambda: normlab.make_norm("mixture(k=2, em_iters=3, queue_size=3)", 6),
        (6,),
        -1.0,
        1.0,
        False,
    ),
    "mixture_hard": (
        lambda: normlab.make_norm("mixture(k=4, em_iters=0, min_weight=0.05)", 4),
        (4, 3, 3),
        0.0,
        1.0,
        False,
    ),
    "mixture_relu": (
        lambda: normlab.make_norm("mixture(k=2, em_iters=4, activation='relu')", 5),
        (5, 3, 3),
        2.0,
        1.5,
        False,
    ),
    "mixture_net": (_mixture_net, (3, 4, 4), 0.0, 1.0, False),
    "std_conv": (_std_conv_net, (3, 4, 4), 0.5, 1.0, True),
    "std_seq": (_std_seq_net, (3, 4), 0.0, 1.0, True),
}


def _build(name: str) -> tuple[nn.Module, normlab.StandardizationLoss | None]:
    builder, *_, with_std = CASES[name]
    torch.manual_seed(1234)
    model = builder().double()
    with torch.no_grad():  # move the affine parameters away from (1, 0)
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    std = normlab.StandardizationLoss(model, weight=0.7) if with_std else None
    return model, std


def _data(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Full-batch inputs and loss weights of every step, and an eval input."""
    _, shape, offset, scale, _ = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    n = sum(SPLIT)

    def draw() -> torch.Tensor:
        return torch.randn((n, *shape), generator=g, dtype=torch.float64) * scale + offset

    xs = [draw() for _ in range(STEPS)]
    model, _ = _build(name)
    with torch.no_grad():
        out_shape = model.eval()(xs[0]).shape
    rs = [torch.randn(out_shape, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    return xs, rs, draw()


def _run(name: str, part: slice, synced: bool, world: int = 1, rank: int = 0) -> dict:
    """Train ``STEPS`` steps on ``x[part]``; the loss is Σ out·R (+ std.loss() / world). Processes
    other than rank 0 start training from a different global RNG state: the random draws of a
    synchronised layer (MixtureNorm's seeding) must be rank 0's."""
    model, std = _build(name)
    if synced:
        model = sync_stats(model, std_loss=std)
    xs, rs, x_eval = _data(name)
    if rank:
        torch.manual_seed(4321 + rank)
    model.train()
    res: dict = {}
    for x_full, r_full in zip(xs, rs, strict=True):
        x = x_full[part].clone().requires_grad_()
        out = model(x)
        loss = (out * r_full[part]).sum()
        if std is not None:
            std_value = std.loss()
            loss = loss + std_value / world
            res["std"] = std_value.detach()
        model.zero_grad()
        loss.backward()
        res["out"], res["xgrad"] = out.detach(), x.grad
    res["pgrad"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    res["buffers"] = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        res["eval"] = model(x_eval[part])
    return res


def _ddp_step(part: slice, world: int) -> dict:
    """One SGD step of a conv/BN net with a synchronised standardization loss under DDP (world >
    1) or in one process on the whole batch (world = 1). DDP averages the gradients, so each
    process's task loss is scaled by ``world``; the standardization loss is added as is."""
    torch.manual_seed(99)
    model = _torch_bn_net().double()
    std = normlab.StandardizationLoss(model, modules=["0", "3"], weight=0.5)
    x_full, r_full = _data("torch_bn_net")[0][0], _data("torch_bn_net")[1][0]
    if world > 1:
        model = sync_stats(model, std_loss=std)
        net = nn.parallel.DistributedDataParallel(model)
    else:
        net = model
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = net(x_full[part])
    (world * (out * r_full[part]).sum() + std.loss()).backward()
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _seeding_data() -> list[tuple[str, torch.Tensor, int, int | None]]:
    """(name, full-batch points, K, n_candidates) for the seeding/fit engine tests."""
    g = torch.Generator().manual_seed(11)
    f64 = torch.float64
    blobs = torch.randn(8, 3, 5, generator=g, dtype=f64)
    blobs = blobs + 4.0 * torch.randint(0, 3, (8, 1, 5), generator=g).to(f64)
    flat = torch.randn(8, 4, generator=g, dtype=f64) * 3.0 + 1.0
    dup = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=f64).repeat(4, 1)  # 2 distinct, K = 3
    return [("blobs", blobs, 4, None), ("flat", flat, 3, 1), ("dup", dup, 3, None)]


def _seeding(part: slice, rank: int) -> dict:
    """k-means++ seeding and a whole fit of every seeding case on ``x[part]``, inside a reduction
    scope over the default group when one is initialised; each rank's generator is seeded
    differently (rank 0 like the single process)."""
    dist = torch.distributed
    group = dist.group.WORLD if dist.is_initialized() else None
    out: dict = {}
    for key, x, k, n_cand in _seeding_data():
        with stats.reduction_scope(group):
            ps = gmm.PointSet(x[part])
            g = torch.Generator().manual_seed(77 + 1000 * rank)
            centers, index = gmm.kmeans_plus_plus(ps, k, n_cand, generator=g)
            out[key] = (centers + ps.shift, index)
            g = torch.Generator().manual_seed(5 + 1000 * rank)
            out[key + "_fit"] = tuple(gmm.fit_gmm(x[part], k, 2, 3, generator=g))
    return out


def _subset_fit(part: slice, rank: int, synced: bool = True) -> dict:
    """A MixtureNorm fitting on a random half of the points (Kalayeh & Shah, Sec. 5.1), two training
    steps; each rank draws its subset from a different RNG state."""
    torch.manual_seed(8)
    layer = normlab.MixtureNorm(4, k=3, em_iters=3, sample_fraction=0.5).double()
    if synced:
        sync_stats(layer)
    g = torch.Generator().manual_seed(12)
    torch.manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randn(sum(SPLIT), 4, 3, 3, generator=g, dtype=torch.float64) * 2.0 + 1.0
        layer(x[part]).sum().backward()
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _parts() -> list[slice]:
    bounds = [0]
    for n in SPLIT:
        bounds.append(bounds[-1] + n)
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _worker(rank: int, init_file: str, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        part = _parts()[rank]
        results = {name: _run(name, part, synced=True, world=WORLD, rank=rank) for name in names}
        results["ddp"] = _ddp_step(part, WORLD)
        results["seeding"] = _seeding(part, rank)
        results["subset"] = _subset_fit(part, rank)
        if rank == 0:  # eval opens no collective: one process alone may run it
            for name in names:
                model, _ = _build(name)
                sync_stats(model).eval()
                with torch.no_grad():
                    model(_data(name)[2])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp), list(CASES)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        actual, expected, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one_process_on_the_whole_batch(two_process_results, name):
    ref = _run(name, slice(None), synced=False)
    ranks = [res[name] for res in two_process_results]
    parts = _parts()
    for r, (res, part) in enumerate(zip(ranks, parts, strict=True)):
        _close(res["out"], ref["out"][part], f"rank {r} output")
        _close(res["xgrad"], ref["xgrad"][part], f"rank {r} input gradient")
        ref_eval = (
            _run(name, part, synced=False)["eval"] if name in EVAL_LOCAL else ref["eval"][part]
        )
        _close(res["eval"], ref_eval, f"rank {r} eval output")
        assert res["buffers"].keys() == ref["buffers"].keys()
        for k, v in ref["buffers"].items():
            if v.is_floating_point():
                _close(res["buffers"][k], v, f"rank {r} buffer {k}")
            else:
                assert torch.equal(res["buffers"][k], v), k
        if "std" in ref:
            _close(res["std"], ref["std"], f"rank {r} standardization loss")
    for n, g in ref["pgrad"].items():
        _close(sum(res["pgrad"][n] for res in ranks), g, f"parameter gradient {n}")


def test_ddp_step_equals_one_process_step(two_process_results):
    ref = _ddp_step(slice(None), 1)
    for r, res in enumerate(two_process_results):
        assert res["ddp"].keys() == ref.keys()
        for k, v in ref.items():
            _close(res["ddp"][k], v, f"rank {r} after one DDP step: {k}")


def test_the_oracle_differs_from_per_process_statistics(two_process_results):
    # guard against a vacuous comparison: unsynchronised halves do NOT match the whole batch
    ref = _run("bn_4d", slice(None), synced=False)
    local = _run("bn_4d", _parts()[0], synced=False)
    assert not torch.allclose(local["out"], ref["out"][_parts()[0]], atol=1e-3)
    assert not torch.allclose(local["buffers"]["running_var"], ref["buffers"]["running_var"])


# ----------------------------------------------------------------------------------------------
# Single process: sync_stats is a no-op, the sums path equals torch's batch norm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_sync_stats_without_process_group_changes_nothing(name):
    assert not torch.distributed.is_initialized()
    plain = _run(name, slice(None), synced=False)
    synced = _run(name, slice(None), synced=True)
    for key in ("out", "xgrad", "eval"):
        assert torch.equal(plain[key], synced[key]), key
    for group in ("pgrad", "buffers"):
        assert plain[group].keys() == synced[group].keys()
        for k in plain[group]:
            assert torch.equal(plain[group][k], synced[group][k]), (group, k)
    assert stats.current_group() is None


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5), (4, 3, 2, 5)])
@pytest.mark.parametrize("running", [True, False])
def test_batch_norm_from_sums_equals_torch_batch_norm(shape, running):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 5
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    ours_rm, ours_rv = (rm.clone(), rv.clone()) if running else (None, None)
    ref_rm, ref_rv = (rm.clone(), rv.clone()) if running else (None, None)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    ba, bb = b.clone().requires_grad_(), b.clone().requires_grad_()
    ya = batch_norm_from_sums(xa, ours_rm, ours_rv, wa, ba, 0.3, 1e-4)
    yb = F.batch_norm(xb, ref_rm, ref_rv, wb, bb, True, 0.3, 1e-4)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    for a, r in ((xa, xb), (wa, wb), (ba, bb)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-9, atol=1e-11)
    if running:
        torch.testing.assert_close(ours_rm, ref_rm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours_rv, ref_rv, rtol=1e-12, atol=1e-12)


def test_batch_norm_from_sums_gradcheck():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm = torch.randn(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, w, b: batch_norm_from_sums(x, rm.clone(), torch.ones(3, dtype=x.dtype), w, b),
        (x, w, b),
    )
    assert torch.autograd.gradgradcheck(lambda x: batch_norm_from_sums(x, None, None), (x,))


def test_batch_norm_from_sums_half_input_and_single_value():
    x = (torch.randn(8, 3, 4) * 2 + 1).to(torch.bfloat16)
    y = batch_norm_from_sums(x)
    assert y.dtype == torch.bfloat16
    ref = F.batch_norm(x.float(), None, None, training=True)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    # one value per channel (allowed: globally there may be more): finite, running var unbiased
    rm, rv = torch.zeros(3), torch.ones(3)
    x1 = torch.randn(1, 3)
    y1 = batch_norm_from_sums(x1, rm, rv, momentum=0.5)
    # variance 0: the value is its own mean, normalized to 0; the running mean moves halfway to
    # it and the running variance halfway to 0 (the unbiased factor n/(n-1) is taken as 1)
    torch.testing.assert_close(y1, torch.zeros(1, 3), atol=2e-4, rtol=0)  # rounding x 1/sqrt(eps)
    torch.testing.assert_close(rm, 0.5 * x1[0])
    torch.testing.assert_close(rv, torch.full((3,), 0.5))


def test_synced_standardization_moments_without_group_equal_var_mean():
    x = torch.randn(5, 4, 3, 2, dtype=torch.float64) * 4 + 100
    for cd in (1, -1, 2):
        m, v = synced_standardization_moments(x, cd, None)
        rm, rv = standardization_moments(x, cd)
        torch.testing.assert_close(m, rm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v, rv, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="channel_dim"):
        synced_standardization_moments(x, 0)


def test_sync_stats_converts_torch_batchnorm_sharing_tensors():
    net = _torch_bn_net()
    before = net.state_dict()
    bn_weight = net[1].weight
    out = sync_stats(net)
    assert out is net
    assert type(net[1]) is normlab.BatchNorm and type(net[4]) is normlab.BatchNorm
    assert net[1].weight is bn_weight and net[4].momentum is None
    assert net.state_dict().keys() == before.keys()
    assert synced_layers(net) == ["1", "4"]
    root = sync_stats(nn.BatchNorm1d(3))  # a torch BN root is replaced: use the return value
    assert isinstance(root, normlab.BatchNorm) and synced_layers(root) == [""]
    kept = sync_stats(_torch_bn_net(), convert_batchnorm=False)
    assert type(kept[1]) is nn.BatchNorm2d and synced_layers(kept) == []


def test_sync_stats_layer_selection_and_undo():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        normlab.BCNorm(8, num_groups=2),
        normlab.make_norm("gn", 8),
        normlab.make_norm("mode", 8),
        normlab.make_norm("iternorm(group_size=4)", 8),
        normlab.make_norm("dbn(group_size=4)", 8),
    )
    sync_stats(net)
    assert synced_layers(net) == ["1", "3", "4", "5"]
    sync_stats(net)  # idempotent: no second set of hooks
    assert len(net[1]._forward_pre_hooks) == 1 and len(net[1]._forward_hooks) == 1
    unsync_stats(net)
    assert synced_layers(net) == [] and not net[1]._forward_pre_hooks

    class MyNorm(nn.Module):
        def forward(self, x):
            return x - stats.channel_sums(x).mean_var()[0].reshape(1, -1)

    register_batch_stats_layer(MyNorm)
    custom = nn.Sequential(nn.Linear(3, 3), MyNorm())
    sync_stats(custom)
    assert synced_layers(custom) == ["1"]
    with pytest.raises(TypeError, match="subclass"):
        register_batch_stats_layer(int)
    with pytest.raises(TypeError, match="process_group"):
        sync_stats(net, process_group="world")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        sync_stats(lambda x: x)


def test_mixture_norm_is_synchronised():
    net = nn.Sequential(normlab.make_norm("mixture", 4), normlab.BatchNorm(4))
    assert sync_stats(net) is net
    assert synced_layers(net) == ["0", "1"]


@pytest.mark.parametrize("key", [case[0] for case in _seeding_data()])
def test_synced_seeding_and_fit_equal_one_process_on_the_whole_batch(two_process_results, key):
    ref = _seeding(slice(None), 0)
    for r, res in enumerate(two_process_results):
        centers, index = res["seeding"][key]
        _close(centers, ref[key][0], f"rank {r} k-means++ centres")
        assert torch.equal(index, ref[key][1]), (r, index, ref[key][1])
        for what, a, b in zip(
            ("weight", "mean", "var"), res["seeding"][key + "_fit"], ref[key + "_fit"], strict=True
        ):
            _close(a, b, f"rank {r} fitted {what}")
    if key == "blobs":  # guard: the draws matter, so rank 1's own generator would seed otherwise
        other = _seeding(slice(None), 1)
        assert not torch.equal(other[key][1], ref[key][1])


def test_synced_subset_fits_are_identical_on_every_process(two_process_results):
    fits = [res["subset"] for res in two_process_results]
    for k in ("queue_weight", "queue_mean", "queue_var", "last_num_components"):
        assert torch.equal(fits[0][k], fits[1][k]), k
    assert torch.isfinite(fits[0]["queue_mean"]).all()
    # guard: without synchronisation the two processes' fits differ
    local = [_subset_fit(part, r, synced=False) for r, part in enumerate(_parts())]
    assert not torch.allclose(local[0]["queue_mean"], local[1]["queue_mean"])


def test_scope_is_closed_after_a_failing_forward_and_deepcopy_works():
    bn = sync_stats(normlab.BatchNorm(3))
    depth = len(stats._STATE.stack)
    with pytest.raises(ValueError, match="channels"):
        bn(torch.randn(4, 5))
    assert len(stats._STATE.stack) == depth and stats.current_group() is None
    clone = copy.deepcopy(bn)
    assert synced_layers(clone) == [""]
    x = torch.randn(4, 3)
    torch.testing.assert_close(clone(x), F.batch_norm(x, None, None, training=True))


def test_reduce_sums_is_the_identity_outside_a_scope():
    a, b = torch.randn(3), torch.randn(2, 2)
    out = stats.reduce_sums(a, b)
    assert out[0] is a and out[1] is b
    with stats.reduction_scope(None):
        assert stats.current_group() is None
        assert stats.reduce_sums(a)[0] is a


def test_std_loss_sync_api():
    net = _std_conv_net()
    std = normlab.StandardizationLoss(net)
    assert not std.synced
    assert sync_stats(net, std_loss=std) is net and std.synced and "synced=True" in repr(std)
    std.unsync()
    assert not std.synced
    with pytest.raises(TypeError, match="ProcessGroup"):
        std.sync(process_group=3)
    with pytest.raises(TypeError, match="StandardizationLoss"):
        sync_stats(net, std_loss=object())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = torch.randn(4, 3, 4, 4)
        std.sync()
        net(x)
        synced = std.loss()
        std.unsync()
        net(x)
        torch.testing.assert_close(synced, std.loss(), rtol=1e-6, atol=1e-6)
