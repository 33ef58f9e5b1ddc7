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
sampled examples (Huang et al., Sec. 4.1). :func:`snd` estimates it for *any* registered layer
(a module or a registry spec): each mini-batch is x followed by B − 1 other examples drawn
uniformly without replacement from the pool, and the layer is run on it in training mode, so
:math:`F(X^B_i; x)` is what the layer outputs for x in a training step with that batch. The norm
is the Euclidean norm of the whole output of x (all channels and positions). A layer without
batch dependence (GN, LN, IN, the identity) has SND exactly 0. ``relative=True`` divides by
:math:`\sigma_{out}\sqrt D` (D elements per sample, :math:`\sigma_{out}` the output's std), so
layers with different output scales compare.

**Conditioning** (Huang et al., Fig. 4a): the condition number
:math:`\lambda_{max}/\lambda_{min}` of the covariance matrix of a layer's normalized output over a
mini-batch (:func:`covariance_condition_number`, :func:`normalized_condition_number`).

Both estimators run a *copy* of the layer (the caller's buffers are untouched) in training mode
without gradients; the copy's state (running statistics, warm-start seeds, micro-batch estimates)
evolves over the draws as it would in training. They are analysis tools, not training-time code:
they loop over samples and draws. Readings of the paper are in ``docs/methods/analysis.md``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator, Mapping, Sequence
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
    half-precision outputs, else their dtype). An element equal in all ``s`` outputs deviates by
    exactly 0 (a floating-point mean of equal numbers need not return them), so outputs that do
    not depend on the batch give exactly 0.

    Shape:
        - Input: ``(s, *)``; each output is flattened (all channels and positions)
        - Output: ``()``

    Example::

        >>> outs = torch.tensor([[0.0, 1.0], [2.0, 1.0]])  # two draws; their mean is (1, 1)
        >>> snd_from_outputs(outs)  # the mean distance to it, 1
        tensor(1.)
    """
    if not isinstance(outputs, Tensor):
        raise TypeError(f"snd_from_outputs: outputs must be a tensor, got {type(outputs).__name__}")
    if outputs.dim() < 1 or outputs.shape[0] < 1:
        raise ValueError(
            f"snd_from_outputs: expected outputs of shape (s, *) with s >= 1, got "
            f"{tuple(outputs.shape)}"
        )
    o = outputs.reshape(outputs.shape[0], -1)
    if o.dtype in (torch.float16, torch.bfloat16):
        o = o.float()
    dev = o - o.mean(0, keepdim=True)
    dev = torch.where((o == o[:1]).all(0, keepdim=True), torch.zeros_like(dev), dev)
    return torch.linalg.vector_norm(dev, dim=1).mean()


def _layer(norm: nn.Module | NormSpec, data: Tensor, where: str) -> nn.Module:
    """A training-mode copy of the module ``norm`` (as it is), or the layer the spec ``norm``
    builds for ``data``'s channels, on its device (in float64 for float64 data)."""
    if isinstance(norm, nn.Module):
        return copy.deepcopy(norm).train()
    try:
        layer = make_norm(norm, data.shape[1]).to(data.device)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{where}: norm: {e}") from None
    return (layer.double() if data.dtype == torch.float64 else layer).train()


def _check_pool(data: Tensor, batch_size: int, where: str) -> None:
    if not isinstance(data, Tensor) or not data.is_floating_point():
        raise TypeError(
            f"{where}: data must be a floating-point tensor, got "
            f"{data.dtype if isinstance(data, Tensor) else type(data).__name__}"
        )
    if data.dim() < 2:
        raise ValueError(
            f"{where}: data must have shape (M, C) or (M, C, *), got {tuple(data.shape)}"
        )
    m = data.shape[0]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= m:
        raise ValueError(
            f"{where}: batch_size must be an integer in [1, {m}] (the pool size), got "
            f"{batch_size!r}"
        )


def _check_count(value: object, name: str, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive" if minimum == 1 else "a non-negative"
        raise ValueError(f"{where}: {name} must be {what} integer, got {value!r}")
    return value


def _check_generator(generator: object, where: str) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}"
        )


