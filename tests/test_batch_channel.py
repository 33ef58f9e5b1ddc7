"""Batch-Channel Normalization (Qiao et al., Sec. 7): large-batch vs torch/numpy oracles,
Algorithm 1 by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab import BCNorm, make_norm, set_bcn_rate
from normlab.nn.batch_channel import batch_channel_norm, micro_batch_estimates


def _randomize(m: BCNorm, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.num_features, generator=g))
        m.group_weight.copy_(torch.rand(m.num_groups, generator=g) + 0.5)
        m.group_bias.copy_(torch.randn(m.num_groups, generator=g))


def _np_bcn(x, mean, var, w, b, gw, gb, groups, eps):
    """Eq. 40 then Eq. 42 in numpy, float64, with given per-channel statistics."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    shp = (1, c) + (1,) * (x.ndim - 2)
    xd = w.reshape(shp) * (x - mean.reshape(shp)) / np.sqrt(var.reshape(shp) + eps) + b.reshape(shp)
    xg = xd.reshape(n, groups, -1)
    mu = xg.mean(axis=2, keepdims=True)
    sd = np.sqrt(xg.var(axis=2, keepdims=True) + eps)
    yg = (xg - mu) / sd
    yg = yg.reshape((n, groups, c // groups, -1)) * gw.reshape(1, -1, 1, 1) + gb.reshape(
        1, -1, 1, 1
    )
    return yg.reshape(x.shape)


def _params(m: BCNorm):
    return [t.detach().double().numpy() for t in (m.weight, m.bias, m.group_weight, m.group_bias)]


# ----------------------------------------------------------------------------- large-batch mode


@pytest.mark.parametrize("shape", [(6, 8), (4, 8, 5), (3, 8, 4, 5), (2, 8, 2, 3, 3)])
def test_large_batch_matches_torch_composition(shape):
    torch.manual_seed(1)
    m = BCNorm(8, num_groups=2)
    _randomize(m)
    x = torch.randn(*shape) * 3 + 1
    y = m(x)
    assert y.shape == x.shape
    xb = F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
    gn = F.group_norm(xb, 2, None, None, m.eps)
    n = shape[0]
    gn = gn.reshape(n, 2, -1) * m.group_weight.view(1, 2, 1) + m.group_bias.view(1, 2, 1)
    torch.testing.assert_close(y, gn.reshape(x.shape), atol=1e-5, rtol=1e-5)


def test_large_batch_matches_numpy_equations():
    torch.manual_seed(2)
    m = BCNorm(12, num_groups=3).double()
    _randomize(m, 3)
    x = torch.randn(5, 12, 3, 3, dtype=torch.float64) * 2 - 1
    y = m(x).detach().numpy()
    xn = x.numpy()
    mean = xn.mean(axis=(0, 2, 3))
    var = xn.var(axis=(0, 2, 3))
    ref = _np_bcn(xn, mean, var, *_params(m), 3, m.eps)
    np.testing.assert_allclose(y, ref, atol=1e-10)


def test_per_group_affine_has_one_value_per_group():
    m = BCNorm(16, num_groups=4)
    assert m.group_weight.shape == (4,) and m.group_bias.shape == (4,)
    assert m.weight.shape == (16,) and m.bias.shape == (16,)
    x = torch.randn(4, 16, 3, 3)
    m(x).square().sum().backward()
    assert m.group_weight.grad.shape == (4,)
    assert m.group_weight.grad.abs().sum() > 0


def test_running_stats_like_batchnorm():
    torch.manual_seed(3)
    m = BCNorm(6, num_groups=3, momentum=0.3)
    bn = nn.BatchNorm2d(6, momentum=0.3)
    for _ in range(3):
        x = torch.randn(4, 6, 5, 5) * 2 + 0.7
        m(x)
        bn(x)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    assert int(m.num_batches_tracked) == 3


def test_eval_uses_running_statistics():
    torch.manual_seed(4)
    m = BCNorm(8, num_groups=4).double()
    _randomize(m, 5)
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(8))
        m.running_var.copy_(torch.rand(8) + 0.5)
    m.eval()
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    before = m.running_mean.clone()
    y = m(x).detach().numpy()
    ref = _np_bcn(x.numpy(), m.running_mean.numpy(), m.running_var.numpy(), *_params(m), 4, m.eps)
    np.testing.assert_allclose(y, ref, atol=1e-10)
    assert torch.equal(m.running_mean, before)
    # Eval with batch size 1 works and is per-sample (no batch coupling).
    y1 = m(x[:1]).detach().numpy()
    np.testing.assert_allclose(y1, ref[:1], atol=1e-10)


