"""The experiment suite: declarative experiment files and the runner behind ``normlab run``.

An *experiment file* (``experiments/*.toml``) describes one table or figure of a paper: a base
training configuration (the sections of :mod:`normlab.train.config`), the variants compared in
the table, the seeds, a small-scale counterpart that runs offline on a CPU, the paper's own numbers
and the claims the report checks. ::

    [experiment]
    title = "CIFAR CNN: BN vs MN, acceleration"      # one line
    cite  = "Kalayeh & Shah, Tables 2-3, Fig. 2 (Sec. 4.2)"     # paper, table/figure, section
    source = "Kalayeh & Shah"             # the paper text the numbers come from
    kind  = "train"                                 # or "analysis" (see below)
    seeds = 1                                       # seeds at full scale (0 .. seeds-1)
    notes = ["readings and deviations, one per line"]

    [base.data]      name = "cifar100"; augment = true      # = a normlab.train config
    [base.model]     name = "cifar_cnn"; norm = "bn"
    [base.optim]     name = "rmsprop"; lr = 0.01
    ...

    [[variant]]                                     # one per row of the table
    name = "c100-MN-2"                              # unique; the run directory name
    label = "MN-2"; group = "CIFAR-100"             # shown in the tables
    setting = "(conv3, 3, 2) / (0.01, 2e-5)"        # free text shown next to the label
    set = { model.norm = "mixture(k=3, em_iters=2)", model.include = "conv3.norm" }
    # placement = "mixture/inception/inc2_0+inc3_0"     # model.include from normlab.models.PLACEMENTS
    # disabled = "why this row cannot run"          # listed in the report, never run

    [[grid]]                                        # many variants at once: the product of axes
    name = "n{n}-{label}"; label = "{label}"; group = "N = {n}"
    set = { model.norm = "{spec}", train.batch_size = "{n}" }   # "{n}" alone keeps n's type
    [grid.axes]
    n = [128, 256, 512]
    norm = [ { label = "BN", spec = "bn" }, { label = "MN-K2", spec = "mode(k=2)" } ]

    [scale.small]                                   # the offline CPU counterpart
    seeds = 2
    variants = ["c100-*"]                           # globs; default: every variant
    defaults = { ... }                              # applied BEFORE the variant overrides
    set = { data.name = "digits", train.epochs = 15 }   # applied AFTER them
    notes = ["what differs from the paper"]
    [scale.small.variant."c100-MN-*"]               # per-variant overrides at this scale
    set = { ... }                                   # (the key is a glob over variant names)

    [collect]                                       # analysis recorded while training
    statdiff = { every = 0 }                        # Qiao et al., Fig. 6 (0 = after every epoch)
    gmm = { module = "conv2.conv", at = 0.5 }       # Kalayeh & Shah, Fig. 1 activation snapshot
    percentiles = { module = "conv3.conv", every = 50 }   # Collins et al., Fig. 4

    [[table]]                                       # tables of the report (normlab.report)
    title = "Table 2 ..."
    columns = ["best_acc_after:0.25", "best_acc:"]  # metric names, see normlab.report.metrics
    headers = ["25%", "best"]
    rows = ["c100-*"]                               # globs; default: every variant
    paper = { "c100-BN-2" = [56.09, 62.14] }        # the paper's numbers, aligned with columns

    [[claim]]                                       # checked by the report, printed ✓/✗
    text = "MN-2 reaches BN-2's best accuracy in fewer steps"
    metric = "steps_to:BN-2"; a = "c100-MN-2"; op = "<"; b = "c100-BN-2"
    # b may be a number, a variant, or { "none" = 0.5, "bn" = 0.5 } (a weighted sum); a / b may
    # be globs ("fb-IterNorm-*": the best of them); op may be "increasing" / "decreasing" for
    # analysis sweeps (with sweep = "...", at = [x values])

    [plots]
    curves = { x = "epoch", train = true, window = 10 }   # false: no error curves
    losses = { x = "step" }                         # Collins et al., Fig. 1 (top)
    gmm = ["*BN-2", "*MN-2"]                        # which variants' GMM snapshots to plot
    speedup = { baseline = "BN" }                   # Collins et al., Fig. 5

The overrides of a run are applied in this order: ``base`` → ``scale.defaults`` → the variant's
``set`` → ``scale.set`` → ``scale.variant.<name>.set`` → the command line's ``--set``; then
``run.seed`` = the seed and, with ``--device``, ``run.device``. ``set`` is a TOML table whose
dotted keys are the ``--set`` keys of ``normlab train`` (``{ optim.lr = 0.01 }`` parses as
``{optim: {lr: 0.01}}`` and is flattened back to ``optim.lr``; under ``data.kwargs`` and
``model.kwargs`` it is flattened to single keys, so ``model.kwargs = { width = 0.5 }`` adds a
keyword rather than replacing the table; an empty ``{}`` clears it) or a list of ``"key=value"``
strings.

``kind = "analysis"`` experiments (no classifier training: Huang et al., Fig. 4–5 SND/conditioning,
Kalayeh & Shah, Table 7 cost, the Kalayeh & Shah DCGAN) name a runner in ``[analysis] runner = "..."`` with its
parameters; variants give theirs in ``params = { ... }``; ``[scale.small.analysis]`` overrides
both at that scale. The runners (:data:`ANALYSES`) live in :mod:`normlab.report.analyses` next to
their report sections.

A scale other than the paper's ("small") keeps the protocol — the same variants, optimizer,
schedule shape, placements and metrics — and changes what cannot run offline in minutes:
the dataset (``digits``, ``digits-multidomain``, ``synthetic``), the length, the width or depth.
Its ``notes`` say what changed, and the report prints them next to the paper's numbers.

**Run directory.** ``run_experiment`` writes ``OUT/suite.json`` (what was run, at which scale),
``OUT/experiment.toml`` (a copy of the file) and one directory per run,
``OUT/<variant>/seed<k>/`` — a training run directory (``config.toml``, ``metrics.jsonl``,
``summary.json``, ``checkpoint.pt``, and the collected analyses) or an analysis result
(``params.json``, ``result.json``). A run is *finished* when its ``summary.json`` (training) or
``result.json`` (analysis) exists; finished runs are skipped, unfinished training runs resume from
their checkpoint, so an interrupted sweep continues where it stopped. Runs are executed one after
the other (on a 2-core machine, parallel runs only compete for the cores).
"""

