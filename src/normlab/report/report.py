"""``normlab report RUN_DIR``: a Markdown report of a suite run with the paper's numbers beside ours.

:func:`write_report` reads a directory made by :func:`normlab.experiments.run_experiment` and
writes ``report.md``, its PNG figures and ``results.json`` (the aggregated numbers of every table
and claim, for scripts) into ``out`` (default: the run directory). The report has:

1. a header: the experiment, the paper and the table/figure it reproduces, the scale, seeds,
   software versions, device and run time;
2. the protocol actually run (dataset, model, optimizer, schedule, length, batch size — read back
   from the runs' ``config.toml``), what each variant changes, and the experiment's notes on the
   readings and on how the scale differs from the paper;
3. the paper-format tables: for every column, ours (mean ± std over seeds) and the paper's number;
4. the paper's claims, each checked on our numbers (✓ holds, ✗ does not, ? not checkable);
5. the figures (error curves with ±1 std shading, losses, StatDiff, GMM fits, percentiles, or the
   analysis runner's own figures);
6. ``discussion.md`` from the output directory, verbatim, if present (a hand-written reading of
   the results that survives regeneration).

A small-scale run is a different dataset and length than the paper's, so its absolute numbers are
not comparable with the paper's; the *direction* of each difference (and relative measures such as
the reduction in steps) is what the claims check.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import normlab
from normlab.analysis._plot import figure_caption
from normlab.analysis.curves import plot_speedup
from normlab.experiments import EXPERIMENT_COPY, Experiment, get_runner, match_variants
from normlab.experiments.spec import SpeedupPlot
from normlab.provenance import git_state, sha256_of
from normlab.report.analyses import REPORTS
from normlab.report.labels import data_short, data_used, run_label
from normlab.report.markdown import markdown_table, relative_link
from normlab.report.metrics import (
    SuiteData,
    aggregate,
    evaluate_claims,
    format_agg,
    format_value,
    load_suite_data,
    metric_values,
)
from normlab.report.plots import (
    plot_curves,
    plot_gmm,
    plot_losses,
    plot_percentile_runs,
    plot_statdiff,
    safe_name,
)
from normlab.train import atomic_write_text, config_from_dict, diff_configs

__all__ = ["markdown_table", "paper_reference", "write_report"]

MARK = {True: "✓", False: "✗", None: "?"}


# ----------------------------------------------------------------------------------------------
# header and protocol


def paper_reference(exp: Experiment) -> str:
    """What an experiment reproduces, as the paper and its table / figure: ``cite`` when it
    starts with the paper's short citation (``source``), else ``"source, cite"``.

    Example::

        >>> from normlab.experiments import load_experiment
        >>> paper_reference(load_experiment("mixture_cost"))
        'Kalayeh & Shah, Table 7 (iterations/sec. on a Titan X), Sec. 5.1'
    """
    if not exp.source or exp.cite.startswith(exp.source):
        return exp.cite
    return f"{exp.source}, {exp.cite}" if exp.cite else exp.source


def _header(data: SuiteData, prov: dict[str, Any]) -> list[str]:
    exp, suite = data.experiment, data.suite
    env: dict[str, Any] = {}
    for runs in data.runs.values():
        p = runs[0].path / "env.json"
        if p.is_file():
            env = json.loads(p.read_text(encoding="utf-8"))
            break
    n_runs = sum(len(r) for r in data.runs.values())
    finished = sum(1 for rs in data.runs.values() for r in rs if r.finished)
    ref = paper_reference(exp)
    lines = [
        f"# {exp.title}",
        "",
        (f"Reproduces **{ref}**. " if ref else "")
        + f"Experiment `{exp.name}`, scale **{suite.get('scale')}**, "
        f"{suite.get('seeds')} seed(s), {finished}/{n_runs} runs finished.",
        "",
        f"Generated {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')} by normlab "
        f"{normlab.__version__} (torch {env.get('torch', torch.__version__)}, python "
        f"{env.get('python', platform.python_version())}) on {env.get('device', suite.get('device') or 'cpu')}"
        + (f" ({env.get('device_name')})" if env.get("device_name") else "")
        + (f"; {cpu:.0f} s of training/analysis in all runs" if (cpu := _run_time(data)) else "")
        + ".",
        "",
    ]
    lines += [_provenance_line(prov), ""]
    if suite.get("experiment_changed"):
        lines += [
            f"*The experiment file changed after these runs; tables, claims and notes are read from "
            f"the current `{exp.path.name}`, the runs' configurations from their `config.toml`.*",
            "",
        ]
    if exp.description:
        lines += [exp.description, ""]
    return lines


def result_provenance(data: SuiteData) -> dict[str, Any]:
    """Where the suite's numbers come from, for ``results.json``: the code, torch and device the
    runs recorded (``suite.json``, each training run's ``env.json``), the sha256 of the
    experiment file that ran (the copy in the run directory) and the code that wrote the report.
    ``mixed`` is true when the runs were made by more than one commit or on a dirty checkout."""
    suite = data.suite
    prov: dict[str, Any] = dict(suite.get("provenance") or {})
    commits, dirty, devices, torches = [], False, [], []
    for rs in data.runs.values():
        for r in rs:
            p = r.path / "env.json"
            if not p.is_file():
                continue
            env = json.loads(p.read_text(encoding="utf-8"))
            for seen, key in ((commits, "git_commit"), (devices, "device"), (torches, "torch")):
                if env.get(key) and env[key] not in seen:
                    seen.append(env[key])
            dirty = dirty or bool(env.get("git_dirty"))
    history = suite.get("provenance_history", [])
    commits += [h["git_commit"] for h in history if h.get("git_commit") not in commits]
    if prov.get("git_commit") and prov["git_commit"] not in commits:
        commits.append(prov["git_commit"])
    dirty = dirty or bool(prov.get("git_dirty")) or any(h.get("git_dirty") for h in history)
    prov.setdefault("normlab", normlab.__version__)
    prov.setdefault("git_commit", commits[0] if len(commits) == 1 else None)
    prov["git_dirty"] = dirty if (commits or "git_dirty" in prov) else None
    prov.setdefault("torch", torches[0] if torches else None)
    prov.setdefault("device", devices[0] if devices else suite.get("device"))
    copy = data.root / EXPERIMENT_COPY
    if copy.is_file():
        prov["experiment_file"] = data.experiment.path.name
        prov["experiment_sha256"] = sha256_of(copy)
    prov["run_commits"] = [c for c in commits if c]
    prov["mixed"] = len(prov["run_commits"]) > 1 or dirty or len(torches) > 1
    prov["report"] = {"normlab": normlab.__version__, **git_state()}
    return prov


def _provenance_line(prov: dict[str, Any]) -> str:
    commits = prov.get("run_commits") or []
    code = (
        f"commit {', '.join(c[:10] for c in commits)}"
        + (" with uncommitted changes" if prov.get("git_dirty") else "")
        if commits
        else "code outside a git checkout"
    )
    sha = prov.get("experiment_sha256")
    return (
        f"Provenance: normlab {prov.get('normlab')} at {code}; torch {prov.get('torch')} on "
        f"{prov.get('device')}"
        + (f"; `{prov.get('experiment_file')}` sha256 {sha[:16]}…" if sha else "")
        + (" (**mixed**: the runs come from more than one code state)" if prov.get("mixed") else "")
        + "."
    )


def _run_time(data: SuiteData) -> float:
    """Sum over runs of the training time (summary.json) or the analysis time (result.json)."""
    total = 0.0
    for rs in data.runs.values():
        for r in rs:
            total += float(r.summary.get("train_time") or r.result.get("time") or 0.0)
    return total


def _protocol(data: SuiteData) -> list[str]:
    exp, scale = data.experiment, data.suite.get("scale", "full")
    lines = ["## Protocol", ""]
    first = next((rs[0] for rs in data.runs.values() if rs and rs[0].config), None)
    if exp.kind == "train" and first is not None:
        c = first.config
        d, m, o, s, t = c["data"], c["model"], c["optim"], c["schedule"], c["train"]
        length = f"{t['steps']} steps" if t.get("steps") else f"{t['epochs']} epochs"
        opt = f"{o['name']} lr {o['lr']:g}"
        if o["name"] in ("sgd", "rmsprop"):
            opt += f", momentum {o['momentum']:g}" + (" (Nesterov)" if o.get("nesterov") else "")
        opt += f", weight decay {o['weight_decay']:g}"
        sched = s["name"]
        if s["name"] == "exp":
            sched += f" (×{s['gamma']:g} every {s['every_epochs']:g} epochs)"
        elif s["name"] == "step":
            sched += f" (×{s['gamma']:g} at {s['milestones']} {s['milestone_unit']})"
        kw = f" {m['kwargs']}" if m.get("kwargs") else ""
        lines += [
            f"- data: `{d['name']}`"
            + (f" {d['kwargs']}" if d.get("kwargs") else "")
            + (" with pad-and-crop/flip augmentation" if d.get("augment") else ", no augmentation"),
            f"- model: `{m['name']}`{kw}, conv `{m['conv']}`",
            f"- optimizer: {opt}; schedule: {sched}",
            f"- length: {length}, batch size {t['batch_size']}"
            + (f" × {t['accum_steps']} accumulated" if t.get("accum_steps", 1) > 1 else "")
            + (
                f", evaluated every {t['eval_every_steps']} steps"
                if t.get("eval_every_steps")
                else ", evaluated every epoch"
            ),
            "",
        ]
        base = config_from_dict(first.config)
        rows = []
        for v in data.variants:
            r = data.runs[v.name][0]
            if not r.config:
                continue
            diffs = diff_configs(base, config_from_dict(r.config))
            changed = {k: b for k, (_, b) in diffs.items() if not k.startswith("run.")}
            own = "; ".join(f"{k} = {_short(b)}" for k, b in changed.items()) or "(reference)"
            rows.append(
                [
                    v.name,
                    v.label,
                    v.group,
                    v.setting,
                    f"norm `{_short(r.config['model']['norm'])}`",
                    own,
                ]
            )
        lines += [
            f"Variants (what differs from `{first.variant.name}`):",
            "",
            markdown_table(["variant", "label", "group", "setting", "norm", "differs"], rows),
            "",
        ]
    elif exp.kind == "analysis":
        params = {}
        for rs in data.runs.values():
            p = rs[0].path / "params.json"
            if p.is_file():
                params = json.loads(p.read_text(encoding="utf-8"))
                break
        own = {k for v in exp.variants for k in v.params} | {"variant", "sweeps", "runner"}
        shown = {k: v for k, v in params.items() if k not in own and not isinstance(v, dict)}
        lines += [
            f"- runner `{params.get('runner', exp.analysis.get('runner'))}`: "
            + ", ".join(f"{k} = {_short(v)}" for k, v in shown.items() if k != "runner"),
            "",
        ]
    notes = exp.notes + (exp.scale(scale).notes if scale != "full" else [])
    if notes:
        lines += ["Notes (readings of the paper, and how this scale differs from it):", ""]
        lines += [f"- {n}" for n in notes]
        lines.append("")
    disabled = [v for v in exp.variants if v.disabled]
    if disabled:
        lines += ["Variants in the paper's table that are **not run**:", ""]
        lines += [f"- `{v.name}` ({v.label}): {v.disabled}" for v in disabled]
        lines.append("")
    return lines


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


# ----------------------------------------------------------------------------------------------
# training experiments: tables, claims, plots


def _train_tables(data: SuiteData, results: dict[str, Any]) -> list[str]:
    exp = data.experiment
    lines: list[str] = []
    names = [v.name for v in exp.variants]
    n_seeds = data.suite.get("seeds")
    scale = data.suite.get("scale")
    for t in exp.tables:
        cols = list(t.columns)
        heads = list(t.headers or cols)
        paper = t.paper
        rows_sel = match_variants(names, t.rows, "table.rows") if t.rows else names
        has_group = any(exp.variant(n).group for n in rows_sel)
        ran = [n for n in rows_sel if n in data.runs]
        used = f"ours on {data_short(data, ran)}, {scale}"
        setting = "paper's setting" if exp.source else "setting"
        header = (["paper's group"] if has_group else []) + ["model", setting]
        for h in heads:
            header += [f"{h} ({used})"] + ([f"{h} (paper)"] if paper else [])
        rows = []
        tres = []
        for n in rows_sel:
            v = exp.variant(n)
            if n not in data.runs and not v.disabled:
                continue  # not part of this scale (the full table is in the experiment file)
            row = ([v.group] if has_group else []) + [v.label, v.setting]
            cells = {}
            for i, col in enumerate(cols):
                if v.disabled or n not in data.runs:
                    ours = "not run"
                else:
                    agg = aggregate(metric_values(data, n, col))
                    ours = format_agg(agg, col)
                    cells[col] = {
                        "mean": agg.mean,
                        "std": agg.std,
                        "n": agg.n,
                        "of": agg.total,
                        "nonfinite": agg.nonfinite,
                    }
                row.append(ours)
                if paper:
                    pv = paper.get(n, [None] * len(cols))[i]
                    row.append(format_value(pv, col))
            rows.append(row)
            tres.append(
                {
                    "variant": n,
                    "label": v.label,
                    "group": v.group,
                    "ours": cells,
                    "paper": paper.get(n),
                }
            )
        lines += [f"### {t.title or 'Results'}", ""]
        groups = list(dict.fromkeys(exp.variant(n).group for n in ran))
        what = "; ".join(run_label(data, g or None) for g in groups) or run_label(data)
        lines.append(
            f"Ours: {what}; mean ± std over {n_seeds} seed(s)"
            + ("; paper: the paper's numbers at its full scale, on its own data." if paper else ".")
        )
        if t.note:
            lines.append(t.note)
        lines += ["", markdown_table(header, rows), ""]
        results.setdefault("tables", []).append(
            {"title": t.title or None, "columns": cols, "rows": tres}
        )
    return lines


_LOWER_IS_BETTER = (
    "best_error",
    "final_error",
    "steps_to",
    "final_train_loss",
    "final_test_loss",
    "time_per_step",
    "statdiff_final",
)


def _train_lookup(
    data: SuiteData,
) -> Callable[[dict[str, Any], Any], list[tuple[Any, float | None]]]:
    """Claim values: a variant's mean over seeds; a glob (``"fb-IterNorm-*"``) takes the best of
    the matching variants (``pick = "min"``/``"max"``; default: min for errors, losses, steps and
    StatDiff, max otherwise) — e.g. Huang et al., Fig. 3 reports each method at its best learning rate."""

    def value(name: str, metric: str) -> float | None:
        if name not in data.runs:
            return None
        return aggregate(metric_values(data, name, metric)).value

    def lookup(claim: dict[str, Any], side: Any) -> list[tuple[Any, float | None]]:
        metric = claim["metric"]
        if any(ch in side for ch in "*?["):
            names = [n for n in data.runs if fnmatch.fnmatchcase(n, side)]
            vals = [v for v in (value(n, metric) for n in names) if v is not None]
            if not vals:
                return [(None, None)]
            lower = metric.partition(":")[0] in _LOWER_IS_BETTER
            pick = claim.get("pick") or ("min" if lower else "max")
            return [(None, min(vals) if pick == "min" else max(vals))]
        return [(None, value(side, metric))]

    return lookup


def _train_samples(data: SuiteData) -> Callable[[dict[str, Any], Any], list[float]]:
    """Per-seed values of a claim side (for the significance test; [] for globs and mixtures)."""

    def samples(claim: dict[str, Any], side: Any) -> list[float]:
        if not isinstance(side, str) or side not in data.runs:
            return []
        return [v for v in metric_values(data, side, claim["metric"]) if math.isfinite(v)]

    return samples


def _claims_section(rows: list[dict[str, Any]], results: dict[str, Any]) -> list[str]:
    if not rows:
        return []
    results["claims"] = rows
    held = sum(1 for r in rows if r["holds"])
    failed = [r for r in rows if r["holds"] is False]
    unchecked = sum(1 for r in rows if r["holds"] is None)
    lines = [
        "## The paper's claims, checked on our runs",
        "",
        markdown_table(
            ["claim (paper)", "ours", "holds"],
            [
                [
                    r["text"],
                    r["ours"],
                    MARK[r["holds"]] + (f" ({r['note']})" if r.get("note") else ""),
                ]
                for r in rows
            ],
        ),
        "",
        f"{held} of {len(rows) - unchecked} claims checked here hold"
        + (
            f" ({unchecked} of the {len(rows)} cannot be checked at this scale)"
            if unchecked
            else ""
        )
        + (
            f"; {weak} of them by a margin that is not significant (Welch's t-test over seeds, p >= 0.05)."
            if (
                weak := sum(
                    1 for r in rows if r["holds"] and r.get("p") is not None and r["p"] >= 0.05
                )
            )
            else "."
        ),
    ]
    untested = sum(1 for r in rows if r["holds"] and str(r.get("note", "")).startswith("untested"))
    if untested:
        lines[-1] += (
            f" {untested} of those that hold could not be tested for significance (one seed, or "
            "every seed giving the same value on both sides)."
        )
    if failed:
        lines.append(
            "Claims that do **not** hold here: " + "; ".join(f"“{r['text']}”" for r in failed) + "."
        )
    lines.append("")
    return lines


def _train_plots(data: SuiteData, out: Path) -> list[Path]:
    spec = data.experiment.plots
    paths: list[Path] = []
    cur = spec.curves
    if cur is not None:
        paths += plot_curves(data, out, x=cur.x, train=cur.train, window=cur.window, logy=cur.logy)
    if spec.losses is not None:
        paths += plot_losses(data, out, x=spec.losses.x)
    if any(r.statdiff for rs in data.runs.values() for r in rs):
        p = plot_statdiff(data, out)
        if p:
            paths.append(p)
    for v in data.variants:
        if spec.gmm is not None and not any(fnmatch.fnmatchcase(v.name, g) for g in spec.gmm):
            continue
        p = plot_gmm(data.runs[v.name][0], out)
        if p:
            paths.append(p)
    if any(r.percentiles for rs in data.runs.values() for r in rs):
        paths += plot_percentile_runs(data, out)
    if spec.speedup is not None:
        paths += _speedup_plots(data, out, spec.speedup)
    return paths


def _speedup_plots(data: SuiteData, out: Path, spec: SpeedupPlot) -> list[Path]:
    """Collins et al., Fig. 5: speed-up over the baseline across training (seed 0 of each variant)."""
    paths = []
    groups: dict[str, list[str]] = {}
    for v in data.variants:
        groups.setdefault(v.group, []).append(v.name)
    for group, names in groups.items():
        base = data.resolve(spec.baseline, group)
        if base is None or base not in data.runs:
            continue
        methods = {
            data.experiment.variant(n).label: data.runs[n][0].records for n in names if n != base
        }
        if methods:
            paths.append(
                plot_speedup(
                    data.runs[base][0].records, methods, out / f"speedup_{safe_name(group)}.png"
                )
            )
    return paths


def _curve_summary(data: SuiteData, results: dict[str, Any]) -> None:
    """Per-variant aggregates of the standard metrics, for results.json."""
    out = {}
    for v in data.variants:
        out[v.name] = {
            m: (lambda a: {"mean": a.mean, "std": a.std, "n": a.n})(
                aggregate(metric_values(data, v.name, m))
            )
            for m in ("best_acc", "final_acc", "final_train_loss")
        }
    results["variants"] = out


# ----------------------------------------------------------------------------------------------


def write_report(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None
) -> Path:
    """Write ``report.md`` (+ PNGs and ``results.json``) for the suite run in ``run_dir``;
    returns the path of ``report.md``."""
    data = load_suite_data(run_dir)
    out_dir = Path(out) if out is not None else data.root
    out_dir.mkdir(parents=True, exist_ok=True)
    exp = data.experiment
    results: dict[str, Any] = {
        "experiment": exp.name,
        "scale": data.suite.get("scale"),
        "seeds": data.suite.get("seeds"),
        "data": data_used(data),
        "provenance": result_provenance(data),
    }
    lines = _header(data, results["provenance"]) + _protocol(data)
    if not data.runs:
        lines += ["**No runs found** — nothing to report yet.", ""]
        plots: list[Path] = []
    elif exp.kind == "train":
        lines += ["## Results", ""]
        lines += _train_tables(data, results)
        rows = evaluate_claims(
            exp.claims, _train_lookup(data), data.suite.get("scale", "full"), _train_samples(data)
        )
        lines += _claims_section(rows, results)
        with figure_caption(run_label(data)):
            plots = _train_plots(data, out_dir)
        _curve_summary(data, results)
    else:
        runner = get_runner(exp.analysis.get("runner"), exp.name).name
        if runner not in REPORTS:
            raise ValueError(f"{exp.name}: the analysis runner {runner!r} has no report section")
        with figure_caption(run_label(data)):
            body, rows, plots = REPORTS[runner](data, out_dir, results)
        lines += ["## Results", "", f"Ours: {run_label(data)}.", "", *body]
        lines += _claims_section(rows, results)
    if plots:
        lines += ["## Figures", ""]
        for p in plots:
            lines += [f"![{p.stem}]({relative_link(p, out_dir)})", ""]
    disc = out_dir / "discussion.md"
    if disc.is_file():
        lines += ["## Discussion", "", disc.read_text(encoding="utf-8").strip(), ""]
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(lines).rstrip() + "\n")
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1, default=_num) + "\n")
    return report


def _num(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
