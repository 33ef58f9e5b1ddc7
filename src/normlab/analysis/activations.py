r"""Activation distributions: Gaussian-mixture fits per channel (Kalayeh & Shah, Fig. 1) and
activation percentiles over training (Collins et al., Fig. 4).

* :func:`fit_gaussian_mixtures` fits 1-, 2- and 3-component (any K) one-dimensional Gaussian
  mixtures to a channel's activations with scikit-learn's ``GaussianMixture`` (EM, k-means
  initialisation); :func:`plot_activation_gmms` draws, for a few channels, the histogram of the
  activations with the fitted density p(x) (solid) and its weighted components λ_k N(x; μ_k, σ_k²)
  (dashed), one row per K — the layout of Kalayeh & Shah, Fig. 1, whose rows are BN (K = 1), MN:2
  and MN:3.
* :func:`activation_percentiles` gives percentiles of a layer's activations (all channels, samples
  and positions pooled — "percentiles of the cumulative distribution" of the layer's activations,
  Collins et al., Fig. 4 uses the 1st, 20th, 80th and 99th); :class:`PercentileRecorder` keeps them
  over training from a forward hook, and :func:`plot_percentiles` draws them against the step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normlab.analysis._plot import new_figure, save_figure

__all__ = [
    "GaussianMixtureFit",
    "PercentileRecorder",
    "activation_percentiles",
    "channel_values",
    "fit_gaussian_mixtures",
    "plot_activation_gmms",
    "plot_percentiles",
]

DEFAULT_PERCENTILES = (1.0, 20.0, 80.0, 99.0)


def channel_values(x: Tensor | np.ndarray, channel: int) -> np.ndarray:
    """All values of one channel of a channel-first ``(N, C)`` / ``(N, C, *)`` activation tensor
    (over samples and positions) as a float64 numpy vector.

    Example::

        >>> channel_values(torch.arange(8.0).reshape(2, 2, 2), channel=1)
        array([2., 3., 6., 7.])
    """
    a = x.detach().to("cpu", torch.float64).numpy() if isinstance(x, Tensor) else np.asarray(x)
    if a.ndim < 2:
        raise ValueError(f"channel_values: expected (N, C) or (N, C, *), got shape {a.shape}")
    if not -a.shape[1] <= channel < a.shape[1]:
        raise ValueError(
            f"channel_values: channel {channel} out of range for {a.shape[1]} channels"
        )
    return np.asarray(a[:, channel], dtype=np.float64).reshape(-1)


@dataclass(frozen=True)
class GaussianMixtureFit:
    """A fitted 1-D Gaussian mixture, components sorted by decreasing weight."""

    k: int
    weights: np.ndarray  # (K,), sums to 1
    means: np.ndarray  # (K,)
    variances: np.ndarray  # (K,)
    log_likelihood: float  # mean log-likelihood per value
    bic: float  # Bayesian information criterion on the fitted values

    def density(self, grid: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(p(x), components)`` on ``grid``: the mixture density ``(G,)`` and the weighted
        component densities λ_k N(x; μ_k, σ_k²), ``(K, G)`` (they sum to p)."""
        g = np.asarray(grid, dtype=np.float64).reshape(1, -1)
        mu = self.means.reshape(-1, 1)
        var = self.variances.reshape(-1, 1)
        comp = (
            self.weights.reshape(-1, 1)
            * np.exp(-0.5 * (g - mu) ** 2 / var)
            / np.sqrt(2 * np.pi * var)
        )
        return comp.sum(0), comp


