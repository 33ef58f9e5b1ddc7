"""Conv kinds ``wn`` (Weight Normalization, Qiao et al., Eq. 8) and ``cwn`` (Centered Weight
Normalization, Eq. 9): against numpy oracles of the equations, gradcheck, ``convert_conv``, conv
specs, and models built with them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import normlab
from normlab.models import create
from normlab.models._blocks import init_weights, make_conv, make_linear, parse_conv, reinit_weight
from normlab.nn.weight_std import (
    CenteredWeightNorm,
    apply_weight_norm,
    center_normalize_weight,
    centered_weight_norm,
)


def _np_wn(v: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Eq. 8 per output channel: g · v / ‖v‖."""
    flat = v.reshape(v.shape[0], -1)
    out = g.reshape(-1, 1) * flat / np.linalg.norm(flat, axis=1, keepdims=True)
    return out.reshape(v.shape)


def _np_cwn(v: np.ndarray, g: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """Eq. 9 per output channel: g · (v − mean v) / ‖v − mean v‖ (eps inside the root)."""
    flat = v.reshape(v.shape[0], -1)
    c = flat - flat.mean(axis=1, keepdims=True)
    out = g.reshape(-1, 1) * c / np.sqrt((c * c).sum(axis=1, keepdims=True) + eps)
    return out.reshape(v.shape)


def _g_v(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    p = module.parametrizations.weight
    return p.original0, p.original1


def _perturb(module: nn.Module) -> None:
    g, v = _g_v(module)
    with torch.no_grad():
        g.uniform_(0.5, 2.0)
        v.add_(0.3 * torch.randn_like(v) + 0.2)


@pytest.mark.parametrize("kind,oracle", [("wn", _np_wn), ("cwn", _np_cwn)])
def test_conv_uses_the_equation_of_its_kind(kind, oracle):
    conv = make_conv(4, 6, 3, padding=1, bias=True, conv=kind).double()
    assert isinstance(conv, nn.Conv2d) and parametrize.is_parametrized(conv, "weight")
    _perturb(conv)
    g, v = (t.detach().numpy() for t in _g_v(conv))
    assert g.shape == (6, 1, 1, 1)  # a learnable length per output channel
    w_hat = torch.from_numpy(oracle(v, g))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(conv.weight, w_hat)
    torch.testing.assert_close(conv(x), F.conv2d(x, w_hat, conv.bias, padding=1))
    norms = w_hat.reshape(6, -1).norm(dim=1)
    torch.testing.assert_close(norms, torch.from_numpy(g.reshape(-1)))
    if kind == "cwn":
        torch.testing.assert_close(
            w_hat.reshape(6, -1).mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0
        )


def test_wn_is_torchs_weight_norm():
    torch.manual_seed(3)
    ours = make_conv(3, 5, 3, conv="wn")
    torch.manual_seed(3)
    theirs = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 5, 3, bias=False), dim=0)
    assert type(ours.parametrizations.weight[0]) is type(theirs.parametrizations.weight[0])
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k]), k


def test_cwn_initial_weight_is_the_centered_direction_at_the_original_length():
    conv = nn.Conv2d(3, 5, 3)
    w0 = conv.weight.detach().double().numpy().copy()
    centered_weight_norm(conv)
    g, v = _g_v(conv)
    g0 = np.linalg.norm(w0.reshape(5, -1), axis=1)
    np.testing.assert_allclose(g.detach().reshape(-1).numpy(), g0, rtol=1e-6)
    np.testing.assert_allclose(v.detach().numpy(), w0, rtol=0, atol=0)
    np.testing.assert_allclose(conv.weight.detach().numpy(), _np_cwn(w0, g0), rtol=1e-5, atol=1e-7)
    # on a centered weight the parametrization is its own inverse: assigning gives it back
    centered = torch.from_numpy(_np_cwn(w0, g0)).float()
    with torch.no_grad():
        conv.weight = centered
    torch.testing.assert_close(conv.weight, centered, rtol=1e-5, atol=1e-6)


def test_cwn_gradcheck_and_gradient_is_centered_and_orthogonal():
    v = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.rand(4, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, g: center_normalize_weight(v, g, 1e-8), (v, g))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    F.conv2d(x, center_normalize_weight(v, g, eps=0.0)).square().sum().backward()
    # Ŵ (eps = 0) is invariant to adding a constant to v_i and to scaling v_i: ∂L/∂v_i has zero
    # mean and is orthogonal to v_i − v̄_i
    gv = v.grad.reshape(4, -1)
    c = (v - v.mean((1, 2, 3), keepdim=True)).detach().reshape(4, -1)
    torch.testing.assert_close(gv.mean(1), torch.zeros(4, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(
        (gv * c).sum(1), torch.zeros(4, dtype=torch.float64), atol=1e-9, rtol=0
    )


def test_cwn_degenerate_fan_in_and_half_weights():
    # a fan-in of one weight: its centered weight is 0, and eps keeps it finite (0, not NaN)
    conv = make_conv(1, 3, 1, conv="cwn")
    w = conv.weight
    assert torch.isfinite(w).all() and torch.equal(w, torch.zeros_like(w))
    v = (torch.randn(4, 50) * 1000 + 500).half()  # the squared norm overflows float16
    g = torch.ones(4, 1).half()
    out = center_normalize_weight(v, g)
    assert out.dtype == torch.float16
    ref = _np_cwn(v.double().numpy(), g.double().numpy(), 1e-8)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=1e-3)


def test_convert_conv_wn_keeps_the_function_and_cwn_follows_eq9():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(2),
        nn.Conv1d(6, 4, 1),
        nn.Flatten(),
        nn.Linear(4 * 16, 2),
    )
    x = torch.randn(2, 3, 4, 4)
    before = model(x)
    assert normlab.convert_conv(model, "wn") == ["0", "3"]
    assert type(model[5]) is nn.Linear
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert normlab.convert_conv(model, "wn") == []  # already weight-normalized
    assert normlab.convert_conv(model, "cwn", linear=True) == ["5"]
    lw = model[5].weight.detach().double().numpy()
    assert parametrize.is_parametrized(model[5], "weight")
    g5, v5 = (t.detach().double().numpy() for t in _g_v(model[5]))
    np.testing.assert_allclose(lw, _np_cwn(v5, g5), rtol=1e-5, atol=1e-7)
    # trains: gradients reach g and v
    model(x).square().sum().backward()
    for m in (model[0], model[3], model[5]):
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in _g_v(m))
    # cwn with eps, only where included, on the model's dtype
    m2 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)).double()
    w_raw = m2[1].weight.detach().clone()
    assert normlab.convert_conv(m2, "cwn", include="1", eps=1e-3) == ["1"]
    assert not parametrize.is_parametrized(m2[0], "weight")
    assert m2[1].parametrizations.weight[0].eps == 1e-3 and m2[1].weight.dtype == torch.float64
    g0 = np.linalg.norm(w_raw.numpy().reshape(4, -1), axis=1)
    np.testing.assert_allclose(m2[1].weight.detach().numpy(), _np_cwn(w_raw.numpy(), g0, 1e-3))


