r"""Stochastic Normalization Disturbance and conditioning of normalized outputs (Huang et al.,
Sec. 4).

**SND** (Huang et al., Eq. 9–10). For a sample x and a normalization F, the output
:math:`\hat x = F(X^B; x)` depends on the mini-batch :math:`X^B` it is normalized with, so it is a
random variable. Its disturbance is

.. math::

    \Delta_F(x) = \mathbb E_{X^B}\big\|\hat x - \mathbb E_{X^B}\hat x\big\|_2 \quad (9), \qquad
    \widehat\Delta_F(x) = \frac1s\sum_{i=1}^s \Big\| F(X^B_i; x) - \frac1s\sum_{j=1}^s
        F(X^B_j; x)\Big\| \quad (10),

and the SND of F is :math:`\widehat\Delta_F = \frac1N\sum_{n=1}^N \widehat\Delta_F(x_n)` over N
sampled examples (Huang et al., Sec. 4.1). :func:`snd` estimates it for *any* layer (a module or
a registry spec): each mini-batch is x followed by B − 1 other examples drawn uniformly without
replacement from the pool, and the layer is run on it in training mode, so
:math:`F(X^B_i; x)` is what the layer outputs for x in a training step with that batch. The norm
is the Euclidean norm of the whole output of x (all channels and positions).

**Conditioning** (Huang et al., Fig. 4a): the condition number
:math:`\lambda_{max}/\lambda_{min}` of the covariance matrix of a layer's normalized output over a
mini-batch (:func:`covariance_condition_number`, :func:`normalized_condition_number`).

Both estimators run a *copy* of the layer (the caller's running statistics are untouched) in
training mode without gradients. They are analysis tools, not training-time code: they loop over
samples and draws. Readings of the paper are in ``docs/methods/analysis.md``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from normlab.analysis._plot import new_figure, save_figure
from normlab.nn._utils import to_points
from normlab.nn.registry import NormSpec, make_norm

__all__ = [
    "covariance_condition_number",
    "normalized_condition_number",
    "plot_snd",
    "snd",
    "snd_from_outputs",
]


def snd_from_outputs(outputs: Tensor) -> Tensor:
    r"""Empirical SND of one sample from its ``s`` normalized outputs (Huang et al., Eq. 10).

    ``outputs[i]`` is :math:`F(X^B_i; x)`; returns
    :math:`\frac1s\sum_i \|F(X^B_i;x) - \frac1s\sum_j F(X^B_j;x)\|_2` as a 0-d tensor (float32 for
    half-precision outputs, else their dtype).

    Shape:
        - Input: ``(s, *)``; each output is flattened (all channels and positions)
        - Output: ``()``

    Example::

        >>> outs = torch.tensor([[0.0, 1.0], [2.0, 1.0]])  # two draws; their mean is (1, 1)
        >>> snd_from_outputs(outs)  # the mean distance to it, 1
        tensor(1.)
    """
    if outputs.dim() < 1 or outputs.shape[0] < 1:
        raise ValueError(
            f"snd_from_outputs: expected outputs of shape (s, *) with s >= 1, got "
            f"{tuple(outputs.shape)}"
        )
    o = outputs.reshape(outputs.shape[0], -1)
    if o.dtype in (torch.float16, torch.bfloat16):
        o = o.float()
    dev = o - o.mean(0, keepdim=True)
    return torch.linalg.vector_norm(dev, dim=1).mean()


def _layer(norm: nn.Module | NormSpec, num_features: int) -> nn.Module:
    layer = copy.deepcopy(norm) if isinstance(norm, nn.Module) else make_norm(norm, num_features)
    return layer.train()


def _check_pool(data: Tensor, batch_size: int, where: str) -> None:
    if not isinstance(data, Tensor) or data.dim() < 2 or not data.is_floating_point():
        raise ValueError(
            f"{where}: data must be a floating-point tensor of shape (M, C) or (M, C, *), got "
            f"{type(data).__name__ if not isinstance(data, Tensor) else tuple(data.shape)}"
        )
    m = data.shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= m:
        raise ValueError(
            f"{where}: batch_size must be an integer in [1, {m}] (the pool size), got "
            f"{batch_size!r}"
        )


def _check_count(value: object, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


@torch.no_grad()
def snd(
    norm: nn.Module | NormSpec,
    data: Tensor,
    batch_size: int,
    *,
    num_samples: int = 10,
    num_draws: int = 50,
    sample_indices: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Per-sample SND :math:`\widehat\Delta_F(x_n)` of a normalization (Huang et al., Eq. 9–10).

    Args:
        norm: a layer (copied, then run in training mode) or a registry spec such as ``"bn"`` or
            ``"iternorm(group_size=64, iters=5)"`` (built for ``data.shape[1]`` channels).
        data: the pool of examples :math:`P_\chi`, ``(M, C)`` or ``(M, C, *)``.
        batch_size: B (1 <= B <= M); each mini-batch is x plus B − 1 other pool examples.
        num_samples: N, number of examples x (drawn without replacement from the pool) when
            ``sample_indices`` is not given.
        num_draws: s, mini-batches per example.
        sample_indices: indices into ``data`` of the examples x (overrides ``num_samples``).
        generator: CPU ``torch.Generator`` for every random choice (reproducible draws).

    Returns:
        ``(N,)`` tensor of :math:`\widehat\Delta_F(x_n)`; its mean is the SND
        :math:`\widehat\Delta_F` of the normalization (Huang et al., Sec. 4.1).

    Example::

        >>> pool = torch.randn(256, 16)
        >>> gen = torch.Generator().manual_seed(0)
        >>> small = snd("bn", pool, 4, num_samples=8, num_draws=20, generator=gen).mean()
        >>> large = snd("bn", pool, 128, num_samples=8, num_draws=20, generator=gen).mean()
        >>> bool(small > large)  # BN's SND grows as the batch shrinks (Huang et al., Fig. 5)
        True
    """
    _check_pool(data, batch_size, "snd")
    s = _check_count(num_draws, "num_draws", "snd")
    m = data.shape[0]
    if sample_indices is None:
        n = _check_count(num_samples, "num_samples", "snd")
        if n > m:
            raise ValueError(f"snd: num_samples must be <= the pool size {m}, got {n}")
        idx = torch.randperm(m, generator=generator)[:n]
    else:
        idx = torch.as_tensor(sample_indices, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() == 0 or idx.min() < 0 or idx.max() >= m:
            raise ValueError(f"snd: sample_indices must be non-empty indices in [0, {m})")
    layer = _layer(norm, data.shape[1])
    result = []
    for i in idx.tolist():
        outs = []
        for _ in range(s):
            others = torch.randperm(m - 1, generator=generator)[: batch_size - 1]
            others = others + (others >= i).long()  # skip x itself
            rows = torch.cat([torch.tensor([i]), others]).to(data.device)
            outs.append(layer(data[rows])[0])
        result.append(snd_from_outputs(torch.stack(outs)))
    return torch.stack(result)


def covariance_condition_number(y: Tensor) -> Tensor:
    r"""Condition number :math:`\lambda_{max}/\lambda_{min}` of the covariance of ``y``'s points.

    The covariance is the biased (1/m) covariance of the C-dimensional points of ``y`` (one per
    sample and position, as a normalization layer sees them); its eigenvalues are computed in
    float64 on the CPU. A singular covariance (λ_min <= 0, e.g. fewer points than dimensions)
    gives ``inf``.

    Shape:
        - Input: ``(m, C)`` or ``(N, C, *)``
        - Output: ``()`` (float64)

    Example::

        >>> y = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
        >>> covariance_condition_number(y)  # covariance diag(0.5, 2)
        tensor(4., dtype=torch.float64)
    """
    if y.dim() < 2:
        raise ValueError(
            f"covariance_condition_number: expected (m, C) or (N, C, *), got {tuple(y.shape)}"
        )
    p = to_points(y.detach()).to("cpu", torch.float64)
    pc = p - p.mean(0, keepdim=True)
    cov = pc.t() @ pc / p.shape[0]
    lam = torch.linalg.eigvalsh(cov)
    lo, hi = lam[0], lam[-1]
    if lo <= 0:
        return torch.tensor(float("inf"), dtype=torch.float64)
    return hi / lo


@torch.no_grad()
def normalized_condition_number(
    norm: nn.Module | NormSpec,
    data: Tensor,
    batch_size: int,
    *,
    num_batches: int = 10,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Condition numbers of the covariance of a layer's training-mode output (Huang et al.,
    Fig. 4a).

    Draws ``num_batches`` mini-batches of ``batch_size`` examples without replacement from
    ``data``, normalizes each with (a copy of) the layer in training mode and returns
    :func:`covariance_condition_number` of each output, ``(num_batches,)`` float64. The paper
    averages over 10 repetitions (``.mean()``).

    Args:
        norm: a layer (copied, then run in training mode) or a registry spec.
        data: the pool of examples, ``(M, C)`` or ``(M, C, *)``.
        batch_size: examples per mini-batch (1 <= B <= M).
        num_batches: number of mini-batches.
        generator: CPU ``torch.Generator`` for the draws.

    Example::

        >>> data = torch.randn(512, 8) @ torch.randn(8, 8)  # correlated features
        >>> gen = torch.Generator().manual_seed(0)
        >>> bn = normalized_condition_number("bn", data, 256, generator=gen).mean()
        >>> zca = normalized_condition_number("dbn(group_size=8)", data, 256, generator=gen).mean()
        >>> bool(zca < 1.01 < bn)  # whitening makes the covariance the identity
        True
    """
    _check_pool(data, batch_size, "normalized_condition_number")
    nb = _check_count(num_batches, "num_batches", "normalized_condition_number")
    layer = _layer(norm, data.shape[1])
    out = []
    for _ in range(nb):
        rows = torch.randperm(data.shape[0], generator=generator)[:batch_size].to(data.device)
        out.append(covariance_condition_number(layer(data[rows])))
    return torch.stack(out)


def plot_snd(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike[str],
    xlabel: str = "dimension",
    ylabel: str = "SND",
    logx: bool = True,
    logy: bool = False,
) -> Path:
    """Huang et al., Fig. 4–5 style line plot of SND or condition number against dimension or
    batch size.

    Args:
        curves: maps a label (e.g. "BN", "IterNorm", "DBN") to ``(xs, ys)``.
        path: the file to write (PNG if it has no suffix).
        xlabel, ylabel: axis labels.
        logx, logy: logarithmic axes (base 2 for x).

    Returns:
        the written path.

    Example::

        >>> import tempfile
        >>> out = plot_snd({"BN": ([16, 64], [0.3, 0.6])}, tempfile.mkdtemp() + "/snd")
        >>> out.suffix, out.exists()
        ('.png', True)
    """
    if not curves:
        raise ValueError("plot_snd: no curves to plot")
    fig, axes = new_figure(size=(4.4, 3.2))
    ax = axes[0, 0]
    for label, (xs, ys) in curves.items():
        ax.plot(list(xs), [float(y) for y in ys], marker="o", ms=3, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    return save_figure(fig, path)