def test_state_dict_round_trip_eval():
    torch.manual_seed(5)
    m = BCNorm(8, num_groups=2)
    _randomize(m, 6)
    for _ in range(2):
        m(torch.randn(4, 8, 3, 3) + 2)
    m2 = BCNorm(8, num_groups=2)
    m2.load_state_dict(m.state_dict())
    m.eval()
    m2.eval()
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(m(x), m2(x))
    assert set(m.state_dict()) >= {"running_mean", "running_var", "num_batches_tracked"}


def test_gradcheck_large_batch():
    torch.manual_seed(6)
    m = BCNorm(4, num_groups=2).double()
    _randomize(m, 7)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def f(x, w, b, gw, gb):
        return batch_channel_norm(x, None, None, w, b, gw, gb, 2, True, 0.1, 1e-5)

    assert torch.autograd.gradcheck(f, (x, *params))


def test_constant_input_is_finite():
    for micro in (False, True):
        m = BCNorm(8, num_groups=2, micro_batch=micro, rate=0.1)
        with torch.no_grad():
            m.group_bias.copy_(torch.tensor([0.7, -1.3]))
        y = m(torch.full((2, 8, 3, 3), 5.0))
        # every channel is constant and (γ^b = 1, β^b = 0) maps them all to the same value, so
        # each group is constant: Eq. 42 normalizes it to 0 and the output is the group's β^c
        expect = m.group_bias.detach().repeat_interleave(4).view(1, 8, 1, 1).expand_as(y)
        torch.testing.assert_close(y, expect, atol=1e-4, rtol=0)
        y.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())


# ----------------------------------------------------------------------------- micro-batch mode


def test_micro_batch_algorithm1_two_steps_by_hand():
    # C = 2 channels, one group, L = 2 positions; batch size 1 then 2; r = 0.5, then r = 0.25.
    eps = 1e-5
    m = BCNorm(2, num_groups=1, eps=eps, micro_batch=True)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([2.0, 0.5]))
        m.bias.copy_(torch.tensor([0.0, 1.0]))
        m.group_weight.fill_(1.5)
        m.group_bias.fill_(-0.5)
    assert m.running_mean.tolist() == [0.0, 0.0] and m.running_var.tolist() == [1.0, 1.0]

    # Step 1: x[0] = [[1, 3], [2, -2]] (channel 0: 1, 3; channel 1: 2, -2).
    m.set_rate(0.5)
    y1 = m(torch.tensor([[[1.0, 3.0], [2.0, -2.0]]], dtype=torch.float64).float())
    # mu_dot = (2, 0); sigma_dot^2 around the old estimate 0: ((1+9)/2, (4+4)/2) = (5, 4)
    mu1 = [0 + 0.5 * (2 - 0), 0 + 0.5 * (0 - 0)]  # (1, 0)
    var1 = [1 + 0.5 * (5 - 1), 1 + 0.5 * (4 - 1)]  # (3, 2.5)
    assert m.running_mean.tolist() == pytest.approx(mu1)
    assert m.running_var.tolist() == pytest.approx(var1)
    # Eq. 40 with the UPDATED estimates, then Eq. 42 over the sample's 4 values.
    xd = [
        2.0 * (1 - 1) / math.sqrt(3 + eps) + 0.0,
        2.0 * (3 - 1) / math.sqrt(3 + eps) + 0.0,
        0.5 * (2 - 0) / math.sqrt(2.5 + eps) + 1.0,
        0.5 * (-2 - 0) / math.sqrt(2.5 + eps) + 1.0,
    ]
    mu = sum(xd) / 4
    sd = math.sqrt(sum((v - mu) ** 2 for v in xd) / 4 + eps)
    expect1 = [1.5 * (v - mu) / sd - 0.5 for v in xd]
    assert y1.flatten().tolist() == pytest.approx(expect1, abs=1e-5)

    # Step 2: batch of 2 samples; channel 0 values 0, 2, 4, 6 ; channel 1 values 1, 1, 1, 5.
    m.set_rate(0.25)
    x2 = torch.tensor([[[0.0, 2.0], [1.0, 1.0]], [[4.0, 6.0], [1.0, 5.0]]])
    y2 = m(x2)
    # mu_dot = (3, 2). sigma_dot^2 around the OLD estimates (1, 0):
    sd0 = ((0 - 1) ** 2 + (2 - 1) ** 2 + (4 - 1) ** 2 + (6 - 1) ** 2) / 4  # 9
    sd1 = (1 + 1 + 1 + 25) / 4  # 7
    mu2 = [1 + 0.25 * (3 - 1), 0 + 0.25 * (2 - 0)]  # (1.5, 0.5)
    var2 = [3 + 0.25 * (sd0 - 3), 2.5 + 0.25 * (sd1 - 2.5)]  # (4.5, 3.625)
    assert m.running_mean.tolist() == pytest.approx(mu2)
    assert m.running_var.tolist() == pytest.approx(var2)
    expect2 = []
    for s in range(2):
        ch0 = x2[s, 0].tolist()
        ch1 = x2[s, 1].tolist()
        xd = [2.0 * (v - mu2[0]) / math.sqrt(var2[0] + eps) for v in ch0] + [
            0.5 * (v - mu2[1]) / math.sqrt(var2[1] + eps) + 1.0 for v in ch1
        ]
        mu = sum(xd) / 4
        sd = math.sqrt(sum((v - mu) ** 2 for v in xd) / 4 + eps)
        expect2 += [1.5 * (v - mu) / sd - 0.5 for v in xd]
    assert y2.flatten().tolist() == pytest.approx(expect2, abs=1e-5)

    # Eval uses the estimates and does not change them.
    m.eval()
    y3 = m(x2)
    torch.testing.assert_close(y3, y2)
    assert m.running_mean.tolist() == pytest.approx(mu2)
    assert m.running_var.tolist() == pytest.approx(var2)


