"""normlab.analysis: activation distributions (Kalayeh & Shah, Fig. 1; Collins et al., Fig. 4),
MixtureNorm / ModeNorm diagnostics (Kalayeh & Shah, Fig. 8–9; Deecke et al., Fig. 3) and every
plot function (PNG files, Agg, no pyplot)."""

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab.analysis import (
    MixtureRecorder,
    PercentileRecorder,
    StatDiffCollector,
    activation_percentiles,
    channel_values,
    collect_mode_gates,
    effective_num_components,
    fit_gaussian_mixtures,
    plot_activation_gmms,
    plot_effective_components,
    plot_mixture_evolution,
    plot_mixture_weights,
    plot_mode_samples,
    plot_percentiles,
    plot_snd,
    plot_speedup,
    plot_stat_diff,
    top_samples_per_mode,
    weight_perplexity,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 1000


class _FakeTrainer:
    def __init__(self, step):
        self.step = step


# ---------------------------------------------------------------- GMM fits (Kalayeh & Shah, Fig. 1)


def test_fit_gaussian_mixtures_recovers_a_bimodal_channel():
    rng = np.random.default_rng(0)
    vals = np.concatenate([rng.normal(-3, 0.5, 3000), rng.normal(2, 1.0, 7000)])
    fits = fit_gaussian_mixtures(vals, ks=(1, 2, 3), seed=0)
    assert [f.k for f in fits] == [1, 2, 3]
    one, two = fits[0], fits[1]
    assert one.means[0] == pytest.approx(vals.mean(), abs=1e-6)
    assert one.variances[0] == pytest.approx(vals.var(), rel=1e-4)
    # components sorted by weight: (0.7, mean 2, var 1), (0.3, mean -3, var 0.25)
    np.testing.assert_allclose(two.weights, [0.7, 0.3], atol=0.02)
    np.testing.assert_allclose(two.means, [2.0, -3.0], atol=0.1)
    np.testing.assert_allclose(two.variances, [1.0, 0.25], rtol=0.15)
    assert two.log_likelihood > one.log_likelihood + 0.1
    assert two.bic < one.bic
    # the density integrates to 1 and is the sum of its weighted components
    grid = np.linspace(-10, 10, 4001)
    total, comps = fits[2].density(grid)
    assert comps.shape == (3, grid.size)
    np.testing.assert_allclose(comps.sum(0), total)
    assert np.trapezoid(total, grid) == pytest.approx(1.0, abs=1e-3)


def test_channel_values_and_gmm_errors():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(channel_values(x, 1), [4, 5, 6, 7, 16, 17, 18, 19])
    with pytest.raises(ValueError, match="channel 3"):
        channel_values(x, 3)
    with pytest.raises(ValueError, match="each K"):
        fit_gaussian_mixtures(np.arange(10.0), ks=(0,))


def test_plot_activation_gmms_writes_png(tmp_path):
    x = torch.relu(torch.randn(64, 6, 4, 4)) + 0.1 * torch.randn(64, 6, 4, 4)
    out = plot_activation_gmms(x, tmp_path / "fig1", channels=[0, 3], ks=(1, 2, 3))
    assert out.suffix == ".png" and _is_png(out)


# ------------------------------------------------------- percentiles (Collins et al., Fig. 4)


def test_activation_percentiles_match_numpy():
    x = torch.randn(16, 5, 7, 3)
    q = (1, 20, 80, 99)
    ref = np.percentile(x.numpy().astype(np.float64), q)
    np.testing.assert_allclose(activation_percentiles(x, q).numpy(), ref, rtol=1e-5, atol=1e-6)
    per = activation_percentiles(x, q, dim=1)
    assert per.shape == (4, 5)
    ch = x.numpy().transpose(1, 0, 2, 3).reshape(5, -1).astype(np.float64)
    np.testing.assert_allclose(per.numpy(), np.percentile(ch, q, axis=1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="in \\[0, 100\\]"):
        activation_percentiles(x, (101,))


def test_percentile_recorder_and_plot(tmp_path):
    conv = nn.Conv2d(2, 3, 3)
    rec = PercentileRecorder(conv, every=2)
    assert rec.record(0) is None  # nothing seen yet
    x = torch.randn(4, 2, 6, 6)
    y = conv(x)
    rec(_FakeTrainer(1))  # not a multiple of `every`
    rec(_FakeTrainer(2))
    conv.eval()
    conv(torch.randn(4, 2, 6, 6) * 100)  # eval output ignored
    rec.record(3)
    assert [r["step"] for r in rec.history] == [2, 3]
    ref = np.percentile(y.detach().numpy().astype(np.float64), (1, 20, 80, 99))
    np.testing.assert_allclose(rec.history[1]["percentiles"], ref, rtol=1e-5, atol=1e-6)
    rec.remove()
    hist2 = [{"step": s, "percentiles": [-s, -1, 1, s]} for s in range(1, 6)]
    out = plot_percentiles({"BN": rec.history, "none": hist2}, tmp_path / "fig4.png")
    assert _is_png(out)


# ----------------------------------------------------- MixtureNorm (Kalayeh & Shah, Fig. 8–9)


def test_effective_num_components_and_perplexity_hand():
    w = torch.tensor([[0.5, 0.495, 0.005], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]])
    assert effective_num_components(w).tolist() == [2, 3, 1]
    assert effective_num_components(w, min_weight=0.4).tolist() == [2, 0, 1]
    p = weight_perplexity(w)
    assert p[1].item() == pytest.approx(3.0) and p[2].item() == pytest.approx(1.0)
    h = -(0.5 * np.log(0.5) + 0.495 * np.log(0.495) + 0.005 * np.log(0.005))
    assert p[0].item() == pytest.approx(np.exp(h))


def test_mixture_recorder_and_plots(tmp_path):
    net = nn.Sequential(nn.Conv2d(2, 6, 3), normlab.MixtureNorm(6, k=3), nn.ReLU())
    rec = MixtureRecorder(net, store_params=True)
    assert rec.record(0)["layers"] == {}  # no training step yet
    for step in range(1, 6):
        net(torch.randn(8, 2, 6, 6) + step * 0.1)
        rec(_FakeTrainer(step))
    layer = net[1]
    last = rec.history[-1]["layers"]["1"]
    assert last["weights"] == pytest.approx(layer.last_weight.double().tolist())
    assert sum(last["weights"]) == pytest.approx(1.0, abs=1e-5)
    assert last["num_components"] == int(layer.last_num_components)
    assert 1 <= last["effective"] <= 3 and 1 <= last["perplexity"] <= 3
    # numpy oracles of the two summaries of the weights (Kalayeh & Shah, Sec. 5.3 count; exp of
    # the entropy)
    lam = np.asarray(last["weights"], dtype=np.float64)
    assert last["effective"] == int(np.sum(lam >= 0.01))
    p = lam / lam.sum()
    p = p[p > 0]
    assert last["perplexity"] == pytest.approx(float(np.exp(-np.sum(p * np.log(p)))), rel=1e-9)
    assert np.asarray(last["mean"]).shape == (3, 6)
    np.testing.assert_allclose(last["mean"], layer.last_mean.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(last["var"], layer.last_var.double().numpy(), rtol=1e-6)
    assert [r["step"] for r in rec.history] == [0, 1, 2, 3, 4, 5]
    out1 = plot_effective_components(rec.history, tmp_path / "fig9.png", window=2)
    out2 = plot_mixture_weights(rec.history, tmp_path / "weights.png")
    out3 = plot_mixture_evolution(rec.history, tmp_path / "fig8.png", channels=(0, 5))
    assert all(_is_png(p) for p in (out1, out2, out3))
    with pytest.raises(ValueError, match="no MixtureNorm"):
        MixtureRecorder(nn.Linear(2, 2))


# ------------------------------------------------------- ModeNorm gates (Deecke et al., Fig. 3)


def test_mode_gates_top_samples_and_plot(tmp_path):
    mode = normlab.ModeNorm(3, k=2)
    with torch.no_grad():  # gate = softmax of (+4 mean_0, -4 mean_0): mode 0 claims bright ch. 0
        mode.gate.weight.copy_(torch.tensor([[4.0, 0, 0], [-4.0, 0, 0]]))
        mode.gate.bias.zero_()
    net = nn.Sequential(nn.Identity(), mode)
    x = torch.randn(20, 3, 4, 4) * 0.1
    shift = torch.linspace(-1, 1, 20)
    x[:, 0] += shift.view(-1, 1, 1)
    net.train()
    gates = collect_mode_gates(net, "1", x, batch_size=7)
    assert net.training  # state restored
    assert gates.shape == (20, 2)
    # oracle: softmax of the affine gate on the spatial means (Deecke et al., Sec. 3.2)
    m = x.mean((2, 3))
    ref = torch.softmax(m @ mode.gate.weight.t() + mode.gate.bias, dim=1)
    torch.testing.assert_close(gates, ref)
    top = top_samples_per_mode(gates, n=4)
    assert top.shape == (2, 4)
    assert set(top[0].tolist()) == {19, 18, 17, 16}  # largest channel-0 means
    assert set(top[1].tolist()) == {0, 1, 2, 3}
    out = plot_mode_samples(x, top, tmp_path / "fig3.png", gates=gates)
    assert _is_png(out)
    out_gray = plot_mode_samples(x[:, 0], top, tmp_path / "fig3_gray.png")
    assert _is_png(out_gray)
    with pytest.raises(ValueError, match="gates"):
        collect_mode_gates(net, "0", x)


# ---------------------------------------------------------------- remaining plots


def test_plot_stat_diff_snd_and_speedup_write_png(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 8, 3), normlab.make_norm("gn(num_groups=2)", 8))
    col = StatDiffCollector(net)
    for step in range(1, 4):
        net(torch.randn(4, 3, 6, 6))
        col.record(step)
    col.remove()
    assert _is_png(plot_stat_diff({"GN": col.history}, tmp_path / "fig6.png"))
    curves = {"BN": ([2, 4, 8], [1.0, 2.0, 4.0]), "IterNorm": ([2, 4, 8], [0.5, 0.6, 0.7])}
    assert _is_png(plot_snd(curves, tmp_path / "snd.png"))
    base = [{"step": s, "test_acc": a} for s, a in [(1, 0.2), (2, 0.4), (3, 0.6)]]
    meth = [{"step": s, "test_acc": a} for s, a in [(1, 0.4), (2, 0.7)]]
    assert _is_png(plot_speedup(base, {"BN": meth}, tmp_path / "speedup.png"))
