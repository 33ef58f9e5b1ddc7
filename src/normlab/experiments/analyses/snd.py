"""``snd_conditioning``: SND and output conditioning of a normalization (Huang et al., Sec. 4).

For each *sweep* (over the feature dimension d or the batch size B) and each of its points, a
pool of ``pool`` examples is drawn from a d-dimensional Gaussian (:func:`gaussian_pool`) and the
variant's normalization ``norm`` (a registry spec in which ``{dim}`` and ``{batch_size}`` are
filled in, e.g. ``"dbn(group_size={dim})"`` for full whitening) is measured:

* the SND (Huang et al., Eq. 9–10) with :func:`normlab.analysis.snd`: ``num_samples`` examples x,
  each normalized in ``num_draws`` random mini-batches of size B;
* the condition number of the covariance of the normalized output over a mini-batch, averaged
  over ``num_batches`` mini-batches (Huang et al., Fig. 4a,
  :func:`normlab.analysis.normalized_condition_number`).

``data = "gaussian"`` is N(0, I); ``"correlated"`` is x = z A with a seeded A ~ N(0, 1/d). The
result holds, per sweep, the x values and the mean and std of each metric.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from normlab.analysis.disturbance import normalized_condition_number, snd
from normlab.experiments.analyses.registry import positive_int, register_analysis
from normlab.experiments.spec import ExperimentError, Variant
from normlab.nn.registry import make_norm

__all__ = ["SNDConditioning", "gaussian_pool"]


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
        f"snd_conditioning: data must be 'gaussian' or 'correlated', got {kind!r}"
    )


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
        gaussian_pool(1, 1, 0, params.get("data", "gaussian"))
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
            bad = set(s.get("metrics", ["snd"])) - {"snd", "cond"}
            if bad:
                raise ExperimentError(
                    f"{where}: sweep metrics must be 'snd' or 'cond', got {sorted(bad)}"
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
                    cache[dim] = gaussian_pool(pool_n, dim, seed, kind)
                data = cache[dim]
                spec = _spec(params["norm"], dim, b)
                gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + dim * 4099 + b)
                rec["x"].append(x)
                rec["dim"].append(dim)
                rec["batch_size"].append(b)
                t = time.perf_counter()
                if "snd" in metrics:
                    v = snd(spec, data, b, num_samples=n_s, num_draws=n_d, generator=gen).double()
                    rec["snd"].append(float(v.mean()))
                    rec["snd_std"].append(float(v.std()) if v.numel() > 1 else 0.0)
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
