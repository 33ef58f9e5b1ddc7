"""Experiments that are not one classifier training run: their runners and report sections.

Each runner is registered with :func:`normlab.experiments.register_analysis` and has

* ``validate(params, variant)`` — raise :class:`~normlab.experiments.ExperimentError` for bad
  parameters (called when an experiment file is validated);
* ``run(params, seed, out_dir, log) -> dict`` — the JSON-able result the suite writes to
  ``<variant>/seed<k>/result.json`` (``out_dir`` may also receive files);

and a report function in :data:`REPORTS` ``(data, out_dir, results) -> (markdown lines, claim rows,
figure paths)``.

Runners:

``snd_conditioning`` (Huang et al., Sec. 4, Fig. 4–5)
    For each *sweep* (over the feature dimension d or the batch size B) and each point, draws a
    pool of ``pool`` examples from a d-dimensional Gaussian and measures, for the variant's
    normalization (``norm``, a registry spec in which ``{dim}`` and ``{batch_size}`` are
    substituted, e.g. ``"dbn(group_size={dim})"`` for full whitening),

    * the SND (Huang et al., Eq. 9–10) with :func:`normlab.analysis.snd`: ``num_samples`` examples x, each
      normalized in ``num_draws`` random mini-batches of size B;
    * the condition number of the covariance of the normalized output over a mini-batch,
      averaged over ``num_batches`` mini-batches (Huang et al., Fig. 4a:
      :func:`normlab.analysis.normalized_condition_number`).

    ``data = "gaussian"`` is the standard normal N(0, I) ("we sample 60,000 examples from Gaussian
    distribution"; the paper gives no covariance — with N(0, I) the population is perfectly
    conditioned, so every condition number above 1 is the finite-batch effect the figure is
    about); ``data = "correlated"`` uses x = z A with a seeded Gaussian A/√d instead.

``cost`` (Kalayeh & Shah, Sec. 5.1, Table 7)
    Iterations per second of a whole network (forward, backward, SGD step) with one normalization
    layer replaced, against the same network with batch normalization, timed alternately in the
    same process (the median of the per-pair ratios, as DESIGN.md asks for noisy machines).

``gan`` (Kalayeh & Shah, Sec. 4.5, Fig. 6)
    Trains the DCGAN generator/discriminator pair with Adam and the non-saturating GAN loss,
    logging both losses and — **only if the user supplies an Inception network** (``fid_features``:
    a TorchScript file, or ``"module:function"`` returning a callable that maps images in [−1, 1]
    of shape (N, 3, H, W) to (N, F) features, e.g. the 2048-d pool features of the Inception
    network of Heusel et al.) — the Fréchet Inception Distance every ``eval_every`` updates. normlab
    ships no Inception weights and downloads none; without them FID is reported as not computed.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from normlab.experiments import ExperimentError, Variant, register_analysis
from normlab.report.metrics import SuiteData, format_value
from normlab.report.report import markdown_table

__all__ = ["REPORTS", "frechet_distance", "gaussian_pool", "load_feature_fn"]

REPORTS: dict[str, Callable[..., tuple[list[str], list[dict[str, Any]], list[Path]]]] = {}


def _pos_int(v: Any, key: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ExperimentError(f"{where}: {key} must be a positive integer, got {v!r}")
    return v


def _check_specs(params: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    """Every ``params[key]`` present must parse as a norm spec."""
    from normlab.nn.registry import parse_spec

    for key in keys:
        if key in params:
            try:
                parse_spec(params[key])
            except (ValueError, TypeError) as e:
                raise ExperimentError(f"{where}: params.{key}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Huang et al., Fig. 4-5: SND and conditioning


def gaussian_pool(n: int, dim: int, seed: int, kind: str = "gaussian") -> torch.Tensor:
    """``(n, dim)`` float32 examples: N(0, I) (``"gaussian"``) or z A with A ~ N(0, 1/dim)
    (``"correlated"``), from a seeded CPU generator."""
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
    sweeps = params.get("sweeps", [])
    chosen = []
    for s in sweeps:
        vs = s.get("variants")
        if vs is None or name in vs:
            chosen.append(dict(s))
    return chosen


@register_analysis(
    "snd_conditioning", "Huang et al., Fig. 4-5: SND and output conditioning of a norm"
)
class SNDConditioning:
    @staticmethod
    def validate(params: dict[str, Any], variant: Variant) -> None:
        where = f"snd_conditioning variant {variant.name!r}"
        norm = params.get("norm")
        if not isinstance(norm, str) or not norm:
            raise ExperimentError(f"{where}: params.norm must be a norm spec string")
        pool = _pos_int(params.get("pool", 60000), "pool", where)
        for key in ("num_samples", "num_draws", "num_batches"):
            _pos_int(params.get(key, 10), key, where)
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
            _pos_int(s.get(other), f"sweep {s.get('name')!r}.{other}", where)
            vals = s.get("values")
            if not isinstance(vals, list) or not vals:
                raise ExperimentError(f"{where}: sweep {s.get('name')!r} needs a list of values")
            for v in vals:
                _pos_int(v, "sweep value", where)
            bad = set(s.get("metrics", ["snd"])) - {"snd", "cond"}
            if bad:
                raise ExperimentError(
                    f"{where}: sweep metrics must be 'snd' or 'cond', got {sorted(bad)}"
                )
            if not isinstance(s.get("name"), str):
                raise ExperimentError(f"{where}: every sweep needs a name")
        from normlab.nn.registry import make_norm

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
        from normlab.analysis.disturbance import normalized_condition_number, snd

        pool_n = int(params.get("pool", 60000))
        kind = params.get("data", "gaussian")
        n_s, n_d, n_b = (
            int(params.get(k, 10)) for k in ("num_samples", "num_draws", "num_batches")
        )
        name = params.get("variant", "")
        result: dict[str, Any] = {"sweeps": {}}
        cache: dict[int, torch.Tensor] = {}
        for s in params["sweeps"]:
            if s.get("variants") is not None and name not in s["variants"]:
                continue
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
                    fin = c[torch.isfinite(c)]
                    rec["cond"].append(float(c.mean()) if fin.numel() == c.numel() else math.inf)
                    rec["cond_std"].append(
                        float(c.std()) if fin.numel() == c.numel() and c.numel() > 1 else 0.0
                    )
                log(
                    f"  {s['name']} {s['x']}={x} {spec}: "
                    + ", ".join(f"{m} {rec[m][-1]:.4g}" for m in metrics)
                    + f" ({time.perf_counter() - t:.1f} s)"
                )
            result["sweeps"][s["name"]] = rec
        return result


def _snd_tables(data: SuiteData) -> dict[str, dict[str, dict[str, Any]]]:
    """sweep -> variant label -> {x, snd, cond (means over seeds)}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for v in data.variants:
        per_seed = [r.result.get("sweeps", {}) for r in data.runs[v.name] if r.result]
        if not per_seed:
            continue
        for sname in per_seed[0]:
            recs = [p[sname] for p in per_seed if sname in p]
            agg: dict[str, Any] = {"x": recs[0]["x"]}
            for m in ("snd", "cond"):
                if m in recs[0]:
                    cols = list(zip(*(r[m] for r in recs), strict=True))
                    agg[m] = [
                        statistics.fmean(c) if all(math.isfinite(a) for a in c) else math.inf
                        for c in cols
                    ]
                    agg[f"{m}_std"] = [
                        statistics.stdev(c)
                        if len(c) > 1 and all(math.isfinite(a) for a in c)
                        else recs[0][f"{m}_std"][i]
                        for i, c in enumerate(cols)
                    ]
            out.setdefault(sname, {})[v.label] = agg
    return out


