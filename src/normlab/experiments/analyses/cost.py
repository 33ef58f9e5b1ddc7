"""``cost``: iterations per second of a network with one normalization replaced (Kalayeh & Shah,
Sec. 5.1, Table 7).

The network ``model`` (built with ``baseline_norm``, default ``bn``) and its copy with ``norm``
at the modules ``include`` matches are timed alternately in the same process, one forward,
backward and SGD step each on a fixed random batch, after ``warmup`` untimed pairs. The result is
the median time per iteration of each network (``it_per_s``, ``baseline_it_per_s``) and the median
of the per-pair ratios baseline time / network time (``ratio``), which cancels the drift of a
noisy machine pair by pair.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from normlab.convert import convert
from normlab.experiments.analyses.registry import check_params, register_analysis
from normlab.experiments.spec import Variant
from normlab.models import available_models, create
from normlab.train import select_device

__all__ = ["Cost"]


def _as_list(v: Any) -> list[str]:
    if v is None:
        return []
    return [v] if isinstance(v, str) else list(v)


@register_analysis(
    "cost", "Kalayeh & Shah, Table 7: iterations/s of a network with one norm replaced, vs BN"
)
class Cost:
    """The ``cost`` runner (see the module docstring)."""

    @staticmethod
    def validate(params: dict[str, Any], variant: Variant) -> None:
        check_params(
            params,
            f"cost variant {variant.name!r}",
            names={"model": ("model", available_models())},
            positive=("batch_size", "iters", "image_size", "num_classes"),
            norms=("norm", "baseline_norm"),
        )

    @staticmethod
    def run(
        params: dict[str, Any], seed: int, out_dir: Path, log: Callable[[str], None]
    ) -> dict[str, Any]:
        dev = select_device(params.get("device", "auto"))
        torch.manual_seed(seed)
        kw = dict(params.get("model_kwargs", {}))
        n_cls = int(params.get("num_classes", 100))
        size = int(params.get("image_size", 32))
        bs = int(params["batch_size"])
        baseline = params.get("baseline_norm", "bn")

        def build(norm: str) -> torch.nn.Module:
            m = create(params["model"], num_classes=n_cls, in_channels=3, norm=baseline, **kw)
            if norm != baseline:
                convert(m, norm, include=params.get("include", "*"))
            return m.to(dev).train()

        base, model = build(baseline), build(params["norm"])
        dims = [
            mod.num_features
            for n, mod in model.named_modules()
            if hasattr(mod, "num_features") and n in _as_list(params.get("include"))
        ]
        x = torch.randn(bs, 3, size, size, device=dev)
        y = torch.randint(0, n_cls, (bs,), device=dev)
        opts = {id(m): torch.optim.SGD(m.parameters(), lr=1e-3) for m in (base, model)}

        def step(m: torch.nn.Module) -> float:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            opt = opts[id(m)]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return time.perf_counter() - t

        for _ in range(int(params.get("warmup", 2))):
            step(base)
            step(model)
        tb, tm = [], []
        for _ in range(int(params.get("iters", 20))):
            tb.append(step(base))
            tm.append(step(model))
        ratios = [b / m for b, m in zip(tb, tm, strict=True)]
        res = {
            "device": str(dev),
            "dims": dims,
            "baseline_it_per_s": 1.0 / statistics.median(tb),
            "it_per_s": 1.0 / statistics.median(tm),
            "ratio": statistics.median(ratios),
        }
        log(
            f"  {params['norm']}: {res['it_per_s']:.3g} it/s vs "
            f"{res['baseline_it_per_s']:.3g} (ratio {res['ratio']:.3f})"
        )
        return res
