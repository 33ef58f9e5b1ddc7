"""SND for every registered layer (Huang et al., Eq. 9–10): `normlab.analysis.snd` on any spec
or module — exact zeros without batch dependence, a numpy oracle for BN, MixtureNorm's fresh fits
against BN and warm seeding, the caller's module untouched, and clear errors."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab.analysis import snd
from normlab.nn.mixture import MixtureNorm
from normlab.nn.renorm import BatchRenorm


def _pool(n=300, c=8, hw=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, c, hw, hw, generator=g) + 1.0


@pytest.mark.parametrize(
    "spec, shape",
    [
        ("gn(num_groups=4)", (8, 4, 4)),
        ("ln", (8, 4, 4)),
        ("ln", (8,)),
        ("in", (8, 4, 4)),
        ("none", (8,)),
        ("affine", (8, 4, 4)),
        ("mgn(k=2)", (8, 4, 4)),
    ],
)
def test_layers_without_batch_dependence_have_snd_exactly_zero(spec, shape):
    data = torch.randn(200, *shape, generator=torch.Generator().manual_seed(1)) * 3.0 + 0.5
    for b in (2, 7, 64):
        g = torch.Generator().manual_seed(b)
        v = snd(spec, data, b, num_samples=4, num_draws=6, generator=g)
        assert torch.equal(v, torch.zeros(4)), (spec, b, v)
        rel = snd(spec, data, b, num_samples=4, num_draws=6, generator=g, relative=True)
        assert torch.equal(rel, torch.zeros(4))


def _draws(m, i, batch_size, s, gen):
    """The documented mini-batches of snd: x first, then B - 1 distinct other pool rows."""
    out = []
    for _ in range(s):
        others = torch.randperm(m - 1, generator=gen)[: batch_size - 1]
        others = others + (others >= i).long()
        out.append([i, *others.tolist()])
    return out


def test_snd_of_bn_matches_a_numpy_oracle_on_4d_activations():
    data = _pool(120, 3, 2).double()
    x = data.numpy()
    idx, b, s = [5, 17], 4, 7
    got = snd(
        "bn", data, b, num_draws=s, sample_indices=idx, generator=torch.Generator().manual_seed(4)
    )
    gen = torch.Generator().manual_seed(4)
    ref = []
    for i in idx:
        outs = []
        for rows in _draws(len(x), i, b, s, gen):
            batch = x[rows]
            mu = batch.mean(axis=(0, 2, 3), keepdims=True)
            var = batch.var(axis=(0, 2, 3), keepdims=True)
            outs.append(((batch - mu) / np.sqrt(var + 1e-5))[0].ravel())
        outs = np.stack(outs)
        ref.append(np.linalg.norm(outs - outs.mean(0), axis=1).mean())
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10)


def test_bn_snd_decreases_with_batch_size_on_4d_activations():
    data = _pool(2000, 8, 3)
    g = torch.Generator().manual_seed(0)
    vals = [
        snd("bn", data, b, num_samples=6, num_draws=12, generator=g).mean().item()
        for b in (2, 8, 32, 128)
    ]
    assert all(a > c for a, c in itertools.pairwise(vals)), vals
    assert vals[0] > 4 * vals[-1]


def test_relative_snd_is_invariant_to_the_output_scale():
    # an affine scale of 5 multiplies the absolute SND by 5 and leaves the relative one
    data = _pool(300, 4, 3)
    bn = nn.BatchNorm2d(4)
    big = nn.BatchNorm2d(4)
    with torch.no_grad():
        big.weight.fill_(5.0)
    kw = {"num_samples": 5, "num_draws": 6}
    a = snd(bn, data, 8, generator=torch.Generator().manual_seed(2), **kw)
    a5 = snd(big, data, 8, generator=torch.Generator().manual_seed(2), **kw)
    torch.testing.assert_close(a5, 5 * a, rtol=1e-5, atol=0)
    r = snd(bn, data, 8, generator=torch.Generator().manual_seed(2), relative=True, **kw)
    r5 = snd(big, data, 8, generator=torch.Generator().manual_seed(2), relative=True, **kw)
    torch.testing.assert_close(r5, r, rtol=1e-5, atol=0)
    # BN's output has unit variance per channel: relative = absolute / sqrt(D) up to that estimate
    assert torch.allclose(r, a / math.sqrt(4 * 9), rtol=0.1)


def test_mixture_fresh_fits_are_noisier_than_bn_and_warm_seeding_reduces_it():
    data = torch.randn(400, 8, 4, 4, generator=torch.Generator().manual_seed(0))

    def rel(spec):
        g = torch.Generator().manual_seed(0)
        v = snd(spec, data, 16, num_samples=6, num_draws=8, generator=g, relative=True, warmup=5)
        return v.mean().item()

    bn, fresh = rel("bn"), rel("mixture(k=3, em_iters=2)")
    warm = rel('mixture(k=3, em_iters=2, init="warm")')
    assert fresh > 2 * bn, (fresh, bn)
    assert warm < 0.75 * fresh, (warm, fresh)


def test_snd_is_reproducible_from_the_generator_and_leaves_the_global_rng_alone():
    data = torch.randn(200, 6, 3, 3, generator=torch.Generator().manual_seed(3))
    spec = "mixture(k=3, em_iters=2)"  # k-means++ seeding draws from the global RNG
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = snd(spec, data, 8, num_samples=3, num_draws=4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)  # another global state: the same result
    b = snd(spec, data, 8, num_samples=3, num_draws=4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_module_is_run_in_training_mode_and_left_untouched():
    data = _pool(200, 8, 3)
    for layer in (BatchRenorm(8), MixtureNorm(8, k=2, init="warm"), normlab.make_norm("sn", 8)):
        layer(data[:32])  # some state: running statistics, a first fit
        layer.eval()
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        params = [p.clone() for p in layer.parameters()]
        v = snd(
            layer,
            data,
            4,
            num_samples=3,
            num_draws=5,
            warmup=3,
            generator=torch.Generator().manual_seed(0),
        )
        assert (v > 0).all() and torch.isfinite(v).all()  # training mode: batch statistics
        assert not layer.training
        for k, t in layer.state_dict().items():
            assert torch.equal(t, before[k]), (type(layer).__name__, k)
        assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), params, strict=True))


def test_warmup_settles_batch_renormalization_below_bn():
    # Batch Renormalization corrects the batch statistics towards the running ones, so once they
    # have settled its output moves less with the batch than BN's
    data = _pool(1000, 8, 3)

    def mean_snd(spec, warmup):
        g = torch.Generator().manual_seed(5)
        return snd(spec, data, 4, num_samples=6, num_draws=10, generator=g, warmup=warmup).mean()

    assert mean_snd("brn", 100) < 0.8 * mean_snd("bn", 100)
    # warm-up passes only consume draws: BN's value does not depend on its (unused) state
    assert mean_snd("bn", 0) != mean_snd("bn", 100)  # different draws ...
    assert mean_snd("bn", 0) == mean_snd("bn", 0)  # ... but reproducible


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"data": [[1.0, 2.0]]}, TypeError, "data must be a floating-point tensor"),
        ({"data": torch.ones(10, 4, dtype=torch.long)}, TypeError, "torch.int64"),
        ({"data": torch.ones(10)}, ValueError, r"shape \(M, C\)"),
        ({"norm": "nosuchnorm"}, ValueError, "snd: norm: unknown normalization 'nosuchnorm'"),
        ({"norm": 3}, TypeError, "snd: norm"),
        ({"batch_size": 0}, ValueError, "batch_size must be an integer in"),
        ({"warmup": -1}, ValueError, "warmup must be a non-negative integer, got -1"),
        ({"num_samples": 11}, ValueError, "num_samples must be <= the pool size 10"),
        ({"relative": "yes"}, TypeError, "relative must be True or False"),
        ({"generator": 0}, TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, err, match):
    args = {"norm": "bn", "data": torch.randn(10, 4), "batch_size": 2, **kwargs}
    norm, data, b = args.pop("norm"), args.pop("data"), args.pop("batch_size")
    with pytest.raises(err, match=match):
        snd(norm, data, b, **args)


def test_wrong_channel_count_of_a_module_is_the_layer_s_error():
    with pytest.raises(ValueError, match="expected 3 channels"):
        snd(MixtureNorm(3), torch.randn(10, 4), 2)
