"""Switchable Normalization (``sn``): against a float64 implementation written from the formulas,
torch's own instance/layer/batch norm for one-hot weights, gradcheck, and bad arguments."""

import pytest
import torch
import torch.nn.functional as F

import normlab
from normlab.nn.switchable import SwitchNorm, switch_norm, switch_norm_moments

F64 = torch.float64


def _reference(x, lm, lv, rm, rv, w, b, training, momentum=0.1, eps=1e-5):
    """SN straight from the formulas: IN moments per (sample, channel), LN and BN moments from
    them, E[x²] − E[x]² as written, running statistics with the unbiased variance. Returns the
    output and the new running statistics (the given ones are not modified)."""
    n, c = x.shape[:2]
    xf = x.reshape(n, c, -1)
    length = xf.shape[-1]
    mu_in = xf.mean(-1)
    var_in = (xf * xf).mean(-1) - mu_in**2
    second = var_in + mu_in**2
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = second.mean(1, keepdim=True) - mu_ln**2
    if training:
        mu_bn = mu_in.mean(0, keepdim=True)
        var_bn = second.mean(0, keepdim=True) - mu_bn**2
        m = n * length
        rm = (1 - momentum) * rm + momentum * mu_bn[0].detach()
        rv = (1 - momentum) * rv + momentum * var_bn[0].detach() * m / max(m - 1, 1)
    else:
        mu_bn, var_bn = rm[None], rv[None]
    wm, wv = torch.softmax(lm, 0), torch.softmax(lv, 0)
    mu = wm[0] * mu_in + wm[1] * mu_ln + wm[2] * mu_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    y = (xf - mu[..., None]) / torch.sqrt(var[..., None] + eps)
    y = y * w[None, :, None] + b[None, :, None]
    return y.reshape(x.shape), rm, rv


def _layer(c: int) -> SwitchNorm:
    layer = SwitchNorm(c).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        layer.mean_weight.copy_(torch.tensor([0.3, -0.7, 0.5]))
        layer.var_weight.copy_(torch.tensor([-0.2, 0.4, 0.9]))
    return layer


def _params(layer):
    return [layer.mean_weight, layer.var_weight, layer.weight, layer.bias]


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (6, 5), (4, 5, 7), (3, 5, 2, 2, 3)])
def test_matches_the_formulas_over_two_steps_and_eval(shape):
    layer = _layer(shape[1])
    lm, lv, w, b = (p.detach().clone().requires_grad_() for p in _params(layer))
    rm, rv = torch.zeros(shape[1], dtype=F64), torch.ones(shape[1], dtype=F64)
    for step in range(2):
        x = (torch.randn(*shape, dtype=F64) * 2 + 1 + step).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        r = torch.randn(*shape, dtype=F64)
        layer.zero_grad()
        for t in (lm, lv, w, b):
            t.grad = None
        y = layer(x)
        yr, rm, rv = _reference(xr, lm, lv, rm, rv, w, b, True)
        torch.testing.assert_close(y, yr)
        (y * r).sum().backward()
        (yr * r).sum().backward()
        torch.testing.assert_close(x.grad, xr.grad)
        for p, t in zip(_params(layer), (lm, lv, w, b), strict=True):
            torch.testing.assert_close(p.grad, t.grad)
        torch.testing.assert_close(layer.running_mean, rm)
        torch.testing.assert_close(layer.running_var, rv)
    assert int(layer.num_batches_tracked) == 2
    layer.eval()
    x = torch.randn(*shape, dtype=F64) - 2
    with torch.no_grad():
        yr = _reference(x, lm, lv, rm, rv, w, b, False)[0]
        torch.testing.assert_close(layer(x), yr)
    torch.testing.assert_close(layer.running_mean, rm)  # eval changes no state


ONE_HOT = {"in": 0, "ln": 1, "bn": 2}


def _one_hot_layer(kind: str, c: int) -> SwitchNorm:
    layer = _layer(c)
    logits = torch.full((3,), -200.0, dtype=F64)
    logits[ONE_HOT[kind]] = 200.0
    with torch.no_grad():
        layer.mean_weight.copy_(logits)
        layer.var_weight.copy_(logits)
    return layer


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (5, 5, 9)])
def test_one_hot_weights_give_torch_instance_layer_and_batch_norm(shape):
    x = torch.randn(*shape, dtype=F64) * 3 - 1
    c = shape[1]
    for kind in ONE_HOT:
        layer = _one_hot_layer(kind, c)
        w, b = layer.weight.detach(), layer.bias.detach()
        rm, rv = torch.zeros(c, dtype=F64), torch.ones(c, dtype=F64)
        if kind == "in":
            expected = F.instance_norm(x, weight=w, bias=b)
        elif kind == "ln":
            expected = F.group_norm(x, 1, w, b)  # layer norm over (C, *), per-channel affine
        else:
            expected = F.batch_norm(x, rm, rv, w, b, training=True)
        torch.testing.assert_close(layer(x), expected, msg=kind)
        if kind == "bn":  # the running statistics are torch's, and so is eval
            torch.testing.assert_close(layer.running_mean, rm)
            torch.testing.assert_close(layer.running_var, rv)
            layer.eval()
            expected = F.batch_norm(x, rm, rv, w, b, training=False)
            torch.testing.assert_close(layer(x), expected)


