"""normlab.analysis: SND and conditioning (Huang et al., Sec. 4), StatDiff (Qiao et al., Eq. 35),
acceleration measures (Kalayeh & Shah, Tables 2–6; Collins et al., Table 1) and the fixedstats
layer (Qiao et al., Eq. 33–34)."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab.analysis import (
    StatDiffCollector,
    acceleration,
    acceleration_table,
    best_accuracy,
    best_after_fractions,
    covariance_condition_number,
    learning_curve,
    normalized_condition_number,
    snd,
    snd_from_outputs,
    speedup_curve,
    stat_diff,
    steps_to_target,
)
from normlab.nn.fixedstats import FixedStatsNorm, draw_fixed_stats  # registers "fixedstats"

# ---------------------------------------------------------------- SND (Huang et al., Eq. 9–10)


def test_snd_from_outputs_hand_example():
    # four outputs at the corners of a square of side 2: mean (1, 1), every deviation sqrt(2)
    out = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert snd_from_outputs(out).item() == pytest.approx(math.sqrt(2))
    # (s, C, H, W): the norm is over the whole flattened output, numpy oracle
    o = torch.randn(7, 3, 2, 2, dtype=torch.float64)
    a = o.numpy().reshape(7, -1)
    ref = np.mean(np.linalg.norm(a - a.mean(0), axis=1))
    assert snd_from_outputs(o).item() == pytest.approx(ref, rel=1e-12)


def test_snd_of_bn_at_batch_two_in_one_dimension_is_4p_1_minus_p():
    # Pool: x = 0 and others at +-1. With B = 2, BN maps x to -a (partner +1) or +a (partner -1),
    # a = 0.5 / sqrt(0.25 + eps). If a fraction p of the s draws give +a, Eq. 10 is 4 p (1-p) a.
    pool = torch.tensor([0.0] + [1.0, -1.0] * 20).unsqueeze(1)
    s = 40
    got = snd(
        "bn", pool, 2, num_draws=s, sample_indices=[0], generator=torch.Generator().manual_seed(1)
    )
    a = 0.5 / math.sqrt(0.25 + 1e-5)
    ratio = got.item() / a
    allowed = [4 * j * (s - j) / s**2 for j in range(s + 1)]
    assert min(abs(ratio - v) for v in allowed) < 1e-5
    assert ratio > 0.5  # p is far from 0 and 1 with 40 fair draws


def test_snd_of_batch_independent_layers_is_zero_and_layer_not_mutated():
    data = torch.randn(200, 8, 3, 3)
    g = torch.Generator().manual_seed(0)
    assert (
        snd("gn(num_groups=2)", data, 4, num_samples=3, num_draws=5, generator=g).abs().max() < 1e-5
    )
    bn = nn.BatchNorm2d(8)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bn.eval()
    s = snd(bn, data, 4, num_samples=3, num_draws=5, generator=g)
    assert (s > 0).all()  # run in training mode (batch statistics), hence stochastic
    assert not bn.training
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k])


def test_snd_of_bn_falls_with_batch_size():
    # Huang et al., Fig. 5a (dimension 128 there; 32 here to keep the test fast)
    data = torch.randn(3000, 32)
    g = torch.Generator().manual_seed(0)
    vals = [
        snd("bn", data, b, num_samples=6, num_draws=15, generator=g).mean().item()
        for b in (2, 8, 32, 128)
    ]
    assert all(a > b for a, b in itertools.pairwise(vals)), vals
    assert vals[0] > 3 * vals[-1]


def test_snd_of_bn_rises_with_dimension_at_batch_two():
    # Huang et al., Fig. 5b
    g = torch.Generator().manual_seed(0)
    vals = []
    for d in (2, 8, 32, 128):
        data = torch.randn(2000, d)
        vals.append(snd("bn", data, 2, num_samples=6, num_draws=15, generator=g).mean().item())
    assert all(a < b for a, b in itertools.pairwise(vals)), vals


def test_snd_validates_arguments():
    data = torch.randn(10, 4)
    with pytest.raises(ValueError, match="batch_size"):
        snd("bn", data, 11)
    with pytest.raises(ValueError, match="num_draws"):
        snd("bn", data, 2, num_draws=0)
    with pytest.raises(ValueError, match="sample_indices"):
        snd("bn", data, 2, sample_indices=[10])


# ------------------------------------------------------- conditioning (Huang et al., Fig. 4)


def test_covariance_condition_number_matches_numpy_and_singular_is_inf():
    y = torch.randn(50, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    cov = np.cov(y.numpy(), rowvar=False, bias=True)
    assert covariance_condition_number(y).item() == pytest.approx(np.linalg.cond(cov), rel=1e-8)
    # channel-first (N, C, H, W): points are the C-vectors at every position
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    pts = x.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    ref = np.linalg.cond(np.cov(pts, rowvar=False, bias=True))
    assert covariance_condition_number(x).item() == pytest.approx(ref, rel=1e-8)
    # fewer points than dimensions: singular covariance
    assert math.isinf(covariance_condition_number(torch.randn(3, 5)).item())


def _correlated_gaussian(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    lam = torch.logspace(-1, 1, d)
    return torch.randn(n, d, generator=g) @ (q * lam.sqrt()).t()


def test_condition_numbers_dbn_one_iternorm_between_dbn_and_bn():
    data = _correlated_gaussian(4000, 16)
    g = torch.Generator().manual_seed(0)
    kw = {"num_batches": 2, "generator": g}
    bn = normalized_condition_number("bn", data, 512, **kw).mean().item()
    dbn = normalized_condition_number("dbn(group_size=16)", data, 512, **kw).mean().item()
    it = normalized_condition_number("iternorm(group_size=16, iters=5)", data, 512, **kw).mean()
    assert dbn == pytest.approx(1.0, abs=1e-2)
    assert dbn < it.item() < bn
    assert bn > 10  # the data are strongly correlated, so BN alone is ill-conditioned


# ---------------------------------------------------------------- StatDiff (Qiao et al., Eq. 35)


def test_stat_diff_zero_for_identical_channel_statistics():
    mean = torch.full((12,), 0.7)
    var = torch.full((12,), 2.5)
    assert torch.equal(stat_diff(mean, var, 3), torch.zeros(3))
    # identical means but different variances: the numerator is still 0
    assert torch.equal(stat_diff(mean, torch.rand(12) + 0.1, 4), torch.zeros(4))


def test_stat_diff_hand_computation():
    # group 0: means 1, 3 -> population std 1; stds 1, 3 -> mean 2 -> 0.5
    # group 1: means 0, 2 -> std 1; stds 2, 2 -> 0.5 ... and a third group with equal means
    mean = torch.tensor([1.0, 3.0, 0.0, 2.0, 5.0, 5.0])
    var = torch.tensor([1.0, 9.0, 4.0, 4.0, 1.0, 4.0])
    assert torch.allclose(stat_diff(mean, var, 3), torch.tensor([0.5, 0.5, 0.0]))
    # one group (LN): means std = sqrt(E[mu^2] - E[mu]^2), numpy oracle
    mu, v = mean.numpy().astype(np.float64), var.numpy().astype(np.float64)
    ref = math.sqrt(np.mean(mu**2) - np.mean(mu) ** 2) / np.mean(np.sqrt(v))
    assert stat_diff(mean, var, 1).item() == pytest.approx(ref, rel=1e-6)
    # batched leading dimensions
    m2, v2 = torch.randn(5, 8), torch.rand(5, 8)
    assert stat_diff(m2, v2, 2).shape == (5, 2)
    assert torch.allclose(stat_diff(m2, v2, 2)[3], stat_diff(m2[3], v2[3], 2))


def test_stat_diff_validates():
    with pytest.raises(ValueError, match="num_groups=3 must divide"):
        stat_diff(torch.zeros(8), torch.ones(8), 3)
    with pytest.raises(ValueError, match="same shape"):
        stat_diff(torch.zeros(8), torch.ones(4), 1)
    assert torch.isfinite(stat_diff(torch.tensor([0.0, 1.0]), torch.zeros(2), 1)).all()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = normlab.make_norm("gn(num_groups=4)", 8)
        self.conv2 = normlab.WSConv2d(8, 6, 3, padding=1)
        self.norm2 = normlab.make_norm("ln", 6)

    def forward(self, x):
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


class _FakeTrainer:
    def __init__(self, step):
        self.step = step


def test_stat_diff_collector_running_statistics_and_groups():
    net = _Net()
    col = StatDiffCollector(net, momentum=0.25)
    assert col.groups == {"conv1": 4, "conv2": 1}
    captured = []
    h = net.conv1.register_forward_hook(lambda m, a, o: captured.append(o.detach().double()))
    x1, x2 = torch.randn(4, 3, 5, 5), torch.randn(6, 3, 5, 5) * 2 + 1
    net(x1)
    net(x2)
    net.eval()
    net(torch.randn(3, 3, 5, 5) * 10)  # eval passes are not collected
    h.remove()
    # hand computation: the first batch initialises, then a lerp with rate 0.25
    m1 = [o.mean((0, 2, 3)) for o in captured[:2]]
    m2 = [(o * o).mean((0, 2, 3)) for o in captured[:2]]
    mean = 0.75 * m1[0] + 0.25 * m1[1]
    sq = 0.75 * m2[0] + 0.25 * m2[1]
    assert torch.allclose(col.running_mean["conv1"].double(), mean, atol=1e-5)
    assert torch.allclose(col.running_var("conv1").double(), sq - mean**2, atol=1e-4)
    sd = col.stat_diff()
    assert set(sd) == {"conv1", "conv2"} and sd["conv1"].shape == (4,) and sd["conv2"].shape == (1,)
    ref = stat_diff(mean.float(), (sq - mean**2).float(), 4)
    assert torch.allclose(sd["conv1"], ref, atol=1e-4)
    # summary: mean and std over the per-layer averages; callback records every `every` steps
    summ = col.summary()
    layer_avgs = [sd["conv1"].mean().item(), sd["conv2"].mean().item()]
    assert summ["mean"] == pytest.approx(np.mean(layer_avgs), rel=1e-6)
    assert summ["std"] == pytest.approx(np.std(layer_avgs), rel=1e-5)
    col.every = 2
    col(_FakeTrainer(3))
    col(_FakeTrainer(4))
    assert [r["step"] for r in col.history] == [4]
    col.remove()
    net.train()
    before = col.running_mean["conv1"].clone()
    net(x1)
    assert torch.equal(col.running_mean["conv1"], before)


def test_stat_diff_collector_explicit_groups_and_errors():
    net = _Net()
    col = StatDiffCollector(net, groups={"conv1": 2, "conv2": 3})
    assert col.groups == {"conv1": 2, "conv2": 3}
    col.remove()
    with pytest.raises(ValueError, match="positive divisor"):
        StatDiffCollector(net, groups=3)
    with pytest.raises(ValueError, match="no modules"):
        StatDiffCollector(nn.Linear(3, 3))


# ------------------------------------------------- acceleration (Kalayeh & Shah, Collins et al.)

STEPS = [100, 200, 300, 400, 500, 600, 700, 800]
ACCS = [0.10, 0.50, 0.30, 0.60, 0.55, 0.70, 0.65, 0.68]


def test_steps_to_target_hand_curves():
    assert steps_to_target(STEPS, ACCS, 0.5) == 200
    assert steps_to_target(STEPS, ACCS, 0.6) == 400
    assert steps_to_target(STEPS, ACCS, 0.7) == 600
    assert steps_to_target(STEPS, ACCS, 0.71) is None  # never reached
    assert steps_to_target(STEPS, ACCS, 0.71, tol=0.02) == 600
    assert steps_to_target([], [], 0.1) is None
    assert best_accuracy(STEPS, ACCS) == (0.70, 600)
    # unsorted input is sorted by step first
    assert steps_to_target(STEPS[::-1], ACCS[::-1], 0.5) == 200


def test_best_after_fractions_hand_curves():
    assert best_after_fractions(STEPS, ACCS) == [0.50, 0.60, 0.70, 0.70]
    assert best_after_fractions(STEPS, ACCS, (0.25, 0.5), total_steps=1600) == [0.60, 0.70]
    assert best_after_fractions(STEPS, ACCS, (0.05, 1.0)) == [None, 0.70]


def test_acceleration_reduction_and_speedup():
    base_s, base_a = [100, 200, 300, 400], [0.5, 0.6, 0.7, 0.8]
    meth_s, meth_a = [100, 200, 300, 400], [0.6, 0.8, 0.85, 0.9]
    acc = acceleration(base_s, base_a, meth_s, meth_a)
    assert (acc.target, acc.baseline_steps, acc.method_steps) == (0.8, 400, 200)
    assert acc.reduction == pytest.approx(0.5) and acc.speedup == pytest.approx(2.0)
    # a method that never reaches the baseline's best
    never = acceleration(base_s, base_a, meth_s, [0.1, 0.2, 0.3, 0.79])
    assert never.method_steps is None and never.reduction is None and never.speedup is None
    # Kalayeh & Shah, Table 3 (CIFAR-10): BN-2 1.95e4 steps, MN-2 1.34e4 -> "~31%";
    # Collins et al., Table 1: 26.6K/6.1K
    t3 = acceleration([19500], [0.8795], [13400, 20000], [0.8795, 0.8847])
    assert t3.reduction == pytest.approx(1 - 13400 / 19500) and round(100 * t3.reduction) == 31
    t1 = acceleration([26600], [0.865], [6100], [0.87])
    assert round(t1.speedup, 1) == 4.4


def test_speedup_curve_hand():
    accs, bsteps, ratio = speedup_curve(
        [1, 2, 3, 4], [0.2, 0.4, 0.3, 0.6], [1, 2, 3], [0.4, 0.5, 0.55]
    )
    assert accs.tolist() == [0.2, 0.4, 0.6]  # running maxima of the baseline
    assert bsteps.tolist() == [1, 2, 4]
    assert ratio[0] == 1.0 and ratio[1] == 2.0 and math.isnan(ratio[2])


def test_acceleration_table_from_metrics_records():
    def recs(pairs):
        out = [{"step": 0, "test_acc": None, "test_loss": None}]
        out += [{"step": s, "epoch": s / 100, "test_acc": a, "lr": 0.1} for s, a in pairs]
        return out

    runs = {
        "BN": recs([(100, 0.5), (200, 0.6), (300, 0.7), (400, 0.72)]),
        "MN": recs([(100, 0.6), (200, 0.75), (300, 0.74), (400, 0.8)]),
        "slow": recs([(100, 0.1), (200, 0.2), (300, 0.3), (400, 0.4)]),
    }
    rows = acceleration_table(runs, "BN")
    by = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["BN", "MN", "slow"]
    assert by["BN"]["target"] == 0.72 and by["BN"]["steps_to_target"] == 400
    assert by["BN"]["reduction"] == 0.0 and by["BN"]["speedup"] == 1.0
    assert by["MN"]["steps_to_target"] == 200 and by["MN"]["speedup"] == pytest.approx(2.0)
    assert by["MN"]["best"] == 0.8 and by["MN"]["best_step"] == 400
    assert by["MN"]["best_after"] == {0.25: 0.6, 0.5: 0.75, 0.75: 0.75, 1.0: 0.8}
    assert by["slow"]["steps_to_target"] is None and by["slow"]["speedup"] is None
    s, _a = learning_curve(runs["BN"])
    assert s.tolist() == [100, 200, 300, 400]  # the None record is skipped
    with pytest.raises(ValueError, match="baseline"):
        acceleration_table(runs, "GN")


# ------------------------------------------------------- fixedstats (Qiao et al., Eq. 33–34)


def test_fixedstats_builds_from_registry_on_both_ranks():
    assert "fixedstats" in normlab.available_norms()
    layer = normlab.make_norm("fixedstats(sigma_mu=0.5, sigma_sigma=0.3, seed=4)", 6)
    assert isinstance(layer, FixedStatsNorm)
    assert (layer.sigma_mu, layer.sigma_sigma, layer.seed) == (0.5, 0.3, 4)
    for shape in [(5, 6), (5, 6, 3), (5, 6, 3, 4)]:
        x = torch.randn(*shape, requires_grad=True)
        y = layer(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        y.sum().backward()
        assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="sigma_mu"):
        FixedStatsNorm(4, sigma_mu=-1.0)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(5, 4))


def test_fixedstats_draws_follow_eq33_with_seed():
    c, sm, ss = 10, 0.7, 0.4
    layer = FixedStatsNorm(c, sigma_mu=sm, sigma_sigma=ss, seed=123)
    g = torch.Generator().manual_seed(123)
    z1, z2 = torch.randn(c, generator=g), torch.randn(c, generator=g)
    assert torch.equal(layer.target_mean, sm * z1)
    assert torch.equal(layer.target_std, torch.exp(ss * z2))
    assert (layer.target_std > 0).all()
    # same seed -> same draws (also after reset_parameters); another seed -> different
    assert torch.equal(FixedStatsNorm(c, sm, ss, seed=123).target_mean, layer.target_mean)
    layer.target_mean.zero_()
    layer.reset_parameters()
    assert torch.equal(layer.target_mean, sm * z1)
    assert not torch.equal(FixedStatsNorm(c, sm, ss, seed=124).target_mean, layer.target_mean)
    # seed=None follows torch's global generator
    torch.manual_seed(7)
    a = draw_fixed_stats(c, sm, ss)
    torch.manual_seed(7)
    b = FixedStatsNorm(c, sm, ss)
    assert torch.equal(a[0], b.target_mean) and torch.equal(a[1], b.target_std)
    # the statistics travel with the state_dict
    c2 = FixedStatsNorm(c, sm, ss, seed=999)
    c2.load_state_dict(FixedStatsNorm(c, sm, ss, seed=123).state_dict())
    assert torch.equal(c2.target_mean, sm * z1)


def test_fixedstats_matches_hand_computation_of_eq34():
    c, eps = 5, 1e-5
    layer = FixedStatsNorm(c, sigma_mu=1.0, sigma_sigma=0.5, seed=3, eps=eps, momentum=0.1).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(c))
        layer.bias.copy_(torch.randn(c))
    x = torch.randn(4, c, 3, 2, dtype=torch.float64) * 3 + 1
    y = layer(x).detach().numpy()
    xn = x.numpy()
    mu = xn.mean((0, 2, 3), keepdims=True)
    var = xn.var((0, 2, 3), keepdims=True)
    shp = (1, c, 1, 1)
    mh = layer.target_mean.numpy().reshape(shp)
    sh = layer.target_std.numpy().reshape(shp)
    gam, bet = layer.weight.detach().numpy().reshape(shp), layer.bias.detach().numpy().reshape(shp)
    ref = gam * (sh * (xn - mu) / np.sqrt(var + eps) + mh) + bet
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
    # running statistics as in BN (unbiased variance), then used in eval
    n = xn.size // c
    rm = 0.1 * mu.reshape(-1)
    rv = 0.9 + 0.1 * var.reshape(-1) * n / (n - 1)
    np.testing.assert_allclose(layer.running_mean.numpy(), rm, rtol=1e-10)
    np.testing.assert_allclose(layer.running_var.numpy(), rv, rtol=1e-10)
    layer.eval()
    x2 = torch.randn(3, c, 2, 2, dtype=torch.float64)
    ref2 = gam * (sh * (x2.numpy() - rm.reshape(shp)) / np.sqrt(rv.reshape(shp) + eps) + mh) + bet
    np.testing.assert_allclose(layer(x2).detach().numpy(), ref2, rtol=1e-10, atol=1e-10)


def test_fixedstats_with_zero_sigmas_is_batch_norm():
    layer = normlab.make_norm("fixedstats", 4)
    bn = nn.BatchNorm1d(4)
    x = torch.randn(8, 4, 5)
    torch.testing.assert_close(layer(x), bn(x))
    torch.testing.assert_close(layer.running_var, bn.running_var)
    layer.eval()
    bn.eval()
    torch.testing.assert_close(layer(x), bn(x))
    # no running statistics: always batch statistics
    nt = FixedStatsNorm(4, track_running_stats=False).eval()
    torch.testing.assert_close(nt(x), F.batch_norm(x, None, None, training=True))


def test_fixedstats_gradcheck():
    layer = FixedStatsNorm(3, sigma_mu=0.5, sigma_sigma=0.5, seed=0).double()
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
