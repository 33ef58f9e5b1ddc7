r"""Diagnostics of the mixture- and mode-based layers: MixtureNorm component weights and effective
number of components over training (Kalayeh & Shah, Sec. 5.2–5.3, Fig. 8–9), and ModeNorm gate
assignments (Deecke et al., Sec. 4 "Qualitative analysis", Fig. 3).

**Effective number of components** (Kalayeh & Shah, Sec. 5.3, Fig. 9): the number of components
whose normalized weight λ_k is at least ``min_weight = 0.01`` (the paper discards the others),

.. math::  K_{\text{eff}} = \#\{k : \lambda_k \ge \text{min\_weight}\}

(:func:`effective_num_components`). ``MixtureNorm`` reports the same count for its own
``min_weight`` (buffer ``last_num_components``), which :class:`MixtureRecorder` stores as well. A
continuous alternative is the perplexity :math:`\exp(-\sum_k\lambda_k\log\lambda_k)` of the
weights, 1 for one component and K for uniform weights (:func:`weight_perplexity`).

**Gate assignments** (Deecke et al., Fig. 3): the samples "assigned the highest probability to
belong to" each mode, i.e. for mode k the samples with the largest gate :math:`g_{nk}`
(:func:`collect_mode_gates`, :func:`top_samples_per_mode`, :func:`plot_mode_samples`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normlab.analysis._plot import new_figure, save_figure
from normlab.nn.mixture import MixtureNorm

__all__ = [
    "MixtureRecorder",
    "collect_mode_gates",
    "effective_num_components",
    "plot_effective_components",
    "plot_mixture_evolution",
    "plot_mixture_weights",
    "plot_mode_samples",
    "top_samples_per_mode",
    "weight_perplexity",
]


def effective_num_components(weights: Tensor, min_weight: float = 0.01) -> Tensor:
    """Number of mixture components with weight λ_k >= ``min_weight`` (Kalayeh & Shah, Sec. 5.3,
    Fig. 9).

    Shape:
        - Input: ``(..., K)``
        - Output: ``(...)`` (int64)

    Example::

        >>> effective_num_components(torch.tensor([[0.7, 0.295, 0.005], [0.4, 0.3, 0.3]]))
        tensor([2, 3])
    """
    if not 0 <= min_weight < 1:
        raise ValueError(
            f"effective_num_components: min_weight must be in [0, 1), got {min_weight!r}"
        )
    return (torch.as_tensor(weights) >= min_weight).sum(-1)


def weight_perplexity(weights: Tensor) -> Tensor:
    """exp of the entropy of the (renormalized) component weights: 1 for a single component, K for
    K equal weights. Shape ``(..., K)`` -> ``(...)`` (float64).

    Example::

        >>> weight_perplexity(torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])).tolist()
        [1.0, 2.82842712474619]
    """
    w = torch.as_tensor(weights, dtype=torch.float64).clamp_min(0)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
    ent = -(torch.special.xlogy(w, w)).sum(-1)
    return ent.exp()


def _mixture_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MixtureNorm)}


class MixtureRecorder:
    """The fits of every ``MixtureNorm`` in a model over training (Kalayeh & Shah, Fig. 8–9).

    :meth:`record` reads the diagnostics each layer wrote at its latest training step (buffers
    ``last_weight`` λ (K,), ``last_mean`` μ and ``last_var`` σ² (K, C), ``last_num_components``)
    and appends ``{"step": step, "layers": {name: {...}}}`` to :attr:`history` with, per layer:
    ``weights`` (λ, a list in component order), ``num_components`` (the layer's own count of
    unpruned components), ``effective`` (:func:`effective_num_components` of λ at
    ``min_weight``), ``perplexity`` (:func:`weight_perplexity`), and with ``store_params=True``
    also ``mean`` and ``var`` (K × C lists, for :func:`plot_mixture_evolution`). Layers that have
    not had a training step yet are skipped. Use as a trainer callback (every ``every`` steps) or
    call :meth:`record` yourself; it reads buffers only (one host copy per record).

    Args:
        model: a network with at least one ``MixtureNorm``.
        store_params: also store each fit's means and variances.
        min_weight: the weight threshold of :func:`effective_num_components`.
        every: record every ``every`` steps when used as a trainer callback.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), normlab.MixtureNorm(8, k=3))
        >>> recorder = MixtureRecorder(model)
        >>> _ = model(torch.randn(16, 3, 6, 6))  # one training step of the layer
        >>> entry = recorder.record(step=1)["layers"]["1"]
        >>> len(entry["weights"]), round(sum(entry["weights"]), 6), 1 <= entry["effective"] <= 3
        (3, 1.0, True)
    """

    def __init__(
        self,
        model: nn.Module,
        store_params: bool = False,
        min_weight: float = 0.01,
        every: int = 1,
    ) -> None:
        self.layers = _mixture_layers(model)
        if not self.layers:
            raise ValueError("MixtureRecorder: the model has no MixtureNorm layer")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"MixtureRecorder: every must be a positive integer, got {every!r}")
        effective_num_components(torch.zeros(1), min_weight)  # validates min_weight
        self.store_params = bool(store_params)
        self.min_weight = float(min_weight)
        self.every = every
        self.history: list[dict[str, Any]] = []

    @torch.no_grad()
    def record(self, step: int) -> dict[str, Any]:
        layers = {}
        for name, m in self.layers.items():
            if int(m.num_batches_tracked) == 0:
                continue
            lam = m.last_weight.detach().to("cpu", torch.float64)
            entry: dict[str, Any] = {
                "weights": lam.tolist(),
                "num_components": int(m.last_num_components),
                "effective": int(effective_num_components(lam, self.min_weight)),
                "perplexity": float(weight_perplexity(lam)),
            }
            if self.store_params:
                entry["mean"] = m.last_mean.detach().cpu().tolist()
                entry["var"] = m.last_var.detach().cpu().tolist()
            layers[name] = entry
        rec = {"step": int(step), "layers": layers}
        self.history.append(rec)
        return rec

    def __call__(self, trainer: Any) -> None:
        """Trainer callback: record every ``every`` optimizer steps."""
        if trainer.step % self.every == 0:
            self.record(trainer.step)


def _layer_series(history: Sequence[Mapping[str, Any]], layer: str, key: str):
    steps, vals = [], []
    for rec in history:
        entry = rec["layers"].get(layer)
        if entry is not None:
            steps.append(rec["step"])
            vals.append(entry[key])
    return steps, vals


def _layer_names(history: Sequence[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for rec in history:
        for n in rec["layers"]:
            if n not in names:
                names.append(n)
    return names


def _running(v: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Trailing running mean and standard deviation over ``window`` points."""
    mean = np.empty_like(v)
    std = np.empty_like(v)
    for i in range(v.size):
        w = v[max(0, i - window + 1) : i + 1]
        mean[i], std[i] = w.mean(), w.std()
    return mean, std


