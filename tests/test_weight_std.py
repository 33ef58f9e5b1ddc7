import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab.nn.weight_std import standardize_weight


def _np_ws(w: np.ndarray, eps: float, center: bool, scale: bool) -> np.ndarray:
    flat = w.reshape(w.shape[0], -1)
    mu = flat.mean(1, keepdims=True)
    var = (flat**2).mean(1, keepdims=True) - mu**2  # Eq. 7: population variance
    out = flat - mu if center else flat
    if scale:
        out = out / np.sqrt(var + eps)
    return out.reshape(w.shape)


def test_standardized_weight_has_zero_mean_unit_population_variance():
    conv = normlab.WSConv2d(6, 10, 3, eps=0.0)
    with torch.no_grad():
        conv.weight.mul_(7).add_(3)
    w = conv.standardized_weight().detach().double().reshape(10, -1)
    torch.testing.assert_close(w.mean(1), torch.zeros(10, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        w.var(1, correction=0), torch.ones(10, dtype=torch.float64), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "center,scale", [(True, True), (True, False), (False, True), (False, False)]
)
def test_center_and_scale_flags_each_do_their_part(center, scale):
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64) * 4 + 2
    got = standardize_weight(w, eps=1e-5, center=center, scale=scale)
    np.testing.assert_allclose(
        got.numpy(), _np_ws(w.numpy(), 1e-5, center, scale), rtol=1e-10, atol=1e-12
    )
    flat = got.reshape(5, -1)
    means_zero = bool(torch.allclose(flat.mean(1), torch.zeros(5, dtype=w.dtype), atol=1e-9))
    var_one = bool(
        torch.allclose(flat.var(1, correction=0), torch.ones(5, dtype=w.dtype), atol=1e-5)
    )
    assert means_zero == center
    assert var_one == scale


def test_conv_output_equals_conv_with_standardized_weight_and_keeps_bias():
    conv = normlab.WSConv2d(4, 6, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.bias.uniform_()
    x = torch.randn(2, 4, 7, 7)
    w = torch.from_numpy(
        _np_ws(conv.weight.detach().numpy().astype(np.float64), 1e-5, True, True)
    ).float()
    torch.testing.assert_close(conv(x), F.conv2d(x, w, conv.bias, padding=1), atol=1e-5, rtol=1e-5)


def test_ws_linear_and_conv1d_and_groups():
    lin = normlab.WSLinear(8, 3)
    x = torch.randn(5, 8)
    w = torch.from_numpy(_np_ws(lin.weight.detach().double().numpy(), 1e-5, True, True)).float()
    torch.testing.assert_close(lin(x), F.linear(x, w, lin.bias), atol=1e-5, rtol=1e-5)
    c1 = normlab.WSConv1d(4, 6, 3, groups=2)
    x1 = torch.randn(2, 4, 9)
    w1 = torch.from_numpy(_np_ws(c1.weight.detach().double().numpy(), 1e-5, True, True)).float()
    torch.testing.assert_close(c1(x1), F.conv1d(x1, w1, c1.bias, groups=2), atol=1e-5, rtol=1e-5)
    # groups: fan-in is C_in / groups x kernel
    assert c1.weight.shape[1] == 2


def test_gradients_reach_raw_weight_and_match_gradcheck():
    conv = normlab.WSConv2d(3, 4, 3, bias=False).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    # Eq. 15: the gradient wrt the raw weight is zero-centred per output channel
    g = conv.weight.grad.reshape(4, -1)
    torch.testing.assert_close(g.mean(1), torch.zeros(4, dtype=torch.float64), atol=1e-10, rtol=0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: F.conv2d(x, standardize_weight(w)), (w,))


def test_half_precision_weights_are_standardized_in_float32():
    # The fan-in variance (~1e6) overflows float16 (max 65504): computed in half precision it is
    # inf and the "standardized" weight collapses to zeros — finite, but wrong. The float64 numpy
    # oracle on the same (half-rounded) values catches that.
    w = (torch.randn(4, 50) * 1000 + 500).half()
    out = standardize_weight(w)
    assert out.dtype == torch.float16
    ref = _np_ws(w.double().numpy(), 1e-5, True, True)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=5e-3)
    flat = out.double().reshape(4, -1)
    torch.testing.assert_close(
        flat.var(1, correction=0), torch.ones(4, dtype=flat.dtype), atol=2e-3, rtol=0
    )
    # bfloat16 as well (its range is float32's, its precision 8 bits)
    wb = (torch.randn(4, 50) * 3 + 2).bfloat16()
    outb = standardize_weight(wb)
    assert outb.dtype == torch.bfloat16
    refb = _np_ws(wb.double().numpy(), 1e-5, True, True)
    np.testing.assert_allclose(outb.double().numpy(), refb, rtol=0, atol=3e-2)