def _snd_report(
    data: SuiteData, out_dir: Path, results: dict[str, Any]
) -> tuple[list[str], list[dict[str, Any]], list[Path]]:
    from normlab.analysis.disturbance import plot_snd
    from normlab.report.metrics import evaluate_claims

    exp = data.experiment
    tables = _snd_tables(data)
    sweeps: dict[str, Any] = {}
    for v in data.variants:  # the sweeps as run (params.json), else as the file says now
        p = data.runs[v.name][0].path / "params.json"
        if p.is_file():
            params = json.loads(p.read_text(encoding="utf-8"))
        else:
            params = exp.analysis_params(v, data.suite.get("scale", "full"))
        for sw in params.get("sweeps", []):
            sweeps.setdefault(sw["name"], sw)
    lines: list[str] = []
    paths: list[Path] = []
    results["sweeps"] = tables
    n_seeds = data.suite.get("seeds")
    lines += [
        f"Mean ± std (SND: over the sampled examples{'' if n_seeds == 1 else ' and seeds'}; "
        "condition number: over the mini-batches). The paper gives these as figures only — its "
        "numbers cannot be read from the text; the claims below are the paper's statements.",
        "",
    ]
    for sname, by_label in tables.items():
        s = sweeps.get(sname, {"x": "x"})
        labels = list(by_label)
        metrics = [m for m in ("cond", "snd") if any(m in by_label[lab] for lab in labels)]
        xs = by_label[labels[0]]["x"]
        fixed = (
            f"batch size {s.get('batch_size')}"
            if s.get("x") == "dim"
            else f"dimension {s.get('dim')}"
        )
        lines += [f"### {s.get('title', sname)} ({s.get('x')} sweep, {fixed})", ""]
        if s.get("note"):
            lines += [str(s["note"]), ""]
        header = [s.get("x", "x")]
        for m in metrics:
            header += [
                f"{lab} {'condition number' if m == 'cond' else 'SND'}"
                for lab in labels
                if m in by_label[lab]
            ]
        rows = []
        for i, x in enumerate(xs):
            row = [x]
            for m in metrics:
                for lab in labels:
                    if m in by_label[lab]:
                        v = by_label[lab][m][i]
                        sd = by_label[lab][f"{m}_std"][i]
                        row.append(f"{v:.4g} ± {sd:.2g}" if math.isfinite(v) else "inf")
            rows.append(row)
        lines += [markdown_table(header, rows), ""]
        for m in metrics:
            curves = {
                lab: (by_label[lab]["x"], by_label[lab][m]) for lab in labels if m in by_label[lab]
            }
            fname = f"{sname}_{m}.png"
            paths.append(
                plot_snd(
                    curves,
                    out_dir / fname,
                    xlabel="dimension" if s.get("x") == "dim" else "batch size",
                    ylabel="condition number" if m == "cond" else "SND",
                    logx=True,
                    logy=(m == "cond"),
                )
            )

    def lookup(claim: dict[str, Any], side: Any) -> list[tuple[Any, float | None]]:
        sname = claim.get("sweep")
        if sname not in tables:
            raise ValueError(f"no sweep {sname!r} in the results")
        label = exp.variant(side).label
        if label not in tables[sname]:
            return []
        rec = tables[sname][label]
        vals = rec.get(claim["metric"])
        if vals is None:
            raise ValueError(f"sweep {sname!r} has no metric {claim['metric']!r}")
        at = claim.get("at")
        pts = list(zip(rec["x"], vals, strict=True))
        if at is None:
            return pts
        at = at if isinstance(at, list) else [at]
        return [p for p in pts if p[0] in at]

    rows = evaluate_claims(exp.claims, lookup, data.suite.get("scale", "full"))
    return lines, rows, paths