from __future__ import annotations

import copy
import datetime as _dt
import fnmatch
import json
import os
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ANALYSES",
    "AnalysisRunner",
    "Experiment",
    "ExperimentError",
    "RunSpec",
    "Scale",
    "Variant",
    "available_experiments",
    "experiments_dir",
    "find_experiment",
    "load_experiment",
    "load_suite",
    "plan_runs",
    "register_analysis",
    "run_experiment",
]

SUITE_FILE = "suite.json"
EXPERIMENT_COPY = "experiment.toml"
SCALES = ("small", "full")
_KWARG_KEYS = {("data", "kwargs"), ("model", "kwargs")}
_TOP_KEYS = {
    "experiment",
    "base",
    "variant",
    "grid",
    "scale",
    "collect",
    "table",
    "claim",
    "plots",
    "analysis",
}


class ExperimentError(ValueError):
    """A malformed experiment file or an impossible request; the message names the key."""


# ----------------------------------------------------------------------------------------------
# locating experiment files


def experiments_dir() -> Path | None:
    """The ``experiments/`` directory: ``$NORMLAB_EXPERIMENTS``, else ``./experiments``, else the
    one next to the source tree of an editable install; ``None`` if none exists."""
    env = os.environ.get("NORMLAB_EXPERIMENTS")
    cands = [Path(env)] if env else []
    cands += [Path.cwd() / "experiments", Path(__file__).resolve().parents[2] / "experiments"]
    for c in cands:
        if c.is_dir():
            return c
    return None


