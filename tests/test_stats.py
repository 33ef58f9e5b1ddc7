"""normlab.nn.stats (the one place batch sums are taken) and the layout helpers of nn._utils,
against numpy sums written out directly, float64 gradcheck, and float32 accumulation for half
input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normlab.nn import stats
from normlab.nn._utils import channel_view, from_points, stat_dtype, to_points
from normlab.nn.stats import (
    channel_sums,
    covariance_sums,
    gram_sums,
    group_batch,
    weighted_channel_sums,
    weighted_sums,
)

SHAPES = [(7, 6), (4, 6, 5), (3, 6, 4, 5), (2, 6, 2, 3, 2)]


def _np_points(x: np.ndarray) -> np.ndarray:
    """(N, C, *) -> (m, C): one row per sample and position (written without torch)."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def _randn(shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------- layout helpers


@pytest.mark.parametrize("shape", SHAPES)
def test_to_points_and_back(shape):
    x = _randn(shape)
    p = to_points(x)
    np.testing.assert_array_equal(p.numpy(), _np_points(x.numpy()))
    assert torch.equal(from_points(p, x.shape), x)
    v = torch.arange(6.0, dtype=torch.float64)
    ref = v.numpy().reshape((1, 6) + (1,) * (len(shape) - 2))
    np.testing.assert_array_equal(channel_view(v, x.dim()).numpy(), ref)


def test_stat_dtype():
    assert stat_dtype(torch.zeros(1, dtype=torch.float16)) == torch.float32
    assert stat_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert stat_dtype(torch.zeros(1, dtype=torch.float32)) == torch.float32
    assert stat_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64


# ------------------------------------------------------------------------------- channel sums


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_sums_match_numpy(shape):
    x = _randn(shape, 1) * 3 + 2
    s = channel_sums(x)
    pts = _np_points(x.numpy())
    assert s.count.item() == pts.shape[0]
    np.testing.assert_allclose(s.s1.numpy(), pts.sum(0), rtol=1e-12)
    np.testing.assert_allclose(s.s2.numpy(), (pts**2).sum(0), rtol=1e-12)
    mean, var = s.mean_var()
    np.testing.assert_allclose(mean.numpy(), pts.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), pts.var(0), rtol=1e-9)


def test_channel_sums_variance_is_never_negative():
    # a constant channel: E[x²] − E[x]² may round below 0; mean_var clamps it
    x = torch.full((5, 3, 7), 0.1, dtype=torch.float32)
    _, var = channel_sums(x).mean_var()
    assert (var >= 0).all() and var.max() < 1e-6


