"""Inference folding: normalization layers with an affine eval transform merged into their conv.

In eval mode batch normalization, ``fixedstats``, IterNorm and DBN (running whitening matrix) and
the batch part of BCN are affine maps over channels, ``y = A x + c``, applied at every position.
Following a convolution or linear layer ``z = W * x + b``, the pair is one convolution with weight
``A W`` and bias ``A b + c``::

    model.eval()
    result = normlab.fold(model)
    result.model        # a new model: fewer layers, the same outputs (to float rounding)
    result.folded       # {"layer1.0.norm1": "bn into layer1.0.conv1", ...}
    result.skipped      # {"layer3.0.norm2": "mode: its eval output depends on the input", ...}

Weight-standardized (and weight-normalized) convolutions become plain convolutions holding their
effective weight. ``A`` and ``c`` are read from the layer itself, by applying it in float64 to
spatially constant inputs (the zero image and the channel basis), and then checked on a random
input: a layer whose eval output is not a per-position affine map of its input (mode, mgn,
mixture, gn, ln, in, …) fails that check and is reported, never folded. The model is traced with
``torch.fx`` to find each norm's producer; a norm whose input does not come from exactly one
convolution or linear layer (or whose convolution feeds something else too) is reported.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.fx
from torch import Tensor, nn

from normlab.nn.batch_channel import BCNorm
from normlab.nn.registry import norm_classes

__all__ = ["FoldResult", "fold"]

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_TORCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)
_TORCH_NORMS += (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class FoldResult(NamedTuple):
    """What :func:`fold` made: the new ``model``, the norms ``folded`` (name -> into what) and the
    norms ``skipped`` (name -> why)."""

    model: nn.Module
    folded: dict[str, str]
    skipped: dict[str, str]


class _Tracer(torch.fx.Tracer):
    """Norms and convolutions are leaves: fx records the call, not their insides."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (*_PRODUCERS, *_TORCH_NORMS, *norm_classes())):
            return True
        return super().is_leaf_module(m, qualname)


def _effective_weight(conv: nn.Module) -> Tensor:
    """The weight a convolution really applies (standardized for WS, g·v/‖v‖ for WN, …)."""
    if hasattr(conv, "standardized_weight"):
        return conv.standardized_weight()
    return conv.weight


