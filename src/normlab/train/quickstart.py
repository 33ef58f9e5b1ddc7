"""``normlab quickstart``: every method of the five papers on the same small CNN, offline, in minutes.

Trains :func:`normlab.models.small_cnn` on scikit-learn's 8×8 digits with each normalization
method and several seeds, all with the same optimizer, schedule and budget, then prints a table —
final and best test accuracy (mean ± std over seeds), the number of steps each method needs to
reach the BN model's best accuracy (Kalayeh & Shah, Tables 3, 5, 6 measure acceleration this way), and the time
per step relative to BN — and writes test-error curves (mean ± std band) to a PNG.

"Steps to BN best": the BN model's best accuracy is the maximum of BN's seed-averaged test-accuracy
curve; for every method the first evaluated step at which its own seed-averaged curve reaches that
value, or "never". Evaluations happen every ``train.eval_every_steps`` steps, which is the
resolution of this column. "Time/step vs BN" divides each method's mean training time per step
(evaluation excluded) by BN's; runs are timed separately on a shared machine, so read it as a rough
ratio (see ``benchmarks/`` for paired measurements).

MixtureNorm appears twice. ``mixture`` is the paper's layer with its defaults (K = 3, 2 EM
iterations, fresh k-means++ seeds every batch) in every norm slot. It is the weakest and least
stable row, and that is the method, not a bug: refitting 3 components with 2 iterations from fresh
seeds gives a different, unconverged fit every batch, so the transform itself is noisy in training
(the same batch normalized under two seedings differs by ~30 % of the output's standard deviation)
and eval depends on which fits are in the queue. ``mixture+warm`` is the same transform with each
batch's fit started from the previous batch's (``MixtureNorm(init="warm")``, not in the paper):
measured over 5 seeds, final test accuracy 97.1 ± 1.3 % against 93.4 ± 2.5 % (BN 99.3 ± 0.3 %).
See :mod:`normlab.nn.mixture`. Where MixtureNorm goes is unchanged: every slot, like every other
method here (the paper uses it at one or two late layers; on this task conv3-only measured within
noise of every-slot, 94.7 ± 1.6 % vs 93.4 ± 2.5 %).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BASE_CONFIG",
    "METHODS",
    "MethodResult",
    "QuickstartResult",
    "format_table",
    "plot_curves",
    "run_quickstart",
]

#: The shared setting (a config dict in the [section] -> {key: value} layout of normlab.train).
BASE_CONFIG: dict[str, dict[str, Any]] = {
    "data": {"name": "digits"},
    "model": {"name": "small_cnn"},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"name": "step", "milestones": [0.5, 0.75], "gamma": 0.1},
    "train": {"epochs": 12, "batch_size": 64, "eval_every_steps": 11},
    "run": {"progress": "off", "save_checkpoints": False, "threads": 1},
}

#: method name -> (description, config overrides on top of BASE_CONFIG)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "bn": ("batch normalization", {"model.norm": "bn"}),
    "gn+ws": (
        "group norm + weight standardization (Qiao et al.)",
        {"model.norm": "gn", "model.conv": "ws"},
    ),
    "bcn+ws": (
        "batch-channel norm + weight standardization (Qiao et al.)",
        {"model.norm": "bcn", "model.conv": "ws"},
    ),
    "mixture": ("mixture normalization (Kalayeh & Shah)", {"model.norm": "mixture"}),
    "mixture+warm": (
        "mixture normalization (Kalayeh & Shah), fits warm-started from the previous batch (not in the paper)",
        {"model.norm": "mixture(init=warm)"},
    ),
    "mode": ("mode normalization (Deecke et al.)", {"model.norm": "mode"}),
    "iternorm": ("iterative whitening (Huang et al.)", {"model.norm": "iternorm"}),
    "std-loss": (
        "no norm layers + standardization loss (Collins et al.)",
        {"model.norm": "none", "model.std_loss_weight": 0.01},
    ),
    "none": ("no normalization", {"model.norm": "none"}),
}


@dataclass
class MethodResult:
    """All seeds of one method."""

    name: str
    description: str
    spec: str
    steps: list[int] = field(default_factory=list)
    curves: list[list[float]] = field(default_factory=list)  # test accuracy per seed
    summaries: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def _arr(self, key: str) -> np.ndarray:
        return np.array([s[key] for s in self.summaries], dtype=float)

    @staticmethod
    def _ms(a: np.ndarray) -> tuple[float, float]:
        if a.size == 0:
            return math.nan, math.nan
        return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0

    @property
    def final(self) -> tuple[float, float]:
        return self._ms(self._arr("final_test_acc"))

    @property
    def best(self) -> tuple[float, float]:
        return self._ms(self._arr("best_test_acc"))

    @property
    def time_per_step(self) -> float:
        a = self._arr("time_per_step")
        return float(a.mean()) if a.size else math.nan

    def mean_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, mean accuracy, std accuracy) over the seeds that finished."""
        if not self.curves:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        n = min(len(c) for c in self.curves)
        acc = np.array([c[:n] for c in self.curves], dtype=float)
        std = acc.std(axis=0, ddof=1) if len(acc) > 1 else np.zeros(n)
        return np.array(self.steps[:n]), acc.mean(axis=0), std


