"""``snd_conditioning``: SND and output conditioning of a normalization (Huang et al., Sec. 4).

For each *sweep* (over the feature dimension d or the batch size B) and each of its points, a
pool of ``pool`` examples with d channels is built (:func:`activation_pool`) and the variant's
normalization ``norm`` (a registry spec in which ``{dim}`` and ``{batch_size}`` are filled in,
e.g. ``"dbn(group_size={dim})"`` for full whitening) is measured with the sweep's ``metrics``:

* ``snd`` — the SND (Huang et al., Eq. 9–10) with :func:`normlab.analysis.snd`: ``num_samples``
  examples x, each normalized in ``num_draws`` random mini-batches of size B, after ``warmup``
  training-mode passes (for layers with state: ``brn``, ``mixture(init="warm")``, micro-batch
  ``bcn``);
* ``rel_snd`` — the same draws with ``relative=True``: SND / (σ_out·√D), comparable between
  layers whose outputs have different scales;
* ``cond`` — the condition number of the covariance of the normalized output over a
  mini-batch, averaged over ``num_batches`` mini-batches (Huang et al., Fig. 4a,
  :func:`normlab.analysis.normalized_condition_number`).

``data = "gaussian"`` is N(0, I); ``"correlated"`` is x = z A with a seeded A ~ N(0, 1/d);
``"digits_conv"`` are real activations: scikit-learn's 8×8 digits (training split) through a
seeded random 3×3 convolution to d channels, ReLU and a second d → d convolution (He
initialization), the second's output being what a normalization layer after it sees,
``(pool, d, 8, 8)``. A sweep's ``layout`` (``"x"`` or ``"variants"``) only chooses the report's
table rows. The result holds, per sweep, the x values and the mean and std of each metric.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from normlab.analysis.disturbance import normalized_condition_number, snd
from normlab.data import load_dataset
from normlab.experiments.analyses.registry import positive_int, register_analysis
from normlab.experiments.spec import ExperimentError, Variant
from normlab.nn.registry import make_norm

__all__ = ["DATA_KINDS", "METRICS", "SNDConditioning", "activation_pool", "gaussian_pool"]

#: the pools :func:`activation_pool` builds
DATA_KINDS = ("gaussian", "correlated", "digits_conv")
#: the metrics a sweep may measure
METRICS = ("snd", "rel_snd", "cond")


def gaussian_pool(n: int, dim: int, seed: int, kind: str = "gaussian") -> torch.Tensor:
    """``(n, dim)`` float32 examples: N(0, I) (``"gaussian"``) or z A with A ~ N(0, 1/dim)
    (``"correlated"``), from a seeded CPU generator.

    Example::

        >>> gaussian_pool(4, 3, seed=0).shape
        torch.Size([4, 3])
    """
    g = torch.Generator().manual_seed(int(seed) * 7919 + int(dim))
    z = torch.randn(n, dim, generator=g)
    if kind == "gaussian":
        return z
    if kind == "correlated":
        a = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
        return z @ a
    raise ExperimentError(
        f"snd_conditioning: data must be one of {', '.join(DATA_KINDS)}, got {kind!r}"
    )


def _digits_images() -> torch.Tensor:
    return load_dataset("digits").train_x


def activation_pool(n: int, dim: int, seed: int, kind: str = "gaussian") -> torch.Tensor:
    """A pool of ``n`` examples with ``dim`` channels: :func:`gaussian_pool` for ``"gaussian"``
    and ``"correlated"``, ``(n, dim, 8, 8)`` convolution activations of the digits for
    ``"digits_conv"`` (see the module docstring; n is at most the 1437 training images).

    Example::

        >>> activation_pool(100, 4, seed=0, kind="digits_conv").shape
        torch.Size([100, 4, 8, 8])
    """
    if kind != "digits_conv":
        return gaussian_pool(n, dim, seed, kind)
    images = _digits_images()
    if n > images.shape[0]:
        raise ExperimentError(
            f"snd_conditioning: pool must be <= {images.shape[0]} (the digits' training "
            f"images) for data 'digits_conv', got {n}"
        )
    g = torch.Generator().manual_seed(int(seed) * 7919 + int(dim))
    w1 = torch.randn(dim, images.shape[1], 3, 3, generator=g) * math.sqrt(
        2.0 / (9 * images.shape[1])
    )
    w2 = torch.randn(dim, dim, 3, 3, generator=g) * math.sqrt(2.0 / (9 * dim))
    rows = torch.randperm(images.shape[0], generator=g)[:n]
    with torch.no_grad():
        return F.conv2d(F.relu(F.conv2d(images[rows], w1, padding=1)), w2, padding=1)


def _spec(norm: str, dim: int, batch: int) -> str:
    try:
        return norm.format(dim=dim, batch_size=batch)
    except (KeyError, IndexError, ValueError) as e:
        raise ExperimentError(
            f"snd_conditioning: norm {norm!r} may only use the fields {{dim}} and {{batch_size}} ({e})"
        ) from None


def _points(sweep: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """``(x, dim, batch)`` of every point of a sweep."""
    x = sweep["x"]
    out = []
    for val in sweep["values"]:
        dim = val if x == "dim" else sweep["dim"]
        b = val if x == "batch_size" else sweep["batch_size"]
        out.append((val, dim, b))
    return out


def _variant_sweeps(params: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    """The sweeps that include variant ``name`` (a sweep without ``variants`` includes all)."""
    return [dict(s) for s in params.get("sweeps", []) if name in s.get("variants", [name])]


@register_analysis(
    "snd_conditioning", "Huang et al., Fig. 4-5: SND and output conditioning of a norm"
)
class SNDConditioning:
    """The ``snd_conditioning`` runner (see the module docstring)."""

    @staticmethod
    def validate(params: dict[str, Any], variant: Variant) -> None:
        where = f"snd_conditioning variant {variant.name!r}"
        norm = params.get("norm")
        if not isinstance(norm, str) or not norm:
            raise ExperimentError(f"{where}: params.norm must be a norm spec string")
        pool = positive_int(params.get("pool", 60000), "pool", where)
        for key in ("num_samples", "num_draws", "num_batches"):
            positive_int(params.get(key, 10), key, where)
        warmup = params.get("warmup", 0)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ExperimentError(f"{where}: warmup must be a non-negative integer, got {warmup!r}")
        kind = params.get("data", "gaussian")
        if kind not in DATA_KINDS:
            gaussian_pool(1, 1, 0, kind)  # raises, naming the kinds
        if kind == "digits_conv" and pool > _digits_images().shape[0]:
            activation_pool(pool, 1, 0, kind)  # raises, naming the limit
        sweeps = params.get("sweeps")
        if not isinstance(sweeps, list) or not sweeps:
            raise ExperimentError(f"{where}: [[analysis.sweeps]] must list at least one sweep")
        for s in sweeps:
            if s.get("x") not in ("dim", "batch_size"):
                raise ExperimentError(
                    f"{where}: sweep.x must be 'dim' or 'batch_size', got {s.get('x')!r}"
                )
            other = "batch_size" if s["x"] == "dim" else "dim"
            positive_int(s.get(other), f"sweep {s.get('name')!r}.{other}", where)
            vals = s.get("values")
            if not isinstance(vals, list) or not vals:
                raise ExperimentError(f"{where}: sweep {s.get('name')!r} needs a list of values")
            for v in vals:
                positive_int(v, "sweep value", where)
            bad = set(s.get("metrics", ["snd"])) - set(METRICS)
            if bad:
                raise ExperimentError(
                    f"{where}: sweep metrics must be among {', '.join(METRICS)}, got {sorted(bad)}"
                )
            if s.get("layout", "x") not in ("x", "variants"):
                raise ExperimentError(
                    f"{where}: sweep.layout must be 'x' or 'variants', got {s.get('layout')!r}"
                )
            if not isinstance(s.get("name"), str):
                raise ExperimentError(f"{where}: every sweep needs a name")
        for s in _variant_sweeps(params, variant.name):
            for _, dim, b in _points(s):
                if b > pool:
                    raise ExperimentError(f"{where}: batch size {b} exceeds the pool ({pool})")
                try:
                    make_norm(_spec(norm, dim, b), dim)
                except (ValueError, TypeError) as e:
                    raise ExperimentError(f"{where}: {e}") from None

    @staticmethod
    def run(
        params: dict[str, Any], seed: int, out_dir: Path, log: Callable[[str], None]
    ) -> dict[str, Any]:
        pool_n = int(params.get("pool", 60000))
        kind = params.get("data", "gaussian")
        n_s, n_d, n_b = (
            int(params.get(k, 10)) for k in ("num_samples", "num_draws", "num_batches")
        )
        warmup = int(params.get("warmup", 0))
        result: dict[str, Any] = {"sweeps": {}}
        cache: dict[int, torch.Tensor] = {}
        for s in _variant_sweeps(params, params.get("variant", "")):
            metrics = s.get("metrics", ["snd"])
            rec: dict[str, list[Any]] = {"x": [], "dim": [], "batch_size": []}
            for m in metrics:
                rec[m] = []
                rec[f"{m}_std"] = []
            for x, dim, b in _points(s):
                if dim not in cache:
                    cache.clear()
                    cache[dim] = activation_pool(pool_n, dim, seed, kind)
                data = cache[dim]
                spec = _spec(params["norm"], dim, b)
                point_seed = int(seed) * 1_000_003 + dim * 4099 + b
                gen = torch.Generator().manual_seed(point_seed)
                rec["x"].append(x)
                rec["dim"].append(dim)
                rec["batch_size"].append(b)
                t = time.perf_counter()
                for m, relative in (("snd", False), ("rel_snd", True)):
                    if m not in metrics:
                        continue
                    # rel_snd: the same draws as snd (a generator of the same seed)
                    g = gen if m == "snd" else torch.Generator().manual_seed(point_seed)
                    v = snd(
                        spec, data, b, num_samples=n_s, num_draws=n_d, generator=g,
                        warmup=warmup, relative=relative,
                    ).double()  # fmt: skip
                    rec[m].append(float(v.mean()))
                    rec[f"{m}_std"].append(float(v.std()) if v.numel() > 1 else 0.0)
                if "cond" in metrics:
                    c = normalized_condition_number(spec, data, b, num_batches=n_b, generator=gen)
                    finite = bool(torch.isfinite(c).all())
                    rec["cond"].append(float(c.mean()) if finite else math.inf)
                    rec["cond_std"].append(float(c.std()) if finite and c.numel() > 1 else 0.0)
                log(
                    f"  {s['name']} {s['x']}={x} {spec}: "
                    + ", ".join(f"{m} {rec[m][-1]:.4g}" for m in metrics)
                    + f" ({time.perf_counter() - t:.1f} s)"
                )
            result["sweeps"][s["name"]] = rec
        return result