REPORTS["snd_conditioning"] = _snd_report


# ----------------------------------------------------------------------------------------------
# Kalayeh & Shah, Table 7: computation cost


@register_analysis(
    "cost", "Kalayeh & Shah, Table 7: iterations/s of a network with one norm replaced, vs BN"
)
class Cost:
    @staticmethod
    def validate(params: dict[str, Any], variant: Variant) -> None:
        where = f"cost variant {variant.name!r}"
        from normlab.models import available_models

        if params.get("model") not in available_models():
            raise ExperimentError(
                f"{where}: params.model must be a model name, got {params.get('model')!r}"
            )
        for key in ("batch_size", "iters", "image_size", "num_classes"):
            _pos_int(params.get(key, 1), key, where)
        _check_specs(params, ("norm", "baseline_norm"), where)

    @staticmethod
    def run(
        params: dict[str, Any], seed: int, out_dir: Path, log: Callable[[str], None]
    ) -> dict[str, Any]:
        import normlab
        from normlab.models import create
        from normlab.train.loop import select_device

        dev = select_device(params.get("device", "auto"))
        torch.manual_seed(seed)
        kw = dict(params.get("model_kwargs", {}))
        n_cls = int(params.get("num_classes", 100))
        size = int(params.get("image_size", 32))
        bs = int(params["batch_size"])

        def build(norm: str) -> torch.nn.Module:
            m = create(
                params["model"],
                num_classes=n_cls,
                in_channels=3,
                norm=params.get("baseline_norm", "bn"),
                **kw,
            )
            if norm != params.get("baseline_norm", "bn"):
                normlab.convert(m, norm, include=params.get("include", "*"))
            return m.to(dev).train()

        base, model = build(params.get("baseline_norm", "bn")), build(params["norm"])
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
            f"  {params['norm']}: {res['it_per_s']:.3g} it/s vs {res['baseline_it_per_s']:.3g} (ratio {res['ratio']:.3f})"
        )
        return res