def _experiment_files(root: Path | None = None) -> list[Path]:
    root = root or experiments_dir()
    if root is None:
        return []
    out = []
    for p in sorted(root.glob("*.toml")):
        try:
            d = tomllib.loads(p.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if isinstance(d.get("experiment"), dict):
            out.append(p)
    return out


def available_experiments(root: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Experiment names (file stems) in ``root`` (default :func:`experiments_dir`) mapped to their
    titles. Plain training configs without an ``[experiment]`` table are not listed."""
    out = {}
    for p in _experiment_files(Path(root) if root else None):
        d = tomllib.loads(p.read_text(encoding="utf-8"))
        out[p.stem] = str(d["experiment"].get("title", ""))
    return out


def find_experiment(name: str | os.PathLike[str]) -> Path:
    """Resolve an experiment argument: an existing path, or a file stem (``mixture_cifar_cnn``, with or
    without ``.toml``) in :func:`experiments_dir`. Raises :class:`ExperimentError` listing the
    available names."""
    p = Path(name)
    if p.is_file():
        return p
    root = experiments_dir()
    if root is not None:
        stem = p.name[:-5] if p.name.endswith(".toml") else p.name
        cand = root / f"{stem}.toml"
        if cand.is_file():
            return cand
    names = ", ".join(available_experiments()) or "(none found)"
    raise ExperimentError(f"experiment {str(name)!r} not found; available experiments: {names}")


# ----------------------------------------------------------------------------------------------
# the file model


def _flatten_set(value: Any, where: str) -> list[tuple[str, Any]]:
    """``set`` (a nested table or a list of ``key=value`` strings) -> dotted ``(key, value)``."""
    from normlab.train.config import parse_override

    if value is None:
        return []
    if isinstance(value, list):
        out = []
        for item in value:
            if not isinstance(item, str):
                raise ExperimentError(
                    f"{where}: list items must be 'key=value' strings, got {item!r}"
                )
            out.append(parse_override(item))
        return out
    if not isinstance(value, Mapping):
        raise ExperimentError(f"{where}: expected a table of dotted keys or a list of strings")
    out = []
    for sec, table in value.items():
        if not isinstance(table, Mapping):
            raise ExperimentError(
                f"{where}.{sec}: expected dotted keys 'section.key', e.g. optim.lr = 0.01"
            )
        for key, v in table.items():
            if (sec, key) in _KWARG_KEYS and isinstance(v, Mapping) and v:
                for path, leaf in _leaves(v, f"{sec}.{key}"):
                    out.append((path, leaf))
            else:
                out.append((f"{sec}.{key}", v))
    return out


def _leaves(d: Mapping[str, Any], prefix: str) -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out += _leaves(v, f"{prefix}.{k}")
        else:
            out.append((f"{prefix}.{k}", v))
    return out


def _placement(key: Any, where: str) -> list[tuple[str, Any]]:
    """``placement = "mixture/inception/red1+red2"`` -> ``[("model.include", [...])]`` from
    :data:`normlab.models.PLACEMENTS` (the papers' placements as plain data)."""
    if key is None:
        return []
    from normlab.models import placement

    try:
        _, include = placement(key)
    except ValueError as e:
        raise ExperimentError(f"{where}.placement: {e}") from None
    return [("model.include", include)]


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ExperimentError(f"{where}: expected a string or a list of strings, got {value!r}")
    return list(value)


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _match(names: Sequence[str], patterns: Sequence[str], where: str) -> list[str]:
    """Names matched by any of the glob ``patterns`` (order of ``names``); a pattern matching
    nothing is an error."""
    chosen = set()
    for pat in patterns:
        hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            raise ExperimentError(
                f"{where}: {pat!r} matches no variant; variants: {', '.join(names)}"
            )
        chosen.update(hit)
    return [n for n in names if n in chosen]


@dataclass
class Variant:
    """One row of a table: a named set of overrides (training) or parameters (analysis)."""

    name: str
    label: str = ""
    group: str = ""
    setting: str = ""
    overrides: list[tuple[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    disabled: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.name


@dataclass
class Scale:
    """The overrides that turn the full-scale protocol into another scale."""

    name: str
    seeds: int | None = None
    variants: list[str] = field(default_factory=list)
    defaults: list[tuple[str, Any]] = field(default_factory=list)
    overrides: list[tuple[str, Any]] = field(default_factory=list)
    variant_overrides: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)
    analysis: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Experiment:
    """A parsed experiment file (see the module docstring for the format)."""

    path: Path
    name: str
    title: str
    kind: str
    cite: str
    source: str
    seeds: int
    description: str
    notes: list[str]
    base: dict[str, Any]
    variants: list[Variant]
    scales: dict[str, Scale]
    collect: dict[str, Any]
    tables: list[dict[str, Any]]
    claims: list[dict[str, Any]]
    plots: dict[str, Any]
    analysis: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    # -- lookups --------------------------------------------------------------------------------

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ExperimentError(
            f"{self.name}: no variant {name!r}; variants: {', '.join(v.name for v in self.variants)}"
        )

    def scale(self, name: str) -> Scale:
        if name == "full":
            return self.scales.get("full", Scale("full"))
        if name not in self.scales:
            raise ExperimentError(
                f"{self.name}: no [scale.{name}] table; scales: full, {', '.join(self.scales)}"
            )
        return self.scales[name]

    def variants_at(self, scale: str, patterns: Sequence[str] = ()) -> list[Variant]:
        """The variants run at ``scale`` (its ``variants`` globs), narrowed by ``patterns``."""
        names = [v.name for v in self.variants]
        sc = self.scale(scale)
        chosen = _match(names, sc.variants, f"[scale.{scale}].variants") if sc.variants else names
        if patterns:
            chosen = [n for n in _match(names, patterns, "--variants") if n in chosen]
        return [self.variant(n) for n in chosen]

    def seeds_at(self, scale: str) -> int:
        sc = self.scale(scale)
        return sc.seeds if sc.seeds is not None else self.seeds

    # -- configurations -------------------------------------------------------------------------

    def overrides(
        self, variant: Variant | str, scale: str = "full", extra: Iterable[Any] = ()
    ) -> list[tuple[str, Any]]:
        """The ordered overrides of ``variant`` at ``scale`` (before the seed)."""
        from normlab.train.config import parse_override

        v = self.variant(variant) if isinstance(variant, str) else variant
        sc = self.scale(scale)
        extra_pairs = [parse_override(e) if isinstance(e, str) else tuple(e) for e in extra]
        return [
            *sc.defaults,
            *v.overrides,
            *sc.overrides,
            *[
                kv
                for pat, kvs in sc.variant_overrides.items()
                if fnmatch.fnmatchcase(v.name, pat)
                for kv in kvs
            ],
            *extra_pairs,
        ]

    def config(
        self,
        variant: Variant | str,
        scale: str = "full",
        seed: int = 0,
        extra: Iterable[Any] = (),
        device: str | None = None,
    ) -> Any:
        """The validated :class:`normlab.train.Config` of one training run."""
        from normlab.train.config import ConfigError, apply_overrides, config_from_dict

        if self.kind != "train":
            raise ExperimentError(f"{self.name}: a {self.kind!r} experiment has no training config")
        v = self.variant(variant) if isinstance(variant, str) else variant
        d = copy.deepcopy(self.base)
        pairs = self.overrides(v, scale, extra)
        pairs.append(("run.seed", int(seed)))
        pairs.append(("run.name", f"{v.name}-seed{seed}"))
        if device:
            pairs.append(("run.device", device))
        try:
            apply_overrides(d, pairs)
            return config_from_dict(d)
        except ConfigError as e:
            raise ExperimentError(f"{self.name} [{scale}] variant {v.name!r}: {e}") from None

    def analysis_params(self, variant: Variant | str, scale: str = "full") -> dict[str, Any]:
        """The merged parameters of one analysis run: ``[analysis]``, then the variant's
        ``params``, then ``[scale.<scale>.analysis]`` (a scale shrinks every variant alike)."""
        v = self.variant(variant) if isinstance(variant, str) else variant
        p = copy.deepcopy(self.analysis)
        p.update(copy.deepcopy(v.params))
        p.update(copy.deepcopy(self.scale(scale).analysis))
        p["variant"] = v.name
        return p

    def validate(self, scales: Sequence[str] | None = None) -> Experiment:
        """Build (and so validate) every run's configuration at every scale; returns ``self``."""
        for sc in scales or ("full", *self.scales):
            for v in self.variants_at(sc):
                if v.disabled:
                    continue
                if self.kind == "train":
                    self.config(v, sc)
                else:
                    runner = _runner(self.analysis.get("runner"), self.name)
                    runner.validate(self.analysis_params(v, sc), v)
        for t in self.tables:
            rows = _str_list(t.get("rows"), "table.rows")
            if rows:
                _match([v.name for v in self.variants], rows, f"{self.name}: table.rows")
            paper = t.get("paper", {})
            for name, vals in paper.items():
                if name not in [v.name for v in self.variants]:
                    raise ExperimentError(
                        f"{self.name}: table.paper names unknown variant {name!r}"
                    )
                if not isinstance(vals, list) or len(vals) != len(t.get("columns", [])):
                    raise ExperimentError(
                        f"{self.name}: table.paper.{name} must be a list with one value per column "
                        f"({len(t.get('columns', []))}), got {vals!r}"
                    )
        names = [v.name for v in self.variants]
        for c in self.claims:
            for side in ("a", "b"):
                val = c.get(side)
                refs = (
                    list(val) if isinstance(val, Mapping) else [val] if isinstance(val, str) else []
                )
                for ref in refs:
                    if ref not in names and not _is_glob(ref):
                        raise ExperimentError(
                            f"{self.name}: claim {c.get('text')!r}: {side} names {ref!r}, which is not a variant"
                        )
        return self


def _scale_from(name: str, d: Mapping[str, Any], where: str) -> Scale:
    known = {"seeds", "variants", "defaults", "set", "variant", "analysis", "notes"}
    extra = set(d) - known
    if extra:
        raise ExperimentError(f"{where}: unknown key(s) {sorted(extra)}; valid: {sorted(known)}")
    seeds = d.get("seeds")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ExperimentError(f"{where}.seeds: expected a positive integer, got {seeds!r}")
    per = {}
    for vname, table in (d.get("variant") or {}).items():
        if not isinstance(table, Mapping):
            raise ExperimentError(f"{where}.variant.{vname}: expected a table with 'set'")
        per[vname] = _flatten_set(table.get("set"), f"{where}.variant.{vname}.set")
    analysis = d.get("analysis") or {}
    if not isinstance(analysis, Mapping):
        raise ExperimentError(f"{where}.analysis: expected a table")
    return Scale(
        name=name,
        seeds=seeds,
        variants=_str_list(d.get("variants"), f"{where}.variants"),
        defaults=_flatten_set(d.get("defaults"), f"{where}.defaults"),
        overrides=_flatten_set(d.get("set"), f"{where}.set"),
        variant_overrides=per,
        analysis=dict(analysis),
        notes=_str_list(d.get("notes"), f"{where}.notes"),
    )


def parse_experiment(d: Mapping[str, Any], path: Path) -> Experiment:
    """Build an :class:`Experiment` from a parsed TOML document (no config validation)."""
    name = path.stem
    if "experiment" not in d or not isinstance(d["experiment"], Mapping):
        raise ExperimentError(f"{path}: not an experiment file (no [experiment] table)")
    unknown = set(d) - _TOP_KEYS
    if unknown:
        raise ExperimentError(
            f"{path}: unknown top-level table(s) {sorted(unknown)}; valid: {sorted(_TOP_KEYS)}"
        )
    e = d["experiment"]
    kind = e.get("kind", "train")
    if kind not in ("train", "analysis"):
        raise ExperimentError(
            f"{name}: experiment.kind must be 'train' or 'analysis', got {kind!r}"
        )
    seeds = e.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ExperimentError(f"{name}: experiment.seeds must be a positive integer, got {seeds!r}")
    variants = []
    raw_variants = list(d.get("variant", [])) + _expand_grids(d.get("grid", []), name)
    if not raw_variants:
        raise ExperimentError(f"{name}: needs at least one [[variant]] or [[grid]]")
    vknown = {"name", "label", "group", "setting", "set", "params", "disabled", "placement"}
    for i, rv in enumerate(raw_variants):
        where = f"{name}: variant[{i}]"
        if not isinstance(rv, Mapping) or not isinstance(rv.get("name"), str) or not rv["name"]:
            raise ExperimentError(f"{where}: needs a non-empty string 'name'")
        extra = set(rv) - vknown
        if extra:
            raise ExperimentError(
                f"{where} ({rv['name']}): unknown key(s) {sorted(extra)}; valid: {sorted(vknown)}"
            )
        vname = rv["name"]
        if os.sep in vname or vname in (".", "..") or "/" in vname:
            raise ExperimentError(f"{where}: name {vname!r} must be a plain directory name")
        params = rv.get("params", {})
        if not isinstance(params, Mapping):
            raise ExperimentError(f"{where}.params: expected a table")
        variants.append(
            Variant(
                name=vname,
                label=str(rv.get("label", "")),
                group=str(rv.get("group", "")),
                setting=str(rv.get("setting", "")),
                overrides=_placement(rv.get("placement"), where)
                + _flatten_set(rv.get("set"), f"{where}.set"),
                params=dict(params),
                disabled=str(rv.get("disabled", "")),
            )
        )
    names = [v.name for v in variants]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ExperimentError(f"{name}: duplicate variant names {sorted(dup)}")
    scales = {}
    for sname, table in (d.get("scale") or {}).items():
        if sname == "full":
            raise ExperimentError(
                f"{name}: [scale.full] is the base protocol itself; put it in [base]"
            )
        if not isinstance(table, Mapping):
            raise ExperimentError(f"{name}: [scale.{sname}] must be a table")
        scales[sname] = _scale_from(sname, table, f"{name}: [scale.{sname}]")
    for sc in scales.values():
        for pat in sc.variant_overrides:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise ExperimentError(
                    f'{name}: [scale.{sc.name}.variant."{pat}"] matches no variant'
                )
    base = d.get("base", {})
    if kind == "train" and not isinstance(base, Mapping):
        raise ExperimentError(f"{name}: [base] must be a table of config sections")
    tables = d.get("table", [])
    claims = d.get("claim", [])
    if not isinstance(tables, list) or not isinstance(claims, list):
        raise ExperimentError(f"{name}: use [[table]] and [[claim]] (arrays of tables)")
    for t in tables:
        if not isinstance(t.get("columns"), list) or not t["columns"]:
            raise ExperimentError(f"{name}: every [[table]] needs a non-empty 'columns' list")
        heads = t.get("headers")
        if heads is not None and len(heads) != len(t["columns"]):
            raise ExperimentError(
                f"{name}: table {t.get('title')!r}: headers and columns differ in length"
            )
    for c in claims:
        for key in ("text", "metric", "a", "op"):
            if key not in c:
                raise ExperimentError(f"{name}: every [[claim]] needs '{key}'")
        if c["op"] not in _OPS:
            raise ExperimentError(
                f"{name}: claim op must be one of {sorted(_OPS)}, got {c['op']!r}"
            )
        if c["op"] not in ("increasing", "decreasing") and "b" not in c:
            raise ExperimentError(f"{name}: claim {c['text']!r} with op {c['op']!r} needs 'b'")
    analysis = dict(d.get("analysis") or {})
    if kind == "analysis":
        _runner(analysis.get("runner"), name)
    return Experiment(
        path=path,
        name=name,
        title=str(e.get("title", name)),
        kind=kind,
        cite=str(e.get("cite", "")),
        source=str(e.get("source", "")),
        seeds=seeds,
        description=str(e.get("description", "")).strip(),
        notes=_str_list(e.get("notes"), f"{name}: experiment.notes"),
        base=copy.deepcopy(dict(base)),
        variants=variants,
        scales=scales,
        collect=dict(d.get("collect") or {}),
        tables=[dict(t) for t in tables],
        claims=[dict(c) for c in claims],
        plots=dict(d.get("plots") or {}),
        analysis=analysis,
        raw=dict(d),
    )


_OPS = {"<", ">", "<=", ">=", "increasing", "decreasing"}


def _substitute(obj: Any, ctx: Mapping[str, Any], where: str) -> Any:
    """Fill ``{key}`` fields of the strings in ``obj`` from ``ctx``; a string that is exactly one
    field takes the field's value with its type (so ``"{lr}"`` stays a float)."""
    if isinstance(obj, str):
        if obj.startswith("{") and obj.endswith("}") and obj[1:-1] in ctx:
            return ctx[obj[1:-1]]
        try:
            return obj.format(**ctx)
        except (KeyError, IndexError, ValueError) as e:
            raise ExperimentError(
                f"{where}: cannot fill {obj!r} ({e!r}); axes give {sorted(ctx)}"
            ) from None
    if isinstance(obj, Mapping):
        return {k: _substitute(v, ctx, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, ctx, where) for v in obj]
    return obj


def _expand_grids(grids: Any, name: str) -> list[dict[str, Any]]:
    """``[[grid]]`` tables -> variant tables: one per point of the product of ``axes``.

    An axis is a list of values (``lr = [0.1, 0.5]`` gives the field ``{lr}``) or of tables whose
    keys all become fields (``norm = [{label = "BN", spec = "bn"}, ...]`` gives ``{label}`` and
    ``{spec}``). Every string of the grid's ``name``, ``label``, ``group``, ``setting``, ``set``,
    ``params`` and ``disabled`` is filled in with the point's fields.
    """
    import itertools

    if not isinstance(grids, list):
        raise ExperimentError(f"{name}: use [[grid]] (an array of tables)")
    out = []
    for i, g in enumerate(grids):
        where = f"{name}: grid[{i}]"
        axes = g.get("axes")
        if (
            not isinstance(axes, Mapping)
            or not axes
            or not all(isinstance(v, list) and v for v in axes.values())
        ):
            raise ExperimentError(f"{where}: needs [grid.axes] with non-empty lists")
        if not isinstance(g.get("name"), str):
            raise ExperimentError(f"{where}: needs a 'name' pattern such as 'lr{{lr}}'")
        template = {k: v for k, v in g.items() if k != "axes"}
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)):
            ctx: dict[str, Any] = {}
            for k, v in zip(keys, combo, strict=True):
                if isinstance(v, Mapping):
                    ctx.update(v)
                else:
                    ctx[k] = v
            out.append(_substitute(template, ctx, where))
    return out


def load_experiment(name: str | os.PathLike[str], validate: bool = False) -> Experiment:
    """Read an experiment file (a path or a name in :func:`experiments_dir`); ``validate=True``
    also builds every run's configuration at every scale."""
    path = find_experiment(name)
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"{path}: invalid TOML: {e}") from None
    exp = parse_experiment(d, path)
    return exp.validate() if validate else exp


# ----------------------------------------------------------------------------------------------
# analysis runners


@dataclass
class AnalysisRunner:
    """A non-training experiment kind: ``run(params, seed, out_dir, device, log) -> result`` writes
    nothing itself (the suite writes ``result.json``); ``validate(params, variant)`` raises
    :class:`ExperimentError` for bad parameters; ``report(ctx)`` (in :mod:`normlab.report`) draws
    its tables and plots."""

    name: str
    run: Callable[..., dict[str, Any]]
    validate: Callable[[dict[str, Any], Variant], None]
    description: str = ""


ANALYSES: dict[str, AnalysisRunner] = {}


def register_analysis(name: str, description: str = "") -> Callable[[Any], Any]:
    """Class/namespace decorator registering an object with ``run`` and ``validate``."""

    def deco(obj: Any) -> Any:
        ANALYSES[name] = AnalysisRunner(name, obj.run, obj.validate, description)
        return obj

    return deco


def _runner(name: Any, where: str) -> AnalysisRunner:
    _load_runners()
    if not isinstance(name, str) or name not in ANALYSES:
        raise ExperimentError(
            f"{where}: [analysis].runner must be one of {sorted(ANALYSES)}, got {name!r}"
        )
    return ANALYSES[name]


def _load_runners() -> None:
    import normlab.report.analyses  # noqa: F401  (registers the runners)


# ----------------------------------------------------------------------------------------------
# planning and running


@dataclass
class RunSpec:
    """One (variant, seed) run of an experiment and where it goes."""

    variant: Variant
    seed: int
    run_dir: Path
    config: Any = None  # normlab.train.Config (training) or the analysis parameters (dict)

    @property
    def finished(self) -> bool:
        marker = "summary.json" if not isinstance(self.config, dict) else "result.json"
        return (self.run_dir / marker).is_file()


def plan_runs(
    exp: Experiment,
    out: str | os.PathLike[str],
    scale: str = "small",
    seeds: int | None = None,
    overrides: Iterable[Any] = (),
    device: str | None = None,
    variants: Sequence[str] = (),
) -> list[RunSpec]:
    """Every (variant, seed) run of ``exp`` at ``scale``, with its configuration, in table order
    (seed-major: all variants of seed 0 first, so a partial sweep is a complete comparison)."""
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ExperimentError(f"--seeds: expected a positive integer, got {seeds!r}")
    n = seeds if seeds is not None else exp.seeds_at(scale)
    out = Path(out)
    extra = list(overrides)
    specs = []
    chosen = [v for v in exp.variants_at(scale, variants) if not v.disabled]
    for k in range(n):
        for v in chosen:
            d = out / v.name / f"seed{k}"
            if exp.kind == "train":
                cfg = exp.config(v, scale, k, extra, device)
            else:
                if extra:
                    raise ExperimentError(f"{exp.name}: --set applies to training experiments only")
                cfg = exp.analysis_params(v, scale)
                _runner(cfg.get("runner"), exp.name).validate(cfg, v)
            specs.append(RunSpec(v, k, d, cfg))
    return specs


def _same_config(run_dir: Path, cfg: Any) -> dict[str, tuple[Any, Any]]:
    """Differences (that matter) between a finished run's saved config and ``cfg``."""
    from normlab.train.config import config_from_dict, diff_configs
    from normlab.train.loop import RESUME_MUTABLE_KEYS

    p = run_dir / "config.toml"
    if not p.is_file():
        return {}
    saved = config_from_dict(tomllib.loads(p.read_text(encoding="utf-8")))
    return {k: v for k, v in diff_configs(saved, cfg).items() if k not in RESUME_MUTABLE_KEYS}


def _write_json(path: Path, obj: Any) -> None:
    from normlab.train.checkpoint import atomic_write_text

    atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def load_suite(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], Experiment]:
    """``(suite.json contents, the experiment)`` of a suite run directory. The experiment is read
    from its file when that still exists (so tables and claims refined after the run are used;
    ``suite["experiment_changed"]`` is then set if it differs from the copy made at run time),
    else from the copy ``experiment.toml`` in the run directory."""
    d = Path(run_dir)
    p = d / SUITE_FILE
    if not p.is_file():
        raise ExperimentError(
            f"{str(d)!r} is not an experiment run directory (no {SUITE_FILE}); create one with "
            "`normlab run EXPERIMENT`"
        )
    suite = json.loads(p.read_text(encoding="utf-8"))
    copy_path = d / EXPERIMENT_COPY
    orig = Path(suite.get("experiment_path", ""))
    if orig.is_file():
        # the current file: its tables, claims and notes may have been refined after the run
        exp = parse_experiment(tomllib.loads(orig.read_text(encoding="utf-8")), orig)
        if copy_path.is_file() and copy_path.read_text(encoding="utf-8") != orig.read_text(
            encoding="utf-8"
        ):
            suite["experiment_changed"] = True
    elif copy_path.is_file():
        exp = parse_experiment(
            tomllib.loads(copy_path.read_text(encoding="utf-8")),
            orig.with_name(suite["experiment"] + ".toml"),
        )
    else:
        exp = load_experiment(suite["experiment"])
    return suite, exp