def plot_effective_components(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    key: str = "num_components",
    window: int = 1,
    layers: Sequence[str] | None = None,
) -> Path:
    """Kalayeh & Shah, Fig. 9: number of components used by each MixtureNorm layer against the step,
    smoothed by a trailing running average over ``window`` records with ±1 running standard
    deviation shaded. ``key`` is ``"num_components"`` (the layer's count), ``"effective"`` or
    ``"perplexity"``; ``history`` is :attr:`MixtureRecorder.history`."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"plot_effective_components: window must be >= 1, got {window!r}")
    names = list(layers) if layers is not None else _layer_names(history)
    fig, axes = new_figure(size=(5.0, 3.4))
    ax = axes[0, 0]
    for name in names:
        steps, vals = _layer_series(history, name, key)
        if not steps:
            continue
        mean, std = _running(np.asarray(vals, dtype=np.float64), window)
        ax.plot(steps, mean, label=name)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("number of components")
    if names:
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_mixture_weights(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    layers: Sequence[str] | None = None,
) -> Path:
    """Component weights λ_k of each MixtureNorm layer over training, sorted in decreasing order at
    every step (Kalayeh & Shah, Fig. 8 sorts components by λ_k): one panel per layer, one curve per
    rank."""
    names = list(layers) if layers is not None else _layer_names(history)
    if not names:
        raise ValueError("plot_mixture_weights: the history has no layer")
    fig, axes = new_figure(1, len(names))
    for j, name in enumerate(names):
        ax = axes[0, j]
        steps, vals = _layer_series(history, name, "weights")
        if steps:
            w = -np.sort(-np.asarray(vals, dtype=np.float64), axis=1)
            for k in range(w.shape[1]):
                ax.plot(steps, w[:, k], label=f"rank {k + 1}")
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("step")
        if j == 0:
            ax.set_ylabel("λ_k (sorted)")
            ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_mixture_evolution(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    layer: str | None = None,
    fractions: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0),
    channels: Sequence[int] = (0, 1, 2),
) -> Path:
    """Kalayeh & Shah, Fig. 8: a MixtureNorm layer's fitted components at fractions of training.

    Columns are the records closest to each fraction of the last recorded step (needs a
    :class:`MixtureRecorder` with ``store_params=True``); the top rows show, per channel, the
    weighted component densities λ_k N(x; μ_kc, σ²_kc) (dashed, coloured by λ-rank) and their sum
    (solid); the bottom row shows the sorted weights λ_k as bars.
    """
    name = layer if layer is not None else (_layer_names(history) or [None])[0]
    steps, means = _layer_series(history, name, "mean") if name else ([], [])
    if not steps:
        raise ValueError(
            "plot_mixture_evolution: no stored parameters for the layer (record with "
            "MixtureRecorder(store_params=True))"
        )
    _, vars_ = _layer_series(history, name, "var")
    _, weights = _layer_series(history, name, "weights")
    s = np.asarray(steps, dtype=np.float64)
    picks = [int(np.argmin(np.abs(s - f * s[-1]))) for f in fractions]
    fig, axes = new_figure(len(channels) + 1, len(picks))
    colors = ["tab:olive", "tab:blue", "tab:red", "tab:purple", "tab:orange", "tab:cyan"]
    for j, i in enumerate(picks):
        lam = np.asarray(weights[i], dtype=np.float64)
        order = np.argsort(-lam, kind="stable")
        mu = np.asarray(means[i], dtype=np.float64)[order]
        var = np.asarray(vars_[i], dtype=np.float64)[order]
        lam = lam[order]
        used = lam > 0
        for r, c in enumerate(channels):
            ax = axes[r, j]
            m, v = mu[used, c], np.maximum(var[used, c], 1e-12)
            sd = np.sqrt(v)
            grid = np.linspace((m - 4 * sd).min(), (m + 4 * sd).max(), 300)
            comp = lam[used, None] * np.exp(-0.5 * (grid - m[:, None]) ** 2 / v[:, None])
            comp /= np.sqrt(2 * np.pi * v[:, None])
            for k in range(comp.shape[0]):
                ax.plot(grid, comp[k], "--", color=colors[k % len(colors)], lw=1)
            ax.plot(grid, comp.sum(0), color="teal", lw=1.5)
            if r == 0:
                ax.set_title(f"step {steps[i]}", fontsize="small")
            if j == 0:
                ax.set_ylabel(f"channel {c}", fontsize="small")
        ax = axes[len(channels), j]
        ax.bar(np.arange(lam.size), lam, color=[colors[k % len(colors)] for k in range(lam.size)])
        ax.set_ylim(0, 1)
        if j == 0:
            ax.set_ylabel("λ_k", fontsize="small")
    return save_figure(fig, path)


@torch.no_grad()
def collect_mode_gates(
    model: nn.Module,
    layer: str | nn.Module,
    inputs: Tensor,
    batch_size: int = 256,
) -> Tensor:
    """Gate assignments g_nk of a ModeNorm layer for every sample of ``inputs`` (Deecke et al.,
    Fig. 3).

    Runs ``model`` in eval mode on ``inputs`` in chunks of ``batch_size`` (restoring its previous
    train/eval state afterwards), captures the input of ``layer`` (a module of the model or its
    qualified name) with a forward hook and returns ``layer.gates(input)``, ``(N, K)`` on the CPU.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), normlab.ModeNorm(8, k=2), nn.ReLU())
        >>> gates = collect_mode_gates(model, "1", torch.randn(10, 3, 6, 6), batch_size=4)
        >>> gates.shape, torch.allclose(gates.sum(1), torch.ones(10))
        (torch.Size([10, 2]), True)
    """
    if isinstance(layer, str):
        mods = dict(model.named_modules())
        if layer not in mods:
            raise ValueError(f"collect_mode_gates: the model has no module named {layer!r}")
        layer = mods[layer]
    if not callable(getattr(layer, "gates", None)):
        raise ValueError(
            f"collect_mode_gates: layer must have a gates(x) method (ModeNorm), got "
            f"{type(layer).__name__}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"collect_mode_gates: batch_size must be >= 1, got {batch_size!r}")
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: Any) -> None:
        captured.append(module.gates(args[0]).cpu())

    was_training = model.training
    handle = layer.register_forward_pre_hook(hook)
    try:
        model.eval()
        for start in range(0, inputs.shape[0], batch_size):
            model(inputs[start : start + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        raise ValueError("collect_mode_gates: the layer was not called by the model's forward")
    return torch.cat(captured)


def top_samples_per_mode(gates: Tensor, n: int = 8) -> Tensor:
    """Indices of the ``n`` samples with the largest gate for each mode (Deecke et al., Fig. 3),
    ``(K, n)``, most strongly claimed first. ``gates`` is ``(N, K)``.

    Example::

        >>> gates = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
        >>> top_samples_per_mode(gates, n=2)
        tensor([[0, 2],
                [1, 3]])
    """
    if gates.dim() != 2:
        raise ValueError(f"top_samples_per_mode: gates must be (N, K), got {tuple(gates.shape)}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= gates.shape[0]:
        raise ValueError(f"top_samples_per_mode: n must be in [1, {gates.shape[0]}], got {n!r}")
    return gates.topk(n, dim=0).indices.t()


def plot_mode_samples(
    images: Tensor | np.ndarray,
    indices: Tensor | np.ndarray,
    path: str | os.PathLike[str],
    gates: Tensor | None = None,
) -> Path:
    """Deecke et al., Fig. 3: one row per mode showing the images at ``indices`` (``(K, n)`` from
    :func:`top_samples_per_mode`). ``images`` is ``(N, H, W)``, ``(N, 1, H, W)`` or
    ``(N, 3, H, W)``; each image is min-max scaled for display. With ``gates`` (N, K) each
    image is titled with its gate value."""
    imgs = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    imgs = imgs.detach().to("cpu", torch.float64)
    if imgs.dim() == 3:
        imgs = imgs.unsqueeze(1)
    if imgs.dim() != 4 or imgs.shape[1] not in (1, 3):
        raise ValueError(
            f"plot_mode_samples: images must be (N, H, W) or (N, 1|3, H, W), got "
            f"{tuple(imgs.shape)}"
        )
    idx = torch.as_tensor(np.asarray(indices)).long()
    if idx.dim() != 2:
        raise ValueError(f"plot_mode_samples: indices must be (K, n), got {tuple(idx.shape)}")
    k, n = idx.shape
    fig, axes = new_figure(k, n, size=(1.1 * n + 0.6, 1.2 * k + 0.3))
    for r in range(k):
        for c in range(n):
            ax = axes[r, c]
            img = imgs[int(idx[r, c])]
            lo, hi = img.min(), img.max()
            img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if gates is not None:
                ax.set_title(f"{float(gates[int(idx[r, c]), r]):.2f}", fontsize="x-small")
            if c == 0:
                ax.set_ylabel(f"mode {r}", fontsize="small")
    return save_figure(fig, path)
