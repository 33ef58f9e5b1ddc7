"""Standardization loss (Collins et al., Sec. 3, Eq. 2) against numpy, and the hook machinery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab import StandardizationLoss, standardization_loss
from normlab.nn.weight_std import WSConv2d


def _np_eq2(a: np.ndarray, channel_axis: int, eps: float = 1e-8) -> float:
    a = np.moveaxis(np.asarray(a, dtype=np.float64), channel_axis, -1).reshape(
        -1, a.shape[channel_axis]
    )
    mu = a.mean(axis=0)
    var = a.var(axis=0)  # population variance (ddof=0)
    return float(0.5 * np.sum(mu**2 + var - np.log(var + eps) - 1.0))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = WSConv2d(4, 5, 3)
        self.conv1d = nn.Conv1d(5, 5, 1)
        self.fc = nn.Linear(5, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))  # (N, 5, H', W')
        h = torch.relu(self.conv1d(h.flatten(2))).mean(-1)
        return self.out(torch.relu(self.fc(h)))


def test_mlp_loss_equals_eq2_in_numpy():
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(16, 5, dtype=torch.float64) * 2 + 1
    std = StandardizationLoss(model, weight=0.3)
    model(x)
    got = std.loss()
    # Independent forward in numpy.
    W = {n: p.detach().numpy() for n, p in model.named_parameters()}
    xn = x.numpy()
    h1 = xn @ W["fc1.weight"].T + W["fc1.bias"]
    h2 = np.maximum(h1, 0) @ W["fc2.weight"].T + W["fc2.bias"]
    expect = 0.3 * (_np_eq2(h1, 1) + _np_eq2(h2, 1))
    assert got.item() == pytest.approx(expect, rel=1e-10)
    assert std.names == ["fc1", "fc2"]
    per = std.per_layer()
    assert set(per) == {"fc1", "fc2"}
    assert per["fc1"].item() == pytest.approx(_np_eq2(h1, 1), rel=1e-10)
    mean, var = std.per_layer_moments()["fc2"]
    np.testing.assert_allclose(var.numpy(), h2.var(axis=0), rtol=1e-10)
    np.testing.assert_allclose(mean.numpy(), h2.mean(axis=0), rtol=1e-10, atol=1e-12)


def test_cnn_loss_equals_eq2_over_batch_and_space():
    torch.manual_seed(1)
    model = CNN()
    captured = {}
    for name in ("conv1", "conv2", "conv1d", "fc"):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: captured.__setitem__(name, o.detach().double().numpy())
        )
    std = StandardizationLoss(model)
    assert std.names == ["conv1", "conv2", "conv1d", "fc"]  # WS subclass included, `out` excluded
    model(torch.randn(4, 3, 6, 6))
    expect = sum(_np_eq2(captured[n], 1) for n in ("conv1", "conv2", "conv1d", "fc"))
    got = std.loss()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expect, rel=1e-4)


def test_functional_matches_numpy_and_channel_last():
    torch.manual_seed(2)
    x = torch.randn(3, 4, 5, 2) * 3 - 2
    assert standardization_loss(x).item() == pytest.approx(_np_eq2(x.numpy(), 1), rel=1e-5)
    assert standardization_loss(x, channel_dim=-1).item() == pytest.approx(
        _np_eq2(x.numpy(), 3), rel=1e-5
    )


def test_linear_on_sequence_uses_last_dim_as_channels():
    torch.manual_seed(3)
    lin = nn.Linear(4, 6)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 5, 4)
    h = lin(x).detach().numpy()  # before hooking: the hook would count this call too
    std = StandardizationLoss(model)
    model(x)
    assert std.loss().item() == pytest.approx(_np_eq2(h, 2), rel=1e-5)


def test_zero_for_standardized_activations():
    torch.manual_seed(4)
    z = torch.randn(64, 6, 4, 4, dtype=torch.float64)
    z = (z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), correction=0, keepdim=True)
    assert abs(standardization_loss(z).item()) < 1e-6
    # Through a model: identity Linear on standardized input.
    lin = nn.Linear(6, 6).double()
    with torch.no_grad():
        lin.weight.copy_(torch.eye(6))
        lin.bias.zero_()
    model = nn.Sequential(lin, nn.Linear(6, 1).double())
    std = StandardizationLoss(model)
    x = z[:, :, 0, 0]
    x = (x - x.mean(0)) / x.std(0, correction=0)
    model(x)
    assert abs(std.loss().item()) < 1e-6


def test_positive_and_penalizes_scale_and_shift():
    torch.manual_seed(5)
    z = torch.randn(1000, 3, dtype=torch.float64)
    base = standardization_loss(z).item()
    assert standardization_loss(z * 3).item() > base + 1
    assert standardization_loss(z + 2).item() > base + 1
    assert standardization_loss(z * 0.2).item() > base + 1


def test_gradients_reach_parameters_and_gradcheck():
    torch.manual_seed(6)
    model = MLP()
    std = StandardizationLoss(model)
    model(torch.randn(8, 5))
    std.loss().backward()
    assert model.fc1.weight.grad is not None and model.fc1.weight.grad.abs().sum() > 0
    assert model.fc2.weight.grad.abs().sum() > 0
    assert model.head.weight.grad is None  # last Linear not hooked, task loss absent
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(standardization_loss, (x,))


def test_not_accumulated_in_eval_and_outputs_unchanged():
    torch.manual_seed(7)
    model = MLP()
    x = torch.randn(8, 5)
    ref = model(x)
    std = StandardizationLoss(model)
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert std.loss().item() > 0
    model.eval()
    model(x)
    z = std.loss()
    assert z.item() == 0.0 and z.dim() == 0 and not z.requires_grad


def test_accumulates_and_resets():
    torch.manual_seed(8)
    model = MLP()
    std = StandardizationLoss(model)
    x1, x2 = torch.randn(8, 5), torch.randn(8, 5)
    model(x1)
    l1 = std.loss().item()
    model(x2)
    l2 = std.loss().item()
    model(x1)
    model(x2)
    assert std.loss().item() == pytest.approx(l1 + l2, rel=1e-5)
    assert std.loss().item() == 0.0  # reset by the previous call
    model(x1)
    std.reset()  # drops what was accumulated without returning it
    model(x2)
    assert std.loss().item() == pytest.approx(l2, rel=1e-6)


def test_hooks_removable_and_context_manager():
    model = MLP()
    std = StandardizationLoss(model)
    std.remove()
    model(torch.randn(8, 5))
    assert std.loss().item() == 0.0
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    with StandardizationLoss(model) as s2:
        model(torch.randn(8, 5))
        assert s2.loss().item() > 0
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_constant_activations_finite():
    x = torch.full((1, 4), 3.0, requires_grad=True)  # batch size 1 at a Linear layer: var = 0
    loss = standardization_loss(x)
    expect = 0.5 * 4 * (9.0 + 0.0 - math.log(1e-8) - 1.0)
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    std = StandardizationLoss(model)
    x1 = torch.randn(1, 3)
    model(x1)
    total = std.loss()
    total.backward()
    # one sample: mu_i is the pre-activation itself, sigma_i^2 = 0 (numpy forward as the oracle)
    h = x1.numpy().astype(np.float64) @ model[0].weight.detach().double().numpy().T
    h = h + model[0].bias.detach().double().numpy()
    expect = 0.5 * float(np.sum(h**2 - math.log(1e-8) - 1.0))
    assert total.item() == pytest.approx(expect, rel=1e-5)
    assert all(torch.isfinite(p.grad).all() for p in model[0].parameters())


def test_half_precision_statistics_in_float32():
    torch.manual_seed(9)
    x = torch.randn(8, 4, 3, 3).bfloat16()
    loss = standardization_loss(x)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_np_eq2(x.float().numpy(), 1), rel=1e-5)


def test_explicit_selection():
    model = CNN()
    assert StandardizationLoss(model, modules="conv*").names == ["conv1", "conv2", "conv1d"]
    assert StandardizationLoss(model, modules=["fc", "out"]).names == ["fc", "out"]
    assert StandardizationLoss(model, modules=model.conv2).names == ["conv2"]
    assert StandardizationLoss(model, modules=[model.conv1, "conv?"]).names == ["conv1", "conv2"]
    with pytest.raises(ValueError, match="no module named"):
        StandardizationLoss(model, modules="conv9")
    with pytest.raises(ValueError, match="matches no"):
        StandardizationLoss(model, modules="layer*")
    with pytest.raises(ValueError, match="not a submodule"):
        StandardizationLoss(model, modules=nn.Linear(2, 2))
    with pytest.raises(TypeError):
        StandardizationLoss(model, modules=[3])
    # Explicit module outputs are channel-first; a normalization layer's output can be hooked too.
    seq = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    std = StandardizationLoss(seq, modules="1")
    x = torch.randn(4, 2, 3, 3)
    y = seq(x)
    assert std.loss().item() == pytest.approx(_np_eq2(y.detach().numpy(), 1), rel=1e-4, abs=1e-5)


def test_bad_config():
    with pytest.raises(ValueError, match="weight"):
        StandardizationLoss(MLP(), weight=-1.0)
    with pytest.raises(ValueError, match="weight"):
        StandardizationLoss(MLP(), weight=float("nan"))
    with pytest.raises(ValueError, match="eps"):
        StandardizationLoss(MLP(), eps=0.0)
    with pytest.raises(ValueError, match="no layer"):
        StandardizationLoss(nn.Sequential(nn.Linear(2, 2)))  # only the last Linear
    with pytest.raises(TypeError):
        StandardizationLoss("model")
    with pytest.raises(ValueError):
        standardization_loss(torch.randn(5))


def test_public_names():
    assert normlab.StandardizationLoss is StandardizationLoss
    assert normlab.standardization_loss is standardization_loss