def _as_list(v: Any) -> list[str]:
    if v is None:
        return []
    return [v] if isinstance(v, str) else list(v)


def _cost_report(
    data: SuiteData, out_dir: Path, results: dict[str, Any]
) -> tuple[list[str], list[dict[str, Any]], list[Path]]:
    from normlab.analysis._plot import new_figure, save_figure
    from normlab.report.metrics import aggregate, evaluate_claims, format_agg

    exp = data.experiment
    paper: dict[str, Any] = {}
    for t in exp.tables:
        paper.update({k: v[0] for k, v in (t.get("paper") or {}).items()})
    rows, res, xs, ys = [], {}, [], []
    for v in data.variants:
        rs = [r.result for r in data.runs[v.name] if r.result]
        ratio = aggregate([r["ratio"] for r in rs])
        its = aggregate([r["it_per_s"] for r in rs])
        pv = paper.get(v.name)
        base_name = next(
            (n for n in paper if n.startswith("BN") and n.split("-")[1:] == v.name.split("-")[1:]),
            None,
        )
        pratio = (
            pv / paper[base_name] if isinstance(pv, (int, float)) and base_name in paper else None
        )
        rows.append(
            [
                v.label,
                v.setting,
                format_agg(its),
                format_value(pv),
                format_agg(ratio),
                format_value(pratio),
            ]
        )
        res[v.name] = {
            "it_per_s": its.mean,
            "ratio": ratio.mean,
            "paper_it_per_s": pv,
            "paper_ratio": pratio,
        }
        xs.append(v.label)
        ys.append(ratio.mean or 0.0)
    results["cost"] = res
    lines = [
        "### Table 7: iterations per second (whole network), and throughput relative to BN",
        "",
        "Ours are CPU/GPU timings of this machine: only the ratio to BN (measured alternately in the same "
        "process) is comparable with the paper's Titan X numbers; the paper's ratio is its MN it/s divided by "
        "its BN it/s of the same batch size and dimension.",
        "",
        markdown_table(
            [
                "model",
                "setting",
                "it/s (ours)",
                "it/s (paper)",
                "ratio to BN (ours)",
                "ratio to BN (paper)",
            ],
            rows,
        ),
        "",
    ]
    fig, axes = new_figure(size=(max(4.0, 0.45 * len(xs) + 1.5), 3.2))
    ax = axes[0, 0]
    ax.bar(range(len(xs)), ys)
    ax.set_xticks(range(len(xs)), xs, rotation=60, fontsize=6)
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_ylabel("throughput / BN")
    path = save_figure(fig, out_dir / "cost_ratio.png")

    def lookup(claim: dict[str, Any], side: Any) -> list[tuple[Any, float | None]]:
        return [(None, res.get(side, {}).get(claim["metric"]))]

    return lines, evaluate_claims(exp.claims, lookup, data.suite.get("scale", "full")), [path]


REPORTS["cost"] = _cost_report


# ----------------------------------------------------------------------------------------------
# Kalayeh & Shah, Sec. 4.5: DCGAN