def fit_gaussian_mixtures(
    values: Tensor | np.ndarray | Sequence[float],
    ks: Sequence[int] = (1, 2, 3),
    seed: int = 0,
    max_points: int | None = 20000,
    reg_covar: float = 1e-6,
) -> list[GaussianMixtureFit]:
    """Fit a K-component Gaussian mixture to 1-D ``values`` for each K in ``ks`` (Kalayeh & Shah,
    Fig. 1).

    Uses ``sklearn.mixture.GaussianMixture`` (EM from a k-means initialisation, ``random_state =
    seed``). At most ``max_points`` values (a seeded random subset) are used for the fit, which is
    plenty for a 1-D density; ``None`` uses all. ``reg_covar`` is added to the variances (keeps a
    constant channel fit finite).

    Returns:
        one :class:`GaussianMixtureFit` per K, components sorted by decreasing weight.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> left, right = torch.randn(3200, generator=g) - 3, torch.randn(800, generator=g) + 3
        >>> one, two = fit_gaussian_mixtures(torch.cat([left, right]), ks=(1, 2))
        >>> [round(float(m)) for m in two.means], [round(float(w), 1) for w in two.weights]
        ([-3, 3], [0.8, 0.2])
        >>> two.bic < one.bic  # two components describe the bimodal values better
        True
    """
    from sklearn.mixture import GaussianMixture

    v = values.detach().to("cpu", torch.float64).numpy() if isinstance(values, Tensor) else values
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size < 2:
        raise ValueError(f"fit_gaussian_mixtures: need at least 2 finite values, got {v.size}")
    if max_points is not None and v.size > max_points:
        v = np.random.default_rng(seed).choice(v, size=max_points, replace=False)
    fits = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= v.size:
            raise ValueError(
                f"fit_gaussian_mixtures: each K must be an integer in [1, {v.size}], got {k!r}"
            )
        gm = GaussianMixture(k, covariance_type="full", reg_covar=reg_covar, random_state=seed)
        gm.fit(v.reshape(-1, 1))
        order = np.argsort(-gm.weights_, kind="stable")
        fits.append(
            GaussianMixtureFit(
                k=k,
                weights=gm.weights_[order].copy(),
                means=gm.means_.reshape(-1)[order].copy(),
                variances=gm.covariances_.reshape(-1)[order].copy(),
                log_likelihood=float(gm.score(v.reshape(-1, 1))),
                bic=float(gm.bic(v.reshape(-1, 1))),
            )
        )
    return fits


def plot_activation_gmms(
    x: Tensor | np.ndarray,
    path: str | os.PathLike[str],
    channels: Sequence[int] | None = None,
    ks: Sequence[int] = (1, 2, 3),
    seed: int = 0,
    bins: int = 60,
    max_points: int | None = 20000,
) -> Path:
    """Kalayeh & Shah, Fig. 1: for each channel (columns; default the first four) and each K (rows),
    the histogram of the channel's activations in ``x`` (``(N, C)`` or ``(N, C, *)``), the fitted
    mixture density p(x) (solid) and its components (dashed). Returns the written path."""
    nch = x.shape[1]
    channels = list(range(min(4, nch))) if channels is None else list(channels)
    if not channels:
        raise ValueError("plot_activation_gmms: channels must not be empty")
    fig, axes = new_figure(len(ks), len(channels))
    for j, c in enumerate(channels):
        vals = channel_values(x, c)
        fits = fit_gaussian_mixtures(vals, ks, seed, max_points)
        lo, hi = float(vals.min()), float(vals.max())
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        grid = np.linspace(lo - pad, hi + pad, 400)
        for i, fit in enumerate(fits):
            ax = axes[i, j]
            ax.hist(vals, bins=bins, density=True, color="0.8")
            total, comps = fit.density(grid)
            for comp in comps:
                ax.plot(grid, comp, "--", lw=1)
            ax.plot(grid, total, color="teal", lw=1.8)
            if i == 0:
                ax.set_title(f"channel {c}")
            if j == 0:
                ax.set_ylabel(f"K = {fit.k}")
    return save_figure(fig, path)