def test_bad_ws_arguments():
    with pytest.raises(ValueError, match="eps"):
        normlab.WSConv2d(3, 4, 3, eps=-1)
    with pytest.raises(ValueError, match="center"):
        normlab.WSConv2d(3, 4, 3, center="yes")


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv1d(8, 8, 1)
        self.fc = nn.Linear(8 * 36, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.c2(x))).flatten(2)
        return self.fc(self.c1(h).flatten(1))


def test_convert_conv_keeps_raw_weights_and_model_runs():
    model = _Mixed()
    raw = model.c2.weight.detach().clone()
    raw1 = model.c1.weight.detach().clone()
    lin_raw = model.fc.weight.detach().clone()
    raw_bias = model.c2.bias.detach().clone()
    x = torch.randn(2, 3, 6, 6)
    names = normlab.convert_conv(model, "ws")
    assert names == ["c2", "c1"]
    assert isinstance(model.c2, normlab.WSConv2d) and isinstance(model.c1, normlab.WSConv1d)
    assert torch.equal(model.c2.weight, raw) and torch.equal(model.c1.weight, raw1)
    assert torch.equal(model.c2.bias, raw_bias)
    # the converted conv computes conv2d with the standardized raw weight and the old bias
    w_hat = torch.from_numpy(_np_ws(raw.double().numpy(), 1e-5, True, True)).float()
    torch.testing.assert_close(
        model.c2(x), F.conv2d(x, w_hat, raw_bias, padding=1), atol=1e-5, rtol=1e-5
    )
    assert type(model.fc) is nn.Linear  # linear only when asked
    names = normlab.convert_conv(model, "ws", linear=True)
    assert names == ["fc"] and isinstance(model.fc, normlab.WSLinear)
    assert torch.equal(model.fc.weight, lin_raw)
    out = model(x)
    out.sum().backward()
    assert model.c2.weight.grad is not None
    assert normlab.convert_conv(model, "ws") == []  # already converted
    with pytest.raises(ValueError, match="kind"):  # "wn" and "cwn" are kinds now
        normlab.convert_conv(model, "octave")
    m2 = _Mixed()
    assert normlab.convert_conv(m2, "ws", include="c*", exclude="c1") == ["c2"]
    with pytest.raises(ValueError, match="matches no convolution"):
        normlab.convert_conv(m2, "ws", include="conv9")


def test_convert_conv_keeps_dtype_and_configuration():
    model = nn.Sequential(
        nn.Conv2d(4, 6, (3, 1), stride=2, padding=(1, 0), dilation=1, groups=2, bias=False)
    ).double()
    normlab.convert_conv(model, "ws", eps=1e-3, center=False)
    c = model[0]
    assert isinstance(c, normlab.WSConv2d) and c.weight.dtype == torch.float64
    assert (c.kernel_size, c.stride, c.padding, c.groups, c.bias, c.eps, c.center) == (
        (3, 1),
        (2, 2),
        (1, 0),
        2,
        None,
        1e-3,
        False,
    )