def test_micro_batch_estimates_function_matches_numpy():
    torch.manual_seed(7)
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64) * 2 + 3
    mean = torch.randn(5, dtype=torch.float64)
    var = torch.rand(5, dtype=torch.float64) + 0.5
    nm, nv = micro_batch_estimates(x, mean, var, 0.3)
    xn, mn, vn = x.numpy(), mean.numpy(), var.numpy()
    mu_dot = xn.mean(axis=(0, 2, 3))
    s2_dot = ((xn - mn.reshape(1, 5, 1, 1)) ** 2).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(nm.numpy(), mn + 0.3 * (mu_dot - mn), rtol=1e-12)
    np.testing.assert_allclose(nv.numpy(), vn + 0.3 * (s2_dot - vn), rtol=1e-12)


def test_micro_batch_no_gradient_through_estimates():
    torch.manual_seed(8)
    m = BCNorm(4, num_groups=1, micro_batch=True, rate=0.5).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    (m(x) * g).sum().backward()
    mean, var = m.running_mean.clone(), m.running_var.clone()
    x2 = x.detach().clone().requires_grad_()
    xb = (x2 - mean.view(1, 4, 1, 1)) / torch.sqrt(var.view(1, 4, 1, 1) + m.eps)
    (F.group_norm(xb, 1, eps=m.eps) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_gradcheck_micro_batch_fixed_estimates():
    torch.manual_seed(9)
    m = BCNorm(4, num_groups=2, micro_batch=True, rate=0.0).double()
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(4))
        m.running_var.copy_(torch.rand(4) + 0.5)
    x = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_batch_size_one_trains():
    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        BCNorm(8, num_groups=2, micro_batch=True),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
        BCNorm(4, num_groups=2, micro_batch=True),
        nn.ReLU(),
        nn.Linear(4, 3),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(1, 3, 6, 6)
    target = torch.tensor([1])
    for _ in range(4):
        assert set_bcn_rate(model, opt) == 2
        loss = F.cross_entropy(model(x), target)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert all(changed)
    assert not torch.equal(model[1].running_mean, torch.zeros(8))
    assert int(model[1].num_batches_tracked) == 4