def _check_suite(out: Path, suite: dict[str, Any], overwrite: bool) -> None:
    p = out / SUITE_FILE
    if not p.is_file() or overwrite:
        return
    old = json.loads(p.read_text(encoding="utf-8"))
    for key in ("experiment", "scale"):
        if old.get(key) != suite[key]:
            raise ExperimentError(
                f"{str(out)!r} holds a run of {old.get('experiment')!r} at scale "
                f"{old.get('scale')!r}; choose another --out or pass --overwrite"
            )


def run_experiment(
    experiment: Experiment | str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    scale: str = "small",
    seeds: int | None = None,
    device: str | None = None,
    overrides: Iterable[Any] = (),
    variants: Sequence[str] = (),
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    progress: str = "off",
    threads: int | None = None,
) -> dict[str, Any]:
    """Run every (variant, seed) of an experiment at ``scale`` into ``out``.

    Finished runs are skipped (after checking that their saved configuration matches);
    unfinished training runs resume from their checkpoint. ``overwrite=True`` starts every run
    again. ``threads`` sets ``torch.set_num_threads`` for the whole suite (on a loaded machine
    one thread per process is often several times faster than the default). Returns the suite
    record written to ``out/suite.json`` (with per-run status).
    """
    if threads is not None:
        import torch

        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ExperimentError(f"--threads: expected a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    exp = experiment if isinstance(experiment, Experiment) else load_experiment(experiment)
    if scale != "full":
        exp.scale(scale)  # raises for an unknown scale
    out = Path(out) if out is not None else Path("runs") / f"{exp.name}-{scale}"
    log = log or (lambda msg: None)
    extra = [e if isinstance(e, str) else f"{e[0]}={json.dumps(e[1])}" for e in overrides]
    specs = plan_runs(exp, out, scale, seeds, extra, device, variants)
    n_seeds = seeds if seeds is not None else exp.seeds_at(scale)
    suite: dict[str, Any] = {
        "experiment": exp.name,
        "experiment_path": str(exp.path.resolve()),
        "title": exp.title,
        "kind": exp.kind,
        "scale": scale,
        "seeds": n_seeds,
        "overrides": extra,
        "device": device,
        "variants": [s.variant.name for s in specs if s.seed == 0],
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "runs": [],
    }
    _check_suite(out, suite, overwrite)
    # under torchrun (normlab.train's multi-process training) every process runs the training
    # runs together; rank 0 alone writes the suite files, and runs the analyses on its own
    from normlab.train.distributed import is_main_process

    main = is_main_process()
    if not main and exp.kind == "analysis":
        suite["out"] = str(out)
        return suite
    from normlab.train.checkpoint import atomic_write_text

    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / EXPERIMENT_COPY, exp.path.read_text(encoding="utf-8"))
        _write_json(out / SUITE_FILE, suite)
    t0 = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        tag = f"[{i}/{len(specs)}] {spec.variant.name} seed {spec.seed}"
        status = _run_one(exp, spec, overwrite, log, tag, progress)
        suite["runs"].append(
            {
                "variant": spec.variant.name,
                "seed": spec.seed,
                "dir": str(spec.run_dir.relative_to(out)),
                "status": status,
            }
        )
        if main:
            _write_json(out / SUITE_FILE, suite)
    suite["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    suite["wall_time"] = round(time.perf_counter() - t0, 2)
    if main:
        _write_json(out / SUITE_FILE, suite)
    suite["out"] = str(out)
    return suite


def _run_one(
    exp: Experiment,
    spec: RunSpec,
    overwrite: bool,
    log: Callable[[str], None],
    tag: str,
    progress: str,
) -> str:
    if exp.kind == "analysis":
        return _run_analysis(exp, spec, overwrite, log, tag)
    from normlab.train.config import apply_overrides, config_from_dict, config_to_dict

    cfg = spec.config
    if progress != cfg.run.progress:
        cfg = config_from_dict(apply_overrides(config_to_dict(cfg), [("run.progress", progress)]))
    if spec.finished and not overwrite:
        diffs = _same_config(spec.run_dir, cfg)
        if diffs:
            lines = "; ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in diffs.items())
            raise ExperimentError(
                f"{spec.run_dir} is a finished run with a different configuration ({lines}); "
                "use another --out or --overwrite"
            )
        log(f"{tag}: finished, skipped")
        return "skipped"
    from normlab.train.loop import Trainer

    resumed = (spec.run_dir / "checkpoint.pt").is_file() and not overwrite
    trainer = Trainer(
        cfg, spec.run_dir, resume=not overwrite, overwrite=overwrite, log=lambda m: None
    )
    # collectors write files: rank 0's alone under torchrun (they hold no collectives)
    collectors = (
        _collectors(exp, trainer, spec.run_dir, fresh=overwrite or not resumed)
        if trainer.dist.is_main
        else []
    )
    trainer.callbacks.extend(collectors)
    log(
        f"{tag}: {'resuming' if resumed else 'training'} {trainer.total_steps} steps -> {spec.run_dir}"
    )
    t = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        for c in collectors:
            c.close()
    s = result.summary
    log(
        f"{tag}: best test acc {100 * (s['best_test_acc'] or 0):.2f}% final "
        f"{100 * (s['final_test_acc'] or 0):.2f}% ({time.perf_counter() - t:.1f} s)"
    )
    return "resumed" if resumed else "trained"


def _run_analysis(
    exp: Experiment, spec: RunSpec, overwrite: bool, log: Callable[[str], None], tag: str
) -> str:
    params = spec.config
    d = spec.run_dir
    if spec.finished and not overwrite:
        saved = (
            json.loads((d / "params.json").read_text()) if (d / "params.json").is_file() else None
        )
        if saved is not None and saved != json.loads(json.dumps(params, default=_json_default)):
            raise ExperimentError(
                f"{d} is a finished analysis with different parameters; use another --out or "
                "--overwrite"
            )
        log(f"{tag}: finished, skipped")
        return "skipped"
    d.mkdir(parents=True, exist_ok=True)
    _write_json(d / "params.json", params)
    runner = _runner(params.get("runner"), exp.name)
    log(f"{tag}: {runner.name} -> {d}")
    t = time.perf_counter()
    result = runner.run(params, spec.seed, d, log)
    result = {
        "variant": spec.variant.name,
        "seed": spec.seed,
        "time": round(time.perf_counter() - t, 3),
        **result,
    }
    _write_json(d / "result.json", result)
    log(f"{tag}: done ({result['time']:.1f} s)")
    return "analysed"


# ----------------------------------------------------------------------------------------------
# collectors: analyses recorded during training (written next to metrics.jsonl)


class _Collector:
    """A trainer callback that appends JSON records to ``run_dir/<file>``.

    Collectors keep their own running state in memory (e.g. StatDiff's running channel
    statistics): a resumed run keeps the records written before the interruption and starts that
    state afresh from the checkpoint's step on."""

    file = ""

    def __init__(self, run_dir: Path, fresh: bool) -> None:
        self.path = run_dir / self.file
        if fresh and self.path.exists():
            self.path.unlink()

    def append(self, rec: Mapping[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, default=_json_default) + "\n")

    def close(self) -> None:
        pass


def _due(trainer: Any, every: int) -> bool:
    """``every`` > 0: every that many steps; 0: at epoch ends (the trainer resets ``pos`` to 0)."""
    if every > 0:
        return trainer.step % every == 0 or trainer.step == trainer.total_steps
    return trainer.pos == 0 or trainer.step == trainer.total_steps


def _pick_module(mods: Mapping[str, Any], module: str | Sequence[str], key: str) -> str:
    """The first of ``module`` (a name or a list of candidate names) that the model has."""
    cands = [module] if isinstance(module, str) else list(module)
    for c in cands:
        if c in mods:
            return c
    raise ExperimentError(
        f"{key}: none of {cands!r} is a module of the model; e.g. {', '.join(list(mods)[1:8])}"
    )


class _StatDiff(_Collector):
    """Qiao et al., Fig. 6: StatDiff of the convolutions' running per-channel statistics."""

    file = "statdiff.jsonl"

    def __init__(
        self,
        trainer: Any,
        run_dir: Path,
        fresh: bool,
        every: int = 0,
        momentum: float = 0.1,
        groups: Any = None,
    ) -> None:
        super().__init__(run_dir, fresh)
        from normlab.analysis.statdiff import StatDiffCollector

        self.every = int(every)
        self.c = StatDiffCollector(trainer.model, groups=groups, momentum=momentum)

    def __call__(self, trainer: Any) -> None:
        if _due(trainer, self.every):
            rec = self.c.record(trainer.step)
            self.append({"epoch": round(trainer.step / trainer.steps_per_epoch, 6), **rec})

    def close(self) -> None:
        self.c.remove()


class _GMMSnapshot(_Collector):
    """Kalayeh & Shah, Fig. 1: one training batch of a module's output (the activations a norm sees), saved
    at a fraction of training as ``gmm_snapshot.pt`` for the report's mixture fits."""

    file = "gmm_snapshot.pt"

    def __init__(
        self,
        trainer: Any,
        run_dir: Path,
        fresh: bool,
        module: str | list[str] = "",
        at: float = 0.5,
        channels: int = 4,
        max_points: int = 20000,
    ) -> None:
        super().__init__(run_dir, fresh)
        mods = dict(trainer.model.named_modules())
        module = _pick_module(mods, module, "collect.gmm.module")
        self.module = module
        self.at_step = max(1, round(float(at) * trainer.total_steps))
        self.channels = int(channels)
        self.max_points = int(max_points)
        self._last = None
        self._h = mods[module].register_forward_hook(self._hook)

    def _hook(self, mod: Any, args: Any, output: Any) -> None:
        if mod.training:
            self._last = output.detach()

    def __call__(self, trainer: Any) -> None:
        import torch

        if trainer.step == self.at_step and self._last is not None and not self.path.exists():
            x = self._last[:, : self.channels].float().cpu()
            x = x.transpose(0, 1).reshape(x.shape[1], -1)[:, : self.max_points]
            torch.save(
                {"module": self.module, "step": trainer.step, "values": x.contiguous()}, self.path
            )

    def close(self) -> None:
        self._h.remove()


class _Percentiles(_Collector):
    """Collins et al., Fig. 4: percentiles of a module's output over training."""

    file = "percentiles.jsonl"

    def __init__(
        self,
        trainer: Any,
        run_dir: Path,
        fresh: bool,
        module: str | list[str] = "",
        every: int = 0,
        q: Sequence[float] = (1.0, 20.0, 80.0, 99.0),
    ) -> None:
        super().__init__(run_dir, fresh)
        from normlab.analysis.activations import PercentileRecorder

        mods = dict(trainer.model.named_modules())
        module = _pick_module(mods, module, "collect.percentiles.module")
        self.every = int(every)
        self.r = PercentileRecorder(mods[module], q=q)

    def __call__(self, trainer: Any) -> None:
        if _due(trainer, self.every):
            rec = self.r.record(trainer.step)
            if rec is not None:
                self.append({**rec, "q": list(self.r.q)})

    def close(self) -> None:
        self.r.remove()


COLLECTORS: dict[str, type[_Collector]] = {
    "statdiff": _StatDiff,
    "gmm": _GMMSnapshot,
    "percentiles": _Percentiles,
}


def _collectors(exp: Experiment, trainer: Any, run_dir: Path, fresh: bool) -> list[_Collector]:
    out = []
    for name, opts in exp.collect.items():
        if name not in COLLECTORS:
            raise ExperimentError(
                f"{exp.name}: [collect].{name}: unknown collector; valid: {sorted(COLLECTORS)}"
            )
        if opts is False:
            continue
        kw = dict(opts) if isinstance(opts, Mapping) else {}
        try:
            out.append(COLLECTORS[name](trainer, run_dir, fresh, **kw))
        except TypeError as e:
            raise ExperimentError(f"{exp.name}: [collect].{name}: {e}") from None
    return out