@dataclass
class QuickstartResult:
    out: Path
    methods: dict[str, MethodResult]
    rows: list[dict[str, Any]]
    table: str
    plot: Path | None
    wall_time: float


def _spec_of(overrides: dict[str, Any]) -> str:
    spec = overrides.get("model.norm", BASE_CONFIG["model"].get("norm", "bn"))
    spec = spec if isinstance(spec, str) else json.dumps(spec)
    if overrides.get("model.conv", "plain") == "ws":
        spec += " + WS"
    if overrides.get("model.std_loss_weight", 0):
        spec += f" + std loss ({overrides['model.std_loss_weight']:g})"
    return spec


def _job_config(method: str, seed: int, epochs: int | None, extra: Sequence[str]):
    from normlab.train.config import apply_overrides, config_from_dict

    d = json.loads(json.dumps(BASE_CONFIG))
    if epochs is not None:
        d["train"]["epochs"] = epochs
    apply_overrides(d, METHODS[method][1].items())
    apply_overrides(d, list(extra))
    apply_overrides(d, [("run.seed", seed), ("run.name", f"{method}-seed{seed}")])
    return config_from_dict(d)


def _run_one(job: tuple[str, int, int | None, list[str], str]) -> dict[str, Any]:
    """Train one (method, seed); runs in a worker process or in-process. Never raises."""
    method, seed, epochs, extra, run_dir = job
    t0 = time.perf_counter()
    try:
        from normlab.train.loop import train

        cfg = _job_config(method, seed, epochs, extra)
        res = train(cfg, run_dir, overwrite=True)
        return {
            "method": method,
            "seed": seed,
            "steps": [r["step"] for r in res.history],
            "acc": [r["test_acc"] for r in res.history],
            "summary": res.summary,
            "seconds": time.perf_counter() - t0,
        }
    except Exception as e:  # a failing method must not sink the whole comparison
        return {
            "method": method,
            "seed": seed,
            "error": f"{type(e).__name__}: {e}",
            "seconds": time.perf_counter() - t0,
        }


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _fmt_pct(ms: tuple[float, float]) -> str:
    m, s = ms
    if math.isnan(m):
        return "—"
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def _steps_to(steps: np.ndarray, acc: np.ndarray, target: float) -> int | None:
    hit = np.nonzero(acc >= target - 1e-12)[0]
    return int(steps[hit[0]]) if hit.size else None