@contextlib.contextmanager
def _layer_rng(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """The layer's own random draws (e.g. MixtureNorm's k-means++ seeding) come from the global
    RNG; with a ``generator`` they are seeded from its initial seed, in a forked RNG state, so the
    result depends on the generator alone and the caller's RNG state is untouched."""
    if generator is None:
        yield
        return
    seed = generator.initial_seed()
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _channel_std(outputs: Tensor) -> Tensor:
    """√(mean over channels of each channel's variance) of outputs ``(n, C, *)``, float64."""
    o = outputs.detach().to(torch.float64)
    o = o.reshape(o.shape[0], o.shape[1], -1).transpose(0, 1).reshape(o.shape[1], -1)
    return o.var(dim=1, unbiased=False).mean().sqrt()


def _relative(values: Tensor, std: Tensor, elements: int) -> Tensor:
    """``values / (std·√elements)``; 0 where both are 0 (a constant output does not move)."""
    scale = std.to(values.dtype) * math.sqrt(elements)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, values / safe, torch.where(values > 0, math.inf, 0.0))


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
    warmup: int = 0,
    relative: bool = False,
) -> Tensor:
    r"""Per-sample SND :math:`\widehat\Delta_F(x_n)` of any normalization layer (Huang et al.,
    Eq. 9–10).

    With ``relative=True`` each value is divided by :math:`\sigma_{out}\sqrt D`: D is the number
    of output elements per sample and :math:`\sigma_{out}^2` the mean over channels of each
    channel's variance over every measured output (all samples, draws and positions), so the
    value is roughly the per-element disturbance as a fraction of the output's std — comparable
    between layers whose outputs have different scales (MixtureNorm's has std ≈ √K, Kalayeh &
    Shah, Eq. 34).

    Args:
        norm: a module (a copy is run in training mode; the caller's module and its buffers are
            untouched) or a registry spec such as ``"bn"`` or
            ``"iternorm(group_size=64, iters=5)"`` (built for ``data.shape[1]`` channels).
        data: the pool of examples :math:`P_\chi`, ``(M, C)`` or ``(M, C, *)``.
        batch_size: B (1 <= B <= M); each mini-batch is x plus B − 1 other pool examples.
        num_samples: N, number of examples x (drawn without replacement from the pool) when
            ``sample_indices`` is not given.
        num_draws: s, mini-batches per example.
        sample_indices: indices into ``data`` of the examples x (overrides ``num_samples``).
        generator: CPU ``torch.Generator`` for every random choice (reproducible draws); the
            layer's own random draws are then seeded from its initial seed.
        warmup: training-mode passes over random mini-batches of B examples before measuring,
            so that a layer whose training output depends on its state (running statistics of
            ``brn``, warm seeds of ``mixture(init="warm")``, estimates of micro-batch ``bcn``)
            is measured in a settled state. The state keeps evolving over the draws.
        relative: divide by :math:`\sigma_{out}\sqrt D` (see above).

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
        >>> snd("gn(num_groups=4)", pool, 4, num_samples=8, generator=gen).max()  # no batch
        tensor(0.)
    """
    _check_pool(data, batch_size, "snd")
    s = _check_count(num_draws, "num_draws", "snd")
    warm = _check_count(warmup, "warmup", "snd", minimum=0)
    _check_generator(generator, "snd")
    if not isinstance(relative, bool):
        raise TypeError(f"snd: relative must be True or False, got {relative!r}")
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
    layer = _layer(norm, data, "snd")
    result, measured = [], []
    with _layer_rng(generator, data.device):
        for _ in range(warm):
            layer(data[torch.randperm(m, generator=generator)[:batch_size].to(data.device)])
        for i in idx.tolist():
            outs = []
            for _ in range(s):
                others = torch.randperm(m - 1, generator=generator)[: batch_size - 1]
                others = others + (others >= i).long()  # skip x itself
                rows = torch.cat([torch.tensor([i]), others]).to(data.device)
                outs.append(layer(data[rows])[0])
            stacked = torch.stack(outs)
            result.append(snd_from_outputs(stacked))
            if relative:
                measured.append(stacked)
    values = torch.stack(result)
    if not relative:
        return values
    every = torch.cat(measured)
    return _relative(values, _channel_std(every), every[0].numel())


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
    _check_generator(generator, "normalized_condition_number")
    layer = _layer(norm, data, "normalized_condition_number")
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
    many = len(curves) > 6  # the legend goes beside the axes
    fig, axes = new_figure(size=(6.6 if many else 4.4, 3.4 if many else 3.2))
    ax = axes[0, 0]
    for i, (label, (xs, ys)) in enumerate(curves.items()):
        style = ("-", "--", ":")[i // 10 % 3]  # the colour cycle has 10 colours
        ax.plot(list(xs), [float(y) for y in ys], marker="o", ms=3, ls=style, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if many:
        fig.legend(loc="outside right center", fontsize="small")
    else:
        ax.legend(fontsize="small")
    return save_figure(fig, path)