def test_convert_conv_bad_kind_and_arguments():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"kind must be 'ws', 'wn', 'cwn' or 'plain'.*'bn'"):
        normlab.convert_conv(model, "bn")
    with pytest.raises(ValueError, match="'wn' takes no arguments"):
        normlab.convert_conv(model, "wn", eps=1e-3)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['center'\] for 'cwn'"):
        normlab.convert_conv(model, "cwn", center=False)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        normlab.convert_conv(model, "cwn", eps=-1.0)
    assert not parametrize.is_parametrized(model[0])  # nothing half-converted
    with pytest.raises(ValueError, match="kind must be one of"):
        apply_weight_norm(nn.Linear(2, 2), "ws")
    with pytest.raises(ValueError, match="eps"):
        CenteredWeightNorm(eps=float("nan"))


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("wn", ("wn", {})),
        ("cwn", ("cwn", {})),
        ("cwn(eps=1e-6)", ("cwn", {"eps": 1e-6})),
        ({"name": "cwn", "eps": 0}, ("cwn", {"eps": 0.0})),
    ],
)
def test_parse_conv_accepts_wn_and_cwn(spec, expected):
    assert parse_conv(spec) == expected


@pytest.mark.parametrize(
    "spec,needles",
    [
        ("wn(eps=1e-3)", ["'wn' takes no arguments", "cwn"]),
        ("cwn(center=false)", ["unknown argument center=False", "cwn"]),
        ("cwn(eps=-1)", ["eps must be a finite non-negative number", "-1"]),
        ("cwm", ["unknown convolution kind 'cwm'", "'wn'", "'cwn'"]),
    ],
)
def test_parse_conv_rejects_bad_wn_cwn_specs(spec, needles):
    with pytest.raises(ValueError) as ei:
        parse_conv(spec)
    for needle in needles:
        assert needle in str(ei.value), (needle, str(ei.value))


def test_make_linear_takes_wn_and_cwn():
    for kind in ("wn", "cwn"):
        lin = make_linear(5, 3, ws=kind)
        assert isinstance(lin, nn.Linear) and parametrize.is_parametrized(lin, "weight")
        assert _g_v(lin)[0].shape == (3, 1)


@pytest.mark.parametrize("kind", ["wn", "cwn"])
def test_init_weights_reaches_parametrized_convs(kind):
    # He init must land in v and g (an in-place init of the computed weight would be lost)
    torch.manual_seed(5)
    plain = init_weights(nn.Sequential(make_conv(3, 8, 3, conv="plain")))
    torch.manual_seed(5)
    wnet = init_weights(nn.Sequential(make_conv(3, 8, 3, conv=kind)))
    w = plain[0].weight.detach().double().numpy()
    g = np.linalg.norm(w.reshape(8, -1), axis=1)
    expected = w if kind == "wn" else _np_cwn(w, g)
    np.testing.assert_allclose(wnet[0].weight.detach().numpy(), expected, rtol=1e-5, atol=1e-7)
    lin = nn.Linear(4, 3)
    torch.manual_seed(1)
    reinit_weight(lin, nn.init.constant_, val=0.5)
    assert torch.equal(lin.weight, torch.full((3, 4), 0.5))


@pytest.mark.parametrize("kind", ["wn", "cwn"])
def test_model_with_weight_normalized_convs_trains_a_step(kind):
    torch.manual_seed(0)
    model = create("resnet_cifar", 10, depth=8, width=0.5, norm="gn(num_groups=2)", conv=kind)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.endswith("original0") for n in moved) and any(
        n.endswith("original1") for n in moved
    )
    # the trained state round-trips through state_dict into a freshly built model
    torch.manual_seed(1)
    other = create("resnet_cifar", 10, depth=8, width=0.5, norm="gn(num_groups=2)", conv=kind)
    other.load_state_dict(model.state_dict())
    model.eval()
    other.eval()
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
    mlp = create("mlp", 10, in_channels=12, norm="bn", conv=kind)
    assert any(isinstance(m, nn.Linear) and parametrize.is_parametrized(m) for m in mlp.modules())