def load_feature_fn(spec: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The user's Inception feature extractor: a TorchScript file, or ``"module:function"``
    (the function is called with no arguments and must return a callable / module)."""
    p = Path(spec)
    if p.suffix in (".pt", ".pth", ".ts") and p.is_file():
        net = torch.jit.load(str(p), map_location=device).eval()
    elif ":" in spec:
        import importlib

        mod, _, fn = spec.partition(":")
        net = getattr(importlib.import_module(mod), fn)()
        if isinstance(net, torch.nn.Module):
            net = net.to(device).eval()
    else:
        raise ExperimentError(
            f"gan: fid_features {spec!r} is neither a TorchScript file nor 'module:function'"
        )

    @torch.no_grad()
    def features(x: torch.Tensor) -> torch.Tensor:
        return net(x).reshape(x.shape[0], -1).double()

    return features


def frechet_distance(
    mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor
) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}) (Heusel et al.; FID on Inception features)."""
    import numpy as np
    from scipy import linalg

    a, b = s1.cpu().numpy(), s2.cpu().numpy()
    covmean, _ = linalg.sqrtm(a @ b, disp=False)
    if not np.isfinite(covmean).all():
        off = np.eye(a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((a + off) @ (b + off))
    covmean = np.real(covmean)
    d = (mu1 - mu2).cpu().numpy()
    return float(d @ d + np.trace(a) + np.trace(b) - 2 * np.trace(covmean))


def _stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = f.mean(0)
    fc = f - mu
    return mu, fc.t() @ fc / max(f.shape[0] - 1, 1)


@register_analysis(
    "gan", "Kalayeh & Shah, Sec. 4.5: DCGAN with BN or MN in the generator; FID if supplied"
)
class GAN:
    @staticmethod
    def validate(params: dict[str, Any], variant: Variant) -> None:
        where = f"gan variant {variant.name!r}"
        from normlab.data import available_datasets

        if params.get("dataset") not in available_datasets():
            raise ExperimentError(
                f"{where}: params.dataset must be a dataset name, got {params.get('dataset')!r}"
            )
        for key in ("steps", "batch_size", "eval_every"):
            _pos_int(params.get(key, 1), key, where)
        _check_specs(params, ("g_norm", "d_norm", "norm"), where)

    @staticmethod
    def run(
        params: dict[str, Any], seed: int, out_dir: Path, log: Callable[[str], None]
    ) -> dict[str, Any]:
        import normlab
        from normlab.data import load_dataset
        from normlab.models import create
        from normlab.train.loop import select_device

        dev = select_device(params.get("device", "auto"))
        torch.manual_seed(seed)
        d = load_dataset(params["dataset"], **params.get("dataset_kwargs", {}))
        real = d.train_x * d.std.view(1, -1, 1, 1) + d.mean.view(1, -1, 1, 1)  # back to [0, 1]
        real = (real.clamp(0, 1) * 2 - 1).to(dev)
        size = real.shape[-1]
        model = create(
            "dcgan",
            num_classes=1,
            in_channels=real.shape[1],
            g_norm=params.get("g_norm", "bn"),
            d_norm=params.get("d_norm", "bn"),
            image_size=size,
            **params.get("model_kwargs", {}),
        )
        if params.get("norm") and params.get("include"):
            normlab.convert(model, params["norm"], include=params["include"])
        model = model.to(dev).train()
        g, dnet = model.generator, model.discriminator
        betas = tuple(params.get("betas", [0.0, 0.9]))
        lr = float(params.get("lr", 2e-4))
        og = torch.optim.Adam(g.parameters(), lr=lr, betas=betas)
        od = torch.optim.Adam(dnet.parameters(), lr=lr, betas=betas)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        gen = torch.Generator().manual_seed(seed + 1)
        feats = None
        if params.get("fid_features"):
            feats = load_feature_fn(str(params["fid_features"]), dev)
            n_fid = int(params.get("fid_samples", 10000))
            idx = torch.randperm(real.shape[0], generator=gen)[:n_fid]
            real_stats = _stats(
                torch.cat([feats(real[idx[i : i + 500]]) for i in range(0, idx.numel(), 500)])
            )
        history = []
        bs = int(params["batch_size"])
        t0 = time.perf_counter()
        dl = gl = torch.zeros(())
        for step in range(1, int(params["steps"]) + 1):
            idx = torch.randint(0, real.shape[0], (bs,), generator=gen).to(dev)
            z = torch.randn(bs, model.z_dim, generator=gen).to(dev)
            fake = g(z)
            od.zero_grad(set_to_none=True)
            ones = torch.ones(bs, device=dev)
            dl = bce(dnet(real[idx]).view(-1), ones) + bce(
                dnet(fake.detach()).view(-1), torch.zeros_like(ones)
            )
            dl.backward()
            od.step()
            og.zero_grad(set_to_none=True)
            gl = bce(dnet(fake).view(-1), ones)
            gl.backward()
            og.step()
            if step % int(params.get("eval_every", 1000)) == 0 or step == int(params["steps"]):
                rec: dict[str, Any] = {
                    "step": step,
                    "d_loss": float(dl.detach()),
                    "g_loss": float(gl.detach()),
                    "time": round(time.perf_counter() - t0, 2),
                }
                if feats is not None:
                    g.eval()
                    with torch.no_grad():
                        fs = []
                        for i in range(0, n_fid, 500):
                            zz = torch.randn(min(500, n_fid - i), model.z_dim, generator=gen).to(
                                dev
                            )
                            fs.append(feats(g(zz)))
                    g.train()
                    rec["fid"] = frechet_distance(*real_stats, *_stats(torch.cat(fs)))
                history.append(rec)
                log(
                    f"  step {step}: d {rec['d_loss']:.3f} g {rec['g_loss']:.3f}"
                    + (f" FID {rec['fid']:.2f}" if "fid" in rec else "")
                )
        with torch.no_grad():
            g.eval()
            z = torch.randn(64, model.z_dim, generator=torch.Generator().manual_seed(0)).to(dev)
            torch.save({"samples": ((g(z) + 1) / 2).clamp(0, 1).cpu()}, out_dir / "samples.pt")
        fids = [r["fid"] for r in history if "fid" in r]
        return {
            "history": history,
            "best_fid": min(fids) if fids else None,
            "fid": "computed"
            if fids
            else "not computed: no Inception network supplied (params.fid_features)",
        }


def _gan_report(
    data: SuiteData, out_dir: Path, results: dict[str, Any]
) -> tuple[list[str], list[dict[str, Any]], list[Path]]:
    from normlab.analysis._plot import new_figure, save_figure
    from normlab.report.metrics import aggregate, evaluate_claims, format_agg

    exp = data.experiment
    paper: dict[str, Any] = {}
    for t in exp.tables:
        paper.update({k: v[0] for k, v in (t.get("paper") or {}).items()})
    rows, res = [], {}
    fig, axes = new_figure(1, 2, size=(8.0, 3.2))
    for v in data.variants:
        rs = [r.result for r in data.runs[v.name] if r.result]
        best = aggregate([r["best_fid"] for r in rs if r.get("best_fid") is not None])
        res[v.name] = {"best_fid": best.mean}
        rows.append(
            [
                v.label,
                format_agg(best) if best.total else rs[0].get("fid", "—"),
                format_value(paper.get(v.name)),
            ]
        )
        h = rs[0]["history"]
        axes[0, 0].plot([r["step"] for r in h], [r["d_loss"] for r in h], label=f"{v.label} D")
        axes[0, 0].plot(
            [r["step"] for r in h], [r["g_loss"] for r in h], ls="--", label=f"{v.label} G"
        )
        if any("fid" in r for r in h):
            axes[0, 1].plot(
                [r["step"] for r in h if "fid" in r],
                [r["fid"] for r in h if "fid" in r],
                marker="o",
                label=v.label,
            )
    axes[0, 0].set_xlabel("step")
    axes[0, 0].set_ylabel("loss")
    axes[0, 0].legend(fontsize=6)
    axes[0, 1].set_xlabel("step")
    axes[0, 1].set_ylabel("FID")
    paths = [save_figure(fig, out_dir / "gan.png")]
    for v in data.variants:
        p = data.runs[v.name][0].path / "samples.pt"
        if p.is_file():
            s = torch.load(p, weights_only=True)["samples"]
            grid = _grid(s)
            f2, ax2 = new_figure(size=(3.2, 3.4))
            ax2[0, 0].imshow(grid.squeeze(), cmap="gray" if grid.shape[-1] == 1 else None)
            ax2[0, 0].set_axis_off()
            ax2[0, 0].set_title(v.label)
            paths.append(save_figure(f2, out_dir / f"samples_{v.name}.png"))
    results["gan"] = res
    lines = [
        "### Fig. 6: lowest FID",
        "",
        "FID needs an Inception network that normlab does not ship: pass its features with "
        '`[analysis] fid_features = "inception.pt"` (TorchScript) or `"module:function"`.',
        "",
        markdown_table(["model", "lowest FID (ours)", "lowest FID (paper)"], rows),
        "",
    ]

    def lookup(claim: dict[str, Any], side: Any) -> list[tuple[Any, float | None]]:
        return [(None, res.get(side, {}).get(claim["metric"]))]

    return lines, evaluate_claims(exp.claims, lookup, data.suite.get("scale", "full")), paths


def _grid(s: torch.Tensor, cols: int = 8) -> Any:
    n, c, h, w = s.shape
    rows = math.ceil(n / cols)
    out = torch.ones(c, rows * (h + 1), cols * (w + 1))
    for i in range(n):
        r, q = divmod(i, cols)
        out[:, r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = s[i]
    return out.permute(1, 2, 0).numpy()


REPORTS["gan"] = _gan_report