def test_two_dimensional_input_in_is_a_single_value_and_ln_bn_are_torch():
    # (N, C): IN is the moments of one value (σ²_IN = 0), so IN alone outputs β
    x = torch.randn(7, 6, dtype=F64) * 2 + 3
    layer = _one_hot_layer("in", 6)
    torch.testing.assert_close(layer(x), layer.bias.detach().expand(7, 6))
    ln = _one_hot_layer("ln", 6)
    w, b = ln.weight.detach(), ln.bias.detach()
    torch.testing.assert_close(ln(x), F.layer_norm(x, (6,), w, b))
    bn = _one_hot_layer("bn", 6)
    w, b = bn.weight.detach(), bn.bias.detach()
    torch.testing.assert_close(bn(x), F.batch_norm(x, None, None, w, b, training=True))
    (mu_in, var_in), _, _ = switch_norm_moments(x)
    assert torch.equal(mu_in, x) and torch.equal(var_in, torch.zeros_like(x))


def test_moments_against_torch_var_mean():
    x = torch.randn(4, 6, 5, 5, dtype=F64) * 2 + 7
    (mu_in, var_in), (mu_ln, var_ln), (mu_bn, var_bn) = switch_norm_moments(x)
    for got, dims, keep in (
        ((mu_in, var_in), (2, 3), False),
        ((mu_ln, var_ln), (1, 2, 3), False),
        ((mu_bn, var_bn), (0, 2, 3), False),
    ):
        v, m = torch.var_mean(x, dim=dims, correction=0, keepdim=keep)
        torch.testing.assert_close(got[0].reshape(m.shape), m)
        torch.testing.assert_close(got[1].reshape(v.shape), v)


def test_gradcheck_float64():
    x = torch.randn(3, 4, 3, 2, dtype=F64, requires_grad=True)
    lm = torch.tensor([0.2, -0.1, 0.4], dtype=F64, requires_grad=True)
    lv = torch.tensor([-0.3, 0.5, 0.1], dtype=F64, requires_grad=True)
    w = torch.rand(4, dtype=F64, requires_grad=True)
    b = torch.randn(4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: switch_norm(*a[:3], None, None, *a[3:]), (x, lm, lv, w, b)
    )
    rm, rv = torch.randn(4, dtype=F64), torch.rand(4, dtype=F64) + 0.5
    assert torch.autograd.gradcheck(
        lambda *a: switch_norm(*a[:3], rm, rv, *a[3:], training=False), (x, lm, lv, w, b)
    )
    x2 = torch.randn(5, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, lm, lv: switch_norm(x, lm, lv), (x2, lm, lv))


def test_large_mean_and_constant_input_stay_accurate_and_finite():
    # |μ| ≫ σ: E[x²] − E[x]² of the raw float32 values would lose the variance entirely; IN and
    # LN use centered moments, the BN part is shifted by its running mean
    x32 = torch.randn(8, 4, 6, 6) * 0.1 + 1000.0
    x64 = x32.double()  # the same (float32-rounded) values
    layer = SwitchNorm(4)
    layer.running_mean.fill_(1000.0)
    lm, lv, w, b = (p.detach().double() for p in _params(layer))
    rm, rv = torch.full((4,), 1000.0, dtype=F64), torch.ones(4, dtype=F64)
    ref = _reference(x64, lm, lv, rm, rv, w, b, True)[0]
    torch.testing.assert_close(layer(x32).double(), ref, atol=5e-3, rtol=0)
    y = SwitchNorm(4)(torch.full((3, 4, 2, 2), 5.0))
    assert torch.isfinite(y).all() and torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_uses_float32_statistics(dtype):
    x = (torch.randn(6, 4, 5, 5) * 3 + 2).to(dtype)
    layer = _layer(4).float()
    ref = _layer(4).float()
    ref.load_state_dict(layer.state_dict())
    y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(
        y.float(), ref(x.float()), atol=2e-2 if dtype == torch.float16 else 8e-2, rtol=0
    )
    torch.testing.assert_close(layer.running_var, ref.running_var)


def test_registry_repr_and_reset():
    layer = normlab.make_norm("sn(momentum=0.2, eps=1e-4)", 6)
    assert isinstance(layer, SwitchNorm) and normlab.SwitchNorm is SwitchNorm
    assert "6, eps=0.0001, momentum=0.2, affine=True" in repr(layer)
    assert layer.sync_batch_stats
    assert torch.equal(layer.mean_weight, torch.zeros(3))
    none = SwitchNorm(3, affine=False)
    assert none.weight is None and none.bias is None
    assert torch.isfinite(none(torch.randn(4, 3, 2))).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_features=0), "num_features"),
        (dict(num_features=4, eps=0), "eps"),
        (dict(num_features=4, momentum=1.5), "momentum"),
        (dict(num_features=4, affine="yes"), "affine"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwitchNorm(**kwargs)


def test_bad_input():
    layer = SwitchNorm(4)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 4, dtype=torch.long))