def test_set_bcn_rate_from_optimizer_and_number():
    model = nn.Sequential(BCNorm(4, micro_batch=True), nn.Identity(), BCNorm(8, num_groups=2))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05)
    assert set_bcn_rate(model, opt) == 2
    assert model[0].rate == pytest.approx(0.05) and model[2].rate == pytest.approx(0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    opt.step()
    sched.step()
    set_bcn_rate(model, opt)
    assert model[0].rate == pytest.approx(0.005)
    set_bcn_rate(model, 0.2)
    assert model[2].rate == pytest.approx(0.2)
    assert set_bcn_rate(nn.Linear(2, 2), 0.1) == 0
    with pytest.raises(ValueError, match="rate"):
        set_bcn_rate(model, 1.5)
    assert "set_bcn_rate" in normlab.__all__ or hasattr(normlab, "set_bcn_rate")


def test_micro_batch_without_rate_raises():
    m = BCNorm(4, micro_batch=True)
    with pytest.raises(RuntimeError, match="set_bcn_rate"):
        m(torch.randn(1, 4, 2, 2))
    m.eval()
    assert m(torch.randn(1, 4, 2, 2)).shape == (1, 4, 2, 2)  # eval needs no rate


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.1", True])
def test_bad_rate(bad):
    with pytest.raises(ValueError, match="rate"):
        BCNorm(4, micro_batch=True, rate=bad)
    with pytest.raises(ValueError, match="rate"):
        BCNorm(4, micro_batch=True).set_rate(bad)


# ----------------------------------------------------------------------------- config, registry


def test_default_num_groups():
    assert BCNorm(128).num_groups == 32  # min(32, 128 // 4)
    assert BCNorm(256).num_groups == 32
    assert BCNorm(64).num_groups == 16
    assert BCNorm(24).num_groups == 6
    assert BCNorm(4).num_groups == 1
    assert BCNorm(3).num_groups == 1
    assert BCNorm(44).num_groups == 11
    assert BCNorm(36).num_groups == 9
    assert BCNorm(50).num_groups == 10  # 12 does not divide 50 -> largest divisor below


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_groups": 4}, "num_groups"),  # does not divide 6
        ({"num_groups": 0}, "num_groups"),
        ({"num_groups": 2.0}, "num_groups"),
        ({"momentum": 1.5}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"momentum": None}, "momentum"),
        ({"eps": 0}, "eps"),
        ({"micro_batch": "yes"}, "micro_batch"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BCNorm(6, **kwargs)


def test_bad_input():
    m = BCNorm(8)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError):
        m(torch.randn(8))


def test_registry_specs():
    m = make_norm("bcn", 64)
    assert isinstance(m, BCNorm) and m.num_groups == 16 and not m.micro_batch
    m = make_norm("bcn(micro_batch=true)", 64)
    assert isinstance(m, BCNorm) and m.micro_batch and m.rate is None
    m = make_norm("bcn(num_groups=4)", 64)
    assert m.num_groups == 4 and m.group_weight.shape == (4,)
    m = make_norm("bcn(micro_batch=true, rate=0.1)", 8)
    assert m.rate == pytest.approx(0.1)
    assert "bcn" in normlab.available_norms()
    with pytest.raises(ValueError, match="num_groups"):
        make_norm("bcn(num_groups=5)", 64)


def test_two_dim_input_both_modes():
    torch.manual_seed(11)
    for micro in (False, True):
        m = BCNorm(8, num_groups=2, micro_batch=micro, rate=0.1).double()
        _randomize(m, 12)
        x = torch.randn(5, 8, dtype=torch.float64)
        y = m(x).detach().numpy()
        if micro:
            mean, var = m.running_mean.numpy(), m.running_var.numpy()
        else:
            mean, var = x.numpy().mean(0), x.numpy().var(0)
        ref = _np_bcn(x.numpy(), mean, var, *_params(m), 2, m.eps)
        np.testing.assert_allclose(y, ref, atol=1e-10)


def test_convert_swaps_in_bcn():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    normlab.convert(model, "bcn(num_groups=2)")
    assert isinstance(model[1], BCNorm) and model[1].num_groups == 2
    assert model(torch.randn(2, 3, 5, 5)).shape == (2, 8, 3, 3)


def test_micro_batch_layer_called_twice_before_backward():
    # A shared layer (or gradient accumulation): the second forward updates the estimates, which
    # must not invalidate the first forward's graph.
    m = BCNorm(4, num_groups=2, micro_batch=True, rate=0.5)
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    y = m(x) + m(x * 2)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert int(m.num_batches_tracked) == 2