def build_rows(methods: dict[str, MethodResult]) -> list[dict[str, Any]]:
    """The table as dicts (also written to results.json)."""
    bn = methods.get("bn")
    target = None
    bn_tps = math.nan
    if bn is not None and bn.curves:
        _, bn_mean, _ = bn.mean_curve()
        target = float(bn_mean.max())
        bn_tps = bn.time_per_step
    rows = []
    for m in methods.values():
        steps, mean, _ = m.mean_curve()
        reach = _steps_to(steps, mean, target) if (target is not None and m.curves) else None
        rows.append(
            {
                "method": m.name,
                "spec": m.spec,
                "seeds": len(m.summaries),
                "failed": len(m.errors),
                "final_acc_mean": m.final[0],
                "final_acc_std": m.final[1],
                "best_acc_mean": m.best[0],
                "best_acc_std": m.best[1],
                "bn_best_target": target,
                "steps_to_bn_best": reach,
                "time_per_step": m.time_per_step,
                "time_vs_bn": m.time_per_step / bn_tps if bn_tps == bn_tps else math.nan,
                "errors": m.errors,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table (also valid Markdown)."""
    head = [
        "method",
        "norm",
        "seeds",
        "final test acc (%)",
        "best test acc (%)",
        "steps to BN best",
        "time/step vs BN",
    ]
    body = []
    for r in rows:
        if r["seeds"] == 0:
            reach = "failed"
        elif r["bn_best_target"] is None:
            reach = "n/a"
        else:
            reach = "never" if r["steps_to_bn_best"] is None else str(r["steps_to_bn_best"])
        tvb = r["time_vs_bn"]
        body.append(
            [
                r["method"],
                r["spec"],
                f"{r['seeds']}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
                _fmt_pct((r["final_acc_mean"], r["final_acc_std"])),
                _fmt_pct((r["best_acc_mean"], r["best_acc_std"])),
                reach,
                "—" if tvb != tvb else f"{tvb:.2f}×",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def plot_curves(methods: dict[str, MethodResult], path: Path, title: str) -> Path:
    """Test error (%) against optimizer steps, seed mean with a ±1 std band, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    floor = 0.1  # % — the log panel's floor (a 0 % error cannot be drawn on a log axis)
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(methods.values()):
        steps, mean, std = m.mean_curve()
        if steps.size == 0:
            continue
        err, band = 100 * (1 - mean), 100 * std
        for ax in axes:
            ax.plot(steps, err, color=cmap(i % 10), label=m.name, lw=1.6)
            ax.fill_between(
                steps, np.clip(err - band, floor, 100), err + band, color=cmap(i % 10), alpha=0.15
            )
    axes[0].set_yscale("log")
    axes[0].set_ylim(floor, 100)
    axes[0].set_title("test error (log scale)")
    axes[1].set_title("test error, second half of training")
    all_steps = [m.steps[-1] for m in methods.values() if m.steps]
    if all_steps:
        last = max(all_steps)
        axes[1].set_xlim(last / 2, last)
        tail = [
            100 * (1 - m.mean_curve()[1][len(m.mean_curve()[1]) // 2 :])
            for m in methods.values()
            if m.curves
        ]
        hi = max((float(np.percentile(t, 90)) for t in tail if t.size), default=10.0)
        axes[1].set_ylim(0, min(100.0, max(2.0, 1.3 * hi)))
    for ax in axes:
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _default_jobs() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def run_quickstart(
    out: str | os.PathLike[str] = "quickstart_out",
    seeds: int = 3,
    epochs: int | None = None,
    methods: Sequence[str] | None = None,
    jobs: int | None = None,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> QuickstartResult:
    """Train every method in ``methods`` (default: all of :data:`METHODS`) with seeds
    ``0 .. seeds-1``, write ``out/{results.md, results.json, test_error.png, runs/...}`` and return
    the results. ``jobs`` worker processes (default: the CPU count, at most 8) with one torch thread
    each run the trainings; ``jobs=1`` runs them in this process. ``overrides`` are ``key=value``
    config overrides applied to every run (e.g. ``optim.lr=0.1``)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    names = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    if not names:
        raise ValueError("--methods: give at least one method")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds: must be a positive integer, got {seeds!r}")
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
    ):
        raise ValueError(f"--epochs: must be a positive integer, got {epochs!r}")
    jobs = _default_jobs() if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs: must be a positive integer, got {jobs!r}")
    # Validate everything before starting any work (bad --set keys fail here, naming the key).
    cfg0 = _job_config(names[0], 0, epochs, overrides)
    for m in names[1:]:
        _job_config(m, 0, epochs, overrides)

    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    from normlab.data import load_dataset

    data = load_dataset(cfg0.data.name, root=cfg0.data.root or None, seed=cfg0.data.split_seed)
    n_train, n_test = len(data.train_y), len(data.test_y)
    bs = cfg0.train.batch_size
    spe = math.ceil(
        (n_train // bs if cfg0.train.drop_last else math.ceil(n_train / bs))
        / cfg0.train.accum_steps
    )
    total = cfg0.train.steps or cfg0.train.epochs * spe
    o, s = cfg0.optim, cfg0.schedule
    setting = (
        f"{cfg0.data.name} ({n_train} train / {n_test} test), {cfg0.model.name}, "
        f"{o.name.upper()} lr {o.lr:g} momentum {o.momentum:g} wd {o.weight_decay:g}, "
        f"{s.name} schedule, batch {bs}, {cfg0.train.epochs} epochs = {total} steps"
    )
    jobs_list = [
        (m, seed, epochs, list(overrides), str(out / "runs" / m / f"seed{seed}"))
        for m in names
        for seed in range(seeds)
    ]
    n_jobs = len(jobs_list)
    workers = min(jobs, n_jobs)
    log(f"normlab quickstart: {len(names)} methods × {seeds} seeds = {n_jobs} training runs")
    log(f"  setting: {setting}")
    log(f"  methods: {', '.join(names)}")
    log(f"  {workers} worker process(es) with 1 torch thread each; output in {out.resolve()}")
    if workers > 1:
        log("  runs train in parallel; one line per finished run follows")

    results: dict[str, MethodResult] = {
        m: MethodResult(m, METHODS[m][0], _spec_of(METHODS[m][1])) for m in names
    }
    t0 = time.perf_counter()
    done = 0
    raw: list[dict[str, Any]] = []

    def collect(r: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        raw.append(r)
        elapsed = time.perf_counter() - t0
        if "error" in r:
            log(f"  [{done:>2}/{n_jobs}] {r['method']:<9} seed {r['seed']}  FAILED: {r['error']}")
            return
        sm = r["summary"]
        log(
            f"  [{done:>2}/{n_jobs}] {r['method']:<9} seed {r['seed']}  "
            f"best {100 * sm['best_test_acc']:.2f}%  final {100 * sm['final_test_acc']:.2f}%  "
            f"{1000 * sm['time_per_step']:.1f} ms/step  ({r['seconds']:.1f} s; {elapsed:.0f} s "
            f"elapsed, ~{elapsed / done * (n_jobs - done):.0f} s left)"
        )

    if workers == 1:
        import torch

        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for job in jobs_list:
                log(f"  training {job[0]} seed {job[1]} ...")
                collect(_run_one(job))
        finally:
            torch.set_num_threads(prev)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(1,)
        ) as ex:
            futures = [ex.submit(_run_one, job) for job in jobs_list]
            for fut in as_completed(futures):
                collect(fut.result())
    wall = time.perf_counter() - t0
    for r in sorted(raw, key=lambda r: r["seed"]):  # seed order, whatever the completion order
        mr = results[r["method"]]
        if "error" in r:
            mr.errors.append(f"seed {r['seed']}: {r['error']}")
            continue
        mr.steps = r["steps"]
        mr.curves.append(r["acc"])
        mr.summaries.append(r["summary"])

    rows = build_rows(results)
    table = format_table(rows)
    plot = plot_curves(
        results,
        out / "test_error.png",
        f"normlab quickstart — {cfg0.data.name}, {cfg0.model.name}, mean ± std over {seeds} seed(s)",
    )
    target = rows[0]["bn_best_target"] if rows else None
    notes = [
        f"Setting: {setting}.",
        f"Seeds: {seeds}. Wall time: {wall:.1f} s with {workers} worker(s).",
        "Steps to BN best: first evaluated step (every "
        f"{cfg0.train.eval_every_steps or spe} steps) where the method's seed-mean test accuracy "
        + (
            f"reaches BN's best seed-mean accuracy ({100 * target:.2f}%)."
            if target
            else "reaches BN's best (BN not run)."
        ),
        "Time/step vs BN: mean training time per step (no evaluation) over BN's; separate runs "
        "on a shared machine, so a rough ratio.",
    ]
    (out / "results.md").write_text(
        "# normlab quickstart\n\n" + table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n",
        encoding="utf-8",
    )
    payload = {
        "setting": setting,
        "seeds": seeds,
        "wall_time": wall,
        "rows": rows,
        "curves": {
            m: {
                "steps": [int(x) for x in r.mean_curve()[0]],
                "acc_mean": [float(x) for x in r.mean_curve()[1]],
                "acc_std": [float(x) for x in r.mean_curve()[2]],
            }
            for m, r in results.items()
        },
    }
    (out / "results.json").write_text(json.dumps(_clean(payload), indent=2) + "\n")
    return QuickstartResult(out, results, rows, table, plot, wall)


def _clean(x: Any) -> Any:
    """Non-finite floats -> None, recursively (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