def _percentiles(flat: Tensor, q: Tensor) -> Tensor:
    # numpy's default ("linear") interpolation, on the tensor's device, any size
    s, _ = torch.sort(flat)
    pos = q.to(s.dtype) / 100 * (s.numel() - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = pos - lo.to(pos.dtype)
    return s[lo] + (s[hi] - s[lo]) * frac


def activation_percentiles(
    x: Tensor, q: Sequence[float] = DEFAULT_PERCENTILES, dim: int | None = None
) -> Tensor:
    """Percentiles of activations (Collins et al., Fig. 4: the 1st, 20th, 80th and 99th).

    ``dim=None``: over all values of ``x`` pooled (returns ``(len(q),)``). ``dim=1``: per
    channel of a channel-first tensor (returns ``(len(q), C)``). Linear interpolation between
    order statistics (numpy's default), in float32 (float64 for float64 input) on ``x``'s device.

    Example::

        >>> activation_percentiles(torch.arange(101.0), q=(1, 50, 99))
        tensor([ 1., 50., 99.])
        >>> activation_percentiles(torch.randn(64, 8, 4, 4), dim=1).shape  # per channel
        torch.Size([4, 8])
    """
    qt = torch.as_tensor(list(q), dtype=torch.float64)
    if qt.numel() == 0 or bool(((qt < 0) | (qt > 100)).any()):
        raise ValueError(f"activation_percentiles: q must be values in [0, 100], got {list(q)}")
    xd = x.detach()
    xd = xd.double() if xd.dtype == torch.float64 else xd.float()
    if xd.numel() == 0:
        raise ValueError("activation_percentiles: x is empty")
    if dim is None:
        return _percentiles(xd.reshape(-1), qt.to(xd.device))
    if dim != 1 or xd.dim() < 2:
        raise ValueError(f"activation_percentiles: dim must be None or 1 (channels), got {dim!r}")
    pts = xd.movedim(1, 0).reshape(xd.shape[1], -1)
    s, _ = torch.sort(pts, dim=1)
    pos = qt.to(xd.device, s.dtype) / 100 * (s.shape[1] - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    frac = pos - lo.to(pos.dtype)
    return (s[:, lo] + (s[:, hi] - s[:, lo]) * frac).t()


class PercentileRecorder:
    """Percentiles of one module's output over training (Collins et al., Fig. 4).

    A forward hook keeps a detached reference to the module's latest output in training mode (no
    computation and no host synchronisation per step); :meth:`record` computes
    :func:`activation_percentiles` of it and appends ``{"step", "percentiles"}`` (a list of floats
    in the order of ``q``) to :attr:`history`. Use it as a trainer callback (records every
    ``every`` steps) or call :meth:`record` yourself; :meth:`remove` (or ``with``) removes the hook.

    Args:
        module: the module whose output is recorded.
        q: the percentiles, in [0, 100].
        every: record every ``every`` steps when used as a trainer callback.
        train_only: keep only training-mode outputs.

    Example::

        >>> conv = nn.Conv2d(3, 4, 3)
        >>> with PercentileRecorder(conv, q=(1, 99)) as rec:
        ...     _ = conv(torch.randn(8, 3, 6, 6))
        ...     entry = rec.record(step=1)
        >>> entry["step"], len(entry["percentiles"])
        (1, 2)
    """

    def __init__(
        self,
        module: nn.Module,
        q: Sequence[float] = DEFAULT_PERCENTILES,
        every: int = 1,
        train_only: bool = True,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"PercentileRecorder: every must be a positive integer, got {every!r}")
        self.q = tuple(float(v) for v in q)
        activation_percentiles(torch.zeros(1), self.q)  # validates q
        self.every = every
        self.train_only = bool(train_only)
        self.history: list[dict[str, Any]] = []
        self._last: Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Tensor) -> None:
        if self.train_only and not module.training:
            return
        self._last = output.detach()

    def record(self, step: int) -> dict[str, Any] | None:
        """Append the percentiles of the latest output (None if the module has not run)."""
        if self._last is None:
            return None
        p = activation_percentiles(self._last, self.q)
        rec = {"step": int(step), "percentiles": [float(v) for v in p.cpu()]}
        self.history.append(rec)
        return rec

    def __call__(self, trainer: Any) -> None:
        """Trainer callback: record every ``every`` optimizer steps."""
        if trainer.step % self.every == 0:
            self.record(trainer.step)

    def remove(self) -> None:
        self._handle.remove()
        self._last = None

    def __enter__(self) -> PercentileRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _ordinal(v: float) -> str:
    """The English suffix of a percentile: 1st, 2nd, 3rd, 11th, 20th, 99th, 99.9th."""
    if v != int(v):
        return "th"
    n = int(v)
    if n % 100 in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def plot_percentiles(
    runs: Mapping[str, Sequence[Mapping[str, Any]]] | Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    q: Sequence[float] = DEFAULT_PERCENTILES,
) -> Path:
    """Collins et al., Fig. 4: one panel per run (e.g. no normalization, standardization loss, BN),
    each percentile of ``q`` as a curve against the step. ``runs`` is a :class:`PercentileRecorder`
    history or ``{label: history}``. Panels have their own y-scale (as in the paper)."""
    if not isinstance(runs, Mapping):
        runs = {"": runs}
    if not runs:
        raise ValueError("plot_percentiles: no runs to plot")
    fig, axes = new_figure(1, len(runs))
    colors = ["black", "tab:blue", "tab:green", "tab:red", "tab:orange", "tab:purple"]
    for j, (label, hist) in enumerate(runs.items()):
        ax = axes[0, j]
        steps = [r["step"] for r in hist]
        vals = np.asarray([r["percentiles"] for r in hist], dtype=np.float64).reshape(len(hist), -1)
        for i in range(vals.shape[1]):
            name = f"{q[i]:g}{_ordinal(q[i])}" if i < len(q) else f"#{i}"
            ax.plot(steps, vals[:, i], color=colors[i % len(colors)], label=name)
        ax.set_xlabel("step")
        if label:
            ax.set_title(label)
        if j == 0:
            ax.set_ylabel("activation percentile")
            ax.legend(fontsize="small")
    return save_figure(fig, path)