def _plain_copy(conv: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A torch ``nn.Conv*d``/``nn.Linear`` with the same geometry holding ``weight``/``bias``."""
    if isinstance(conv, nn.Linear):
        new: nn.Module = nn.Linear(conv.in_features, conv.out_features, bias=bias is not None)
    else:
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(conv.kernel_size)]
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=bias is not None,
            padding_mode=conv.padding_mode,
        )
    new = new.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(conv.training)
    return new


def _affine_map(norm: nn.Module, channels: int, spatial: int) -> tuple[Tensor, Tensor] | None:
    """``(A, c)`` with ``norm(x) = A x + c`` at every position in eval mode, or ``None`` when the
    layer is not such a map (checked on a random input)."""
    probe = copy.deepcopy(norm).double().eval()
    space = (3,) * spatial
    basis = torch.cat([torch.zeros(1, channels), torch.eye(channels)]).double()  # (C + 1, C)
    with torch.no_grad():
        out = probe(basis.view(channels + 1, channels, *(1,) * spatial).expand(-1, -1, *space))
        out = out.reshape(channels + 1, channels, -1)
        if not torch.allclose(out, out[..., :1].expand_as(out), rtol=0, atol=1e-9):
            return None  # not the same map at every position
        c = out[0, :, 0]
        A = (out[1:, :, 0] - c).T  # column j is the image of e_j
        x = torch.randn(5, channels, *space, dtype=torch.float64, generator=_gen())
        y = probe(x)
        pred = torch.einsum("oc,nc...->no...", A, x) + c.view(1, -1, *(1,) * spatial)
    scale = max(1.0, y.abs().max().item())
    if not torch.allclose(y, pred, rtol=0, atol=1e-7 * scale):
        return None
    return A, c


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _group_part(bcn: BCNorm) -> nn.GroupNorm:
    """BCN's channel part (Qiao et al., Eq. 42) as a torch GroupNorm: its per-group affine
    repeated over each group's channels."""
    C, G = bcn.num_features, bcn.num_groups
    gn = nn.GroupNorm(G, C, eps=bcn.eps).to(bcn.weight)
    with torch.no_grad():
        gn.weight.copy_(bcn.group_weight.repeat_interleave(C // G))
        gn.bias.copy_(bcn.group_bias.repeat_interleave(C // G))
    return gn.eval()


def _bcn_batch_part(bcn: BCNorm) -> tuple[Tensor, Tensor]:
    """BCN's batch part in eval (Qiao et al., Eq. 40 with running statistics) as ``(A, c)``."""
    s = bcn.weight.double() / torch.sqrt(bcn.running_var.double() + bcn.eps)
    return torch.diag(s), bcn.bias.double() - bcn.running_mean.double() * s


def _set(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent.add_module(leaf, new)
    return model


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (*_TORCH_NORMS, *norm_classes()))


def fold(model: nn.Module) -> FoldResult:
    """Fold the eval-affine normalization layers of ``model`` into their preceding conv/linear.

    Args:
        model: a model in eval mode (``model.eval()``); it is not modified.

    Returns:
        :class:`FoldResult` ``(model, folded, skipped)``: a new model whose outputs equal the eval
        model's (to float rounding), and what was folded or skipped, by qualified name, with the
        reason for each skip.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), normlab.BatchNorm(8)).eval()
        >>> res = normlab.fold(net)
        >>> sorted(res.folded), type(res.model[1]).__name__
        (['1'], 'Identity')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: model must be an nn.Module, got {type(model).__name__}")
    if any(m.training for m in model.modules()):
        raise ValueError("fold: call model.eval() first; folding uses the eval transform")
    model = copy.deepcopy(model)
    folded: dict[str, str] = {}
    skipped: dict[str, str] = {}
    modules = dict(model.named_modules())
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx cannot trace data-dependent Python control flow
        graph = None
        trace_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    producer: dict[str, str | None] = {}
    if graph is not None:
        users: dict[str, int] = {}
        for node in graph.nodes:
            for arg in node.all_input_nodes:
                users[arg.name] = users.get(arg.name, 0) + 1
        for node in graph.nodes:
            if node.op != "call_module" or not _is_norm(modules[node.target]):
                continue
            src = node.args[0] if node.args else None
            ok = (
                isinstance(src, torch.fx.Node)
                and src.op == "call_module"
                and isinstance(modules[src.target], _PRODUCERS)
                and users.get(src.name, 0) == 1
                and len(node.all_input_nodes) == 1
            )
            producer[node.target] = src.target if ok else None
    convs_done: set[str] = set()
    for name, norm in list(modules.items()):
        if not _is_norm(norm):
            continue
        kind = type(norm).__name__
        if graph is None:
            skipped[name] = f"{kind}: the model cannot be traced by torch.fx ({trace_error})"
            continue
        if name not in producer:
            skipped[name] = f"{kind}: not called in the model's forward"
            continue
        conv_name = producer[name]
        if conv_name is None:
            skipped[name] = f"{kind}: its input is not the output of a single conv or linear layer"
            continue
        conv = modules[conv_name]
        spatial = 0 if isinstance(conv, nn.Linear) else len(conv.kernel_size)
        replacement: nn.Module = nn.Identity()
        if isinstance(norm, BCNorm):
            A, c = _bcn_batch_part(norm)
            replacement = _group_part(norm)
            what = "the batch part of BCN (the channel part stays, as a GroupNorm)"
        else:
            found = _affine_map(norm, _channels(norm, conv), spatial)
            if found is None:
                skipped[name] = f"{kind}: its eval output depends on the input (not an affine map)"
                continue
            A, c = found
            what = kind
        if getattr(conv, "groups", 1) > 1 and not torch.equal(A, torch.diag(torch.diagonal(A))):
            skipped[name] = f"{kind}: mixes channels across the groups of a grouped convolution"
            continue
        W = _effective_weight(conv).detach().double()
        b = conv.bias.detach().double() if conv.bias is not None else W.new_zeros(W.shape[0])
        A, c = A.to(W), c.to(W)
        W2 = torch.einsum("oc,c...->o...", A, W)
        b2 = A @ b + c
        dtype = conv.weight.dtype if hasattr(conv, "weight") else W2.dtype
        model = _set(model, conv_name, _plain_copy(conv, W2.to(dtype), b2.to(dtype)))
        model = _set(model, name, replacement)
        convs_done.add(conv_name)
        folded[name] = f"{what} into {conv_name or 'the model'}"
    for name, conv in dict(model.named_modules()).items():  # WS/WN convs left on their own
        if name in convs_done or not isinstance(conv, _PRODUCERS):
            continue
        if type(conv) in _PRODUCERS and not hasattr(conv, "parametrizations"):
            continue
        W = _effective_weight(conv).detach()
        bias = conv.bias.detach() if conv.bias is not None else None
        model = _set(model, name, _plain_copy(conv, W, bias))
    return FoldResult(model, folded, skipped)


def _channels(norm: nn.Module, conv: nn.Module) -> int:
    for attr in ("num_features", "num_channels", "normalized_shape"):
        value = getattr(norm, attr, None)
        if isinstance(value, int):
            return value
    return conv.out_channels if hasattr(conv, "out_channels") else conv.out_features