def test_channel_sums_gradcheck():
    x = _randn((3, 4, 5), 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: tuple(channel_sums(t)[1:]), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_is_summed_in_float32(dtype):
    # 4096 values near 100 per channel: the sum (~4e5) exceeds float16's range and bfloat16's 8
    # bits of precision; summed in float32 it is exact to ~1e-6 relative
    x = (torch.rand(64, 2, 8, 8, generator=torch.Generator().manual_seed(3)) + 99.5).to(dtype)
    s = channel_sums(x)
    assert s.s1.dtype == s.s2.dtype == torch.float32
    pts = _np_points(x.double().numpy())
    np.testing.assert_allclose(s.s1.numpy(), pts.sum(0), rtol=1e-5)
    np.testing.assert_allclose(s.s2.numpy(), (pts**2).sum(0), rtol=1e-5)
    w = torch.rand(64 * 64, 3, generator=torch.Generator().manual_seed(4)).to(dtype)
    ws = weighted_sums(to_points(x), w)
    assert ws.s1.dtype == torch.float32
    np.testing.assert_allclose(ws.s1.numpy(), w.double().numpy().T @ pts, rtol=1e-5)


# ------------------------------------------------------------------------------ weighted sums


def test_weighted_sums_match_numpy():
    p = _randn((50, 4), 5) * 2 - 1
    w = torch.softmax(_randn((50, 3), 6), dim=1)
    s = weighted_sums(p, w)
    pn, wn = p.numpy(), w.numpy()
    np.testing.assert_allclose(s.w.numpy(), [wn[:, k].sum() for k in range(3)], rtol=1e-12)
    for k in range(3):
        np.testing.assert_allclose(s.s1[k].numpy(), (wn[:, k : k + 1] * pn).sum(0), rtol=1e-12)
        np.testing.assert_allclose(s.s2[k].numpy(), (wn[:, k : k + 1] * pn**2).sum(0), rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_weighted_channel_sums_equal_weighted_sums_of_the_points(shape):
    x = _randn(shape, 7) + 1
    k = 3
    wshape = (shape[0], k, *shape[2:])
    w = torch.softmax(_randn(wshape, 8), dim=1)
    s = weighted_channel_sums(x, w)
    pts, wpts = _np_points(x.numpy()), _np_points(w.numpy())  # (m, C), (m, K)
    np.testing.assert_allclose(s.w.numpy(), wpts.sum(0), rtol=1e-12)
    np.testing.assert_allclose(s.s1.numpy(), wpts.T @ pts, rtol=1e-10)
    np.testing.assert_allclose(s.s2.numpy(), wpts.T @ pts**2, rtol=1e-10)
    # any other per-position tensor can be summed with the same weights
    other = _randn(shape, 9)
    s_other = weighted_channel_sums(x, w, x2=other)
    np.testing.assert_allclose(s_other.s2.numpy(), wpts.T @ _np_points(other.numpy()), rtol=1e-10)


def test_weighted_sums_gradcheck_in_both_arguments():
    x = _randn((2, 3, 2, 2), 10).requires_grad_()
    w = torch.rand(2, 2, 2, 2, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: tuple(weighted_channel_sums(a, b)), (x, w))
    p = _randn((6, 3), 11).requires_grad_()
    v = torch.rand(6, 2, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: tuple(weighted_sums(a, b)), (p, v))


# ---------------------------------------------------------------------------- covariance sums


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", [1, 2, 3, 6])
def test_covariance_sums_match_numpy(shape, group_size):
    x = _randn(shape, 12) * 2 + 0.5
    s = covariance_sums(x, group_size)
    pts = _np_points(x.numpy())
    g = 6 // group_size
    assert s.count.item() == pts.shape[0]
    assert s.s1.shape == (g, group_size) and s.outer.shape == (g, group_size, group_size)
    for j in range(g):
        block = pts[:, j * group_size : (j + 1) * group_size]
        np.testing.assert_allclose(s.s1[j].numpy(), block.sum(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(s.outer[j].numpy(), block.T @ block, rtol=1e-10, atol=1e-10)


def test_covariance_sums_reject_a_group_size_that_does_not_divide():
    with pytest.raises(ValueError, match="group_size"):
        covariance_sums(torch.randn(4, 6, 3), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_batch(torch.randn(4, 6), 0)


@pytest.mark.parametrize("shape", [(5, 4), (2, 4, 3)])
def test_gram_sums_custom_backward_gradcheck(shape):
    # _GramSums has a hand-written backward (and double backward): check both, and each output
    # alone (the backward's branches for a missing incoming gradient)
    x = _randn(shape, 13).requires_grad_()

    def both(t):
        s = covariance_sums(t, 2)
        return s.s1, s.outer

    assert torch.autograd.gradcheck(both, (x,))
    assert torch.autograd.gradgradcheck(both, (x,))
    assert torch.autograd.gradcheck(lambda t: covariance_sums(t, 2).outer, (x,))
    assert torch.autograd.gradcheck(lambda t: covariance_sums(t, 2).s1, (x,))
    batch, reps = group_batch(x, 2)
    assert reps == (1 if len(shape) == 2 else shape[0])
    torch.testing.assert_close(gram_sums(batch, reps).outer, both(x)[1])


# ------------------------------------------------------------------------------- reduce seam


def test_reduction_scopes_nest_and_restore():
    a = torch.randn(3)
    assert stats.current_group() is None
    assert stats.reduce_sums(a)[0] is a  # identity outside a scope
    sentinel = object()
    stats.push_group(sentinel)
    try:
        assert stats.current_group() is sentinel
        with stats.reduction_scope(None):  # a nested "no reduction" scope
            assert stats.current_group() is None
            assert stats.reduce_sums(a)[0] is a
        assert stats.current_group() is sentinel
    finally:
        stats.pop_group()
    assert stats.current_group() is None
    stats.pop_group()  # closing with nothing open is a no-op
    assert stats.current_group() is None
