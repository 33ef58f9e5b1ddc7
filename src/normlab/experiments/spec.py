"""The experiment file as typed records: what ``experiments/*.toml`` may say, and its parser.

Every table of an experiment file becomes a dataclass built by
:func:`normlab.train.config.dataclass_from_table`, so an unknown key, a wrong type or an
out-of-range value is rejected naming the key, exactly like a training config: ``[experiment]``
(:class:`Header`), ``[[variant]]`` (:class:`Variant`), ``[[grid]]`` (:class:`Grid`),
``[scale.NAME]`` (:class:`Scale`), ``[[table]]`` (:class:`Table`), ``[[claim]]`` (:class:`Claim`),
``[collect]`` (:data:`COLLECT_OPTIONS`), ``[plots]`` (:class:`Plots`) and ``[launcher]``
(:class:`Launcher`, the resources of each run on a cluster). Records also read like
the tables they came from (``table["columns"]``, ``claim.get("at")``). The format itself is
described in :mod:`normlab.experiments` and ``experiments/README.md``.

The overrides of a training run are applied in the order ``base`` → ``scale.defaults`` → the
variant's ``set`` → ``scale.set`` → ``scale.variant.<glob>.set`` → the command line's ``--set``,
then ``run.seed`` and ``run.name``. A ``set`` is a table of dotted keys (``{ optim.lr = 0.01 }``;
under ``data.kwargs`` / ``model.kwargs`` it is flattened to single keys, an empty ``{}`` clears
them) or a list of ``"key=value"`` strings.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from normlab.models import placement as model_placement
from normlab.train.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dataclass_from_table,
    parse_override,
)

__all__ = [
    "COLLECT_OPTIONS",
    "OPS",
    "Claim",
    "CurvesPlot",
    "Experiment",
    "ExperimentError",
    "GMMCollect",
    "Grid",
    "Header",
    "Launcher",
    "LossesPlot",
    "PercentilesCollect",
    "Plots",
    "Record",
    "Scale",
    "SpeedupPlot",
    "StatDiffCollect",
    "Table",
    "Variant",
    "is_glob",
    "launcher_from",
    "match_variants",
    "parse_experiment",
    "slurm_minutes",
]

OPS = ("<", ">", "<=", ">=", "increasing", "decreasing")
_KWARG_KEYS = {("data", "kwargs"), ("model", "kwargs")}
_TOP_KEYS = ("experiment", "base", "variant", "grid", "scale", "collect", "table", "claim")
_TOP_KEYS += ("plots", "analysis", "launcher")


class ExperimentError(ValueError):
    """A malformed experiment file or an impossible request; the message names the key."""


class Record(Mapping[str, Any]):
    """A dataclass whose fields also read by key: ``table["columns"] is table.columns``."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]


def _build(cls: type[Any], table: Any, where: str) -> Any:
    try:
        return dataclass_from_table(cls, table, where)
    except ConfigError as e:
        raise ExperimentError(str(e)) from None


def _strings(value: str | list, where: str) -> list[str]:
    """A string or a list of strings -> a list of strings."""
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in items):
        raise ExperimentError(f"{where}: expected a string or a list of strings, got {value!r}")
    return [v for v in items if v]


def is_glob(text: str) -> bool:
    """Whether ``text`` has glob characters (``*``, ``?``, ``[``)."""
    return any(ch in text for ch in "*?[")


def match_variants(names: Sequence[str], patterns: Sequence[str], where: str) -> list[str]:
    """The ``names`` matched by any of the glob ``patterns``, in the order of ``names``; a
    pattern that matches nothing raises :class:`ExperimentError` naming ``where``.

    Example::

        >>> match_variants(["bn-2", "mn-2", "bn-4"], ["bn-*"], "table.rows")
        ['bn-2', 'bn-4']
    """
    chosen = set()
    for pat in patterns:
        hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            raise ExperimentError(
                f"{where}: {pat!r} matches no variant; variants: {', '.join(names)}"
            )
        chosen.update(hit)
    return [n for n in names if n in chosen]


# ----------------------------------------------------------------------------------------------
# the records


@dataclass
class Header(Record):
    """``[experiment]``: what the file reproduces. ``source`` is the paper's short citation
    (``"Kalayeh & Shah"``), ``cite`` the table / figure / section as printed."""

    title: str = ""
    cite: str = ""
    source: str = ""
    kind: str = field(default="train", metadata={"choices": ("train", "analysis")})
    seeds: int = field(default=1, metadata={"ge": 1})
    description: str = ""
    notes: str | list = field(default_factory=list)


@dataclass
class Variant(Record):
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
class _VariantTable(Record):
    """``[[variant]]`` as written: ``set`` and ``placement`` become :attr:`Variant.overrides`."""

    name: str
    label: str = ""
    group: str = ""
    setting: str = ""
    set: dict | list = field(default_factory=dict)
    placement: str = ""
    params: dict = field(default_factory=dict)
    disabled: str = ""


@dataclass
class Grid(_VariantTable):
    """``[[grid]]``: variants from the product of ``axes`` (a table of non-empty lists);
    ``{field}`` in the strings of the variant keys is filled in per point (a string that is
    exactly one field keeps its type)."""

    axes: dict = field(default_factory=dict)


@dataclass
class Scale(Record):
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
class _ScaleTable:
    seeds: int = field(default=0, metadata={"ge": 1})
    variants: str | list = field(default_factory=list)
    defaults: dict | list = field(default_factory=dict)
    set: dict | list = field(default_factory=dict)
    variant: dict = field(default_factory=dict)
    analysis: dict = field(default_factory=dict)
    notes: str | list = field(default_factory=list)


@dataclass
class Table(Record):
    """``[[table]]`` of the report: metric ``columns`` (see :mod:`normlab.report.metrics`), their
    ``headers``, the ``rows`` (variant globs; default every variant) and the ``paper``'s numbers
    per variant, one per column."""

    columns: list
    title: str = ""
    headers: list = field(default_factory=list)
    rows: str | list = field(default_factory=list)
    paper: dict = field(default_factory=dict)
    note: str = ""


@dataclass
class Claim(Record):
    """``[[claim]]``: a statement of the paper checked on our numbers: ``a op b`` for ``metric``;
    ``b`` is a variant, a number or ``{variant: weight}``; ``increasing`` / ``decreasing`` check a
    sweep (``sweep``, ``at``); ``pick`` chooses among the variants a glob matches; ``scale``
    restricts the check to one scale."""

    text: str
    metric: str
    a: str
    op: str = field(metadata={"choices": OPS})
    b: str | float | dict | None = None
    sweep: str = ""
    at: list | float | None = None
    pick: str = field(default="", metadata={"choices": ("", "min", "max")})
    scale: str = ""


@dataclass
class StatDiffCollect(Record):
    """``[collect] statdiff``: Qiao et al., Fig. 6 (``every = 0``: after every epoch)."""

    every: int = field(default=0, metadata={"ge": 0})
    momentum: float = field(default=0.1, metadata={"gt": 0.0, "le": 1.0})
    groups: int | dict | None = None


@dataclass
class GMMCollect(Record):
    """``[collect] gmm``: one training batch of ``module``'s output at the fraction ``at`` of
    training (Kalayeh & Shah, Fig. 1); ``module`` may list candidate names."""

    module: str | list
    at: float = field(default=0.5, metadata={"gt": 0.0, "le": 1.0})
    channels: int = field(default=4, metadata={"ge": 1})
    max_points: int = field(default=20000, metadata={"ge": 1})


@dataclass
class PercentilesCollect(Record):
    """``[collect] percentiles``: percentiles ``q`` of ``module``'s output over training
    (Collins et al., Fig. 4)."""

    module: str | list
    every: int = field(default=0, metadata={"ge": 0})
    q: list = field(default_factory=lambda: [1.0, 20.0, 80.0, 99.0])


#: ``[collect]`` keys and the records of their options.
COLLECT_OPTIONS: dict[str, type[Record]] = {
    "statdiff": StatDiffCollect,
    "gmm": GMMCollect,
    "percentiles": PercentilesCollect,
}


@dataclass
class CurvesPlot(Record):
    """Error curves against ``x``, with training error (``train``); one seed's band is the std
    within a trailing ``window``."""

    x: str = field(default="epoch", metadata={"choices": ("epoch", "step")})
    train: bool = True
    window: int = field(default=10, metadata={"ge": 1})
    logy: bool = False


@dataclass
class LossesPlot(Record):
    """Training and test cross-entropy against ``x`` (Collins et al., Fig. 1)."""

    x: str = field(default="step", metadata={"choices": ("epoch", "step")})


@dataclass
class SpeedupPlot(Record):
    """Speed-up over ``baseline`` (a label or a variant) across training (Collins et al., Fig. 5)."""

    baseline: str = ""


@dataclass
class Plots(Record):
    """``[plots]``: ``curves`` (``false``: none), ``losses``, ``gmm`` (variant globs whose GMM
    snapshots are plotted; ``None``: all, ``false``: none) and ``speedup``."""

    curves: CurvesPlot | None = field(default_factory=CurvesPlot)
    losses: LossesPlot | None = None
    gmm: list[str] | None = None
    speedup: SpeedupPlot | None = None


_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
_MEM = re.compile(r"\d+[KMGT]?")


def slurm_minutes(value: str | int, where: str = "time") -> int:
    """A Slurm time limit (``90`` minutes, ``"MM:SS"``, ``"HH:MM:SS"``, ``"D-HH[:MM[:SS]]"``) in
    whole minutes, rounded up: ``slurm_minutes("4:00:00") == 240``, ``slurm_minutes("1-12") ==
    2160``."""
    m = None if isinstance(value, bool) else _TIME.fullmatch(str(value).strip())
    days, a, b, c = (int(x or 0) for x in m.groups()) if m else (0, 0, 0, 0)
    if m and m.group(1):  # D-HH[:MM[:SS]]
        seconds = ((days * 24 + a) * 60 + b) * 60 + c
    else:  # HH:MM:SS or MM[:SS]
        seconds = (a * 60 + b) * 60 + c if m and m.group(4) else a * 60 + b
    if seconds <= 0:
        raise ExperimentError(
            f"{where}: {value!r} is not a positive Slurm time limit; use minutes (90), HH:MM:SS "
            "(4:00:00) or D-HH:MM:SS (1-12:00:00)"
        )
    return math.ceil(seconds / 60)


@dataclass
class Launcher(Record):
    """``[launcher]``: each run's resources under ``normlab run --launcher slurm|ray`` (a
    ``--launcher-config`` file's ``[launcher]``, then the flags, win). Slurm: ``partition``,
    ``account``, ``qos``, ``mem`` (``"32G"``), ``time`` (:func:`slurm_minutes`), ``slurm_params``
    (more sbatch options); ``gpus_per_run`` (> 1: DDP, one process per GPU, Slurm only) and
    ``cpus_per_run`` (shared by the run's processes); Ray: ``ray_address``."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    mem: str = ""
    time: str | int = ""
    gpus_per_run: int = field(default=0, metadata={"ge": 0})
    cpus_per_run: int = field(default=1, metadata={"ge": 1})
    slurm_params: dict = field(default_factory=dict)
    ray_address: str = ""

    def merged(self, table: Mapping[str, Any], where: str) -> Launcher:
        """A copy with ``table``'s keys replaced (``slurm_params`` key by key), checked."""
        d = {**{f.name: getattr(self, f.name) for f in fields(self)}, **table}
        sp = table.get("slurm_params", {})
        d["slurm_params"] = {**self.slurm_params, **sp} if isinstance(sp, Mapping) else sp
        return launcher_from(d, where)


def launcher_from(table: Any, where: str) -> Launcher:
    """A checked :class:`Launcher` from a ``[launcher]`` table."""
    r = _build(Launcher, table, where)
    if r.mem and not _MEM.fullmatch(r.mem):
        raise ExperimentError(f"{where}.mem: {r.mem!r} is not a Slurm size; use e.g. 32G or 4000M")
    if r.time not in ("", None):
        slurm_minutes(r.time, f"{where}.time")
    for k, v in r.slurm_params.items():
        if isinstance(v, Mapping | list) or v is None:
            raise ExperimentError(
                f"{where}.slurm_params.{k}: expected a string, number or boolean, got {v!r}"
            )
    return r


def _plots_from(d: Any, where: str) -> Plots:
    if not isinstance(d, Mapping):
        raise ExperimentError(f"{where}: expected a table")
    known = [f.name for f in fields(Plots)]
    for k in d:
        if k not in known:
            raise ExperimentError(f"{where}.{k}: unknown key; valid keys: {', '.join(known)}")
    out = Plots()
    for key, cls in (("curves", CurvesPlot), ("losses", LossesPlot), ("speedup", SpeedupPlot)):
        if key not in d:
            continue
        v = d[key]
        if not isinstance(v, (bool, Mapping)):
            raise ExperimentError(f"{where}.{key}: expected true, false or a table, got {v!r}")
        setattr(
            out,
            key,
            None if v is False else cls() if v is True else _build(cls, v, where + "." + key),
        )
    if "gmm" in d:
        g = d["gmm"]
        out.gmm = [] if g is False else None if g is True else _strings(g, f"{where}.gmm")
    return out


def _collect_from(d: Any, where: str) -> dict[str, Record]:
    if not isinstance(d, Mapping):
        raise ExperimentError(f"{where}: expected a table")
    out = {}
    for name, opts in d.items():
        if name not in COLLECT_OPTIONS:
            raise ExperimentError(
                f"{where}.{name}: unknown collector; valid: {', '.join(COLLECT_OPTIONS)}"
            )
        if opts is False:
            continue
        out[name] = _build(COLLECT_OPTIONS[name], {} if opts is True else opts, f"{where}.{name}")
    return out


# ----------------------------------------------------------------------------------------------
# overrides


def _flatten_set(value: Any, where: str) -> list[tuple[str, Any]]:
    """``set`` (a nested table or a list of ``key=value`` strings) -> dotted ``(key, value)``."""
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
                out += _leaves(v, f"{sec}.{key}")
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


def _placement(key: str, where: str) -> list[tuple[str, Any]]:
    """``placement = "mixture/inception/red1+red2"`` -> ``[("model.include", [...])]`` from
    :data:`normlab.models.PLACEMENTS` (the papers' placements as plain data)."""
    if not key:
        return []
    try:
        _, include = model_placement(key)
    except ValueError as e:
        raise ExperimentError(f"{where}.placement: {e}") from None
    return [("model.include", include)]


def _as_pair(item: Any) -> tuple[str, Any]:
    return parse_override(item) if isinstance(item, str) else (item[0], item[1])


# ----------------------------------------------------------------------------------------------
# the experiment


@dataclass
class Experiment:
    """A parsed experiment file (see :mod:`normlab.experiments` for the format)."""

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
    collect: dict[str, Record]
    tables: list[Table]
    claims: list[Claim]
    plots: Plots
    analysis: dict[str, Any]
    launcher: Launcher = field(default_factory=Launcher)
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

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
        chosen = (
            match_variants(names, sc.variants, f"[scale.{scale}].variants")
            if sc.variants
            else names
        )
        if patterns:
            chosen = [n for n in match_variants(names, patterns, "--variants") if n in chosen]
        return [self.variant(n) for n in chosen]

    def seeds_at(self, scale: str) -> int:
        sc = self.scale(scale)
        return sc.seeds if sc.seeds is not None else self.seeds

    def overrides(
        self, variant: Variant | str, scale: str = "full", extra: Iterable[Any] = ()
    ) -> list[tuple[str, Any]]:
        """The ordered overrides of ``variant`` at ``scale`` (before the seed)."""
        v = self.variant(variant) if isinstance(variant, str) else variant
        sc = self.scale(scale)
        per_variant = [
            kv
            for pat, kvs in sc.variant_overrides.items()
            if fnmatch.fnmatchcase(v.name, pat)
            for kv in kvs
        ]
        return [*sc.defaults, *v.overrides, *sc.overrides, *per_variant, *map(_as_pair, extra)]

    def config(
        self,
        variant: Variant | str,
        scale: str = "full",
        seed: int = 0,
        extra: Iterable[Any] = (),
        device: str | None = None,
    ) -> Config:
        """The validated :class:`normlab.train.Config` of one training run."""
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

    def check_references(self) -> Experiment:
        """Every variant a table or claim names exists and the paper's numbers line up with the
        columns; returns ``self``."""
        names = [v.name for v in self.variants]
        for t in self.tables:
            if t.rows:
                match_variants(names, _strings(t.rows, "table.rows"), f"{self.name}: table.rows")
            for name, vals in t.paper.items():
                if name not in names:
                    raise ExperimentError(
                        f"{self.name}: table.paper names unknown variant {name!r}"
                    )
                if not isinstance(vals, list) or len(vals) != len(t.columns):
                    raise ExperimentError(
                        f"{self.name}: table.paper.{name} must be a list with one value per column "
                        f"({len(t.columns)}), got {vals!r}"
                    )
        for c in self.claims:
            for side in ("a", "b"):
                val = c[side]
                refs = (
                    list(val) if isinstance(val, Mapping) else [val] if isinstance(val, str) else []
                )
                for ref in refs:
                    if ref not in names and not is_glob(ref):
                        raise ExperimentError(
                            f"{self.name}: claim {c.text!r}: {side} names {ref!r}, which is not a variant"
                        )
        return self


# ----------------------------------------------------------------------------------------------
# parsing


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


_TEXT_KEYS = ("name", "label", "group", "setting", "placement", "disabled")


def _expand_grids(grids: Any, name: str) -> list[dict[str, Any]]:
    """``[[grid]]`` tables -> variant tables: one per point of the product of ``axes``.

    An axis is a list of values (``lr = [0.1, 0.5]`` gives the field ``{lr}``) or of tables whose
    keys all become fields (``norm = [{label = "BN", spec = "bn"}, ...]`` gives ``{label}`` and
    ``{spec}``)."""
    if not isinstance(grids, list):
        raise ExperimentError(f"{name}: use [[grid]] (an array of tables)")
    out = []
    for i, table in enumerate(grids):
        where = f"{name}: grid[{i}]"
        g = _build(Grid, table, where)
        if not g.axes or not all(isinstance(v, list) and v for v in g.axes.values()):
            raise ExperimentError(f"{where}: needs [grid.axes] with non-empty lists")
        template = {k: v for k, v in table.items() if k != "axes"}
        keys = list(g.axes)
        for combo in itertools.product(*(g.axes[k] for k in keys)):
            ctx: dict[str, Any] = {}
            for k, v in zip(keys, combo, strict=True):
                if isinstance(v, Mapping):
                    ctx.update(v)
                else:
                    ctx[k] = v
            point = _substitute(template, ctx, where)
            for k in _TEXT_KEYS:
                if k in point and not isinstance(point[k], str):
                    point[k] = str(point[k])
            out.append(point)
    return out


def _variant_from(table: Any, where: str) -> Variant:
    if isinstance(table, Mapping) and isinstance(table.get("name"), str):
        where = f"{where} ({table['name']})"
    t = _build(_VariantTable, table, where)
    if not t.name:
        raise ExperimentError(f"{where}: needs a non-empty string 'name'")
    if os.sep in t.name or "/" in t.name or t.name in (".", ".."):
        raise ExperimentError(f"{where}: name {t.name!r} must be a plain directory name")
    overrides = _placement(t.placement, where) + _flatten_set(t.set, f"{where}.set")
    return Variant(t.name, t.label, t.group, t.setting, overrides, dict(t.params), t.disabled)


def _scale_from(name: str, table: Any, where: str) -> Scale:
    t = _build(_ScaleTable, table, where)
    per = {}
    for pat, sub in t.variant.items():
        if not isinstance(sub, Mapping) or set(sub) - {"set"}:
            raise ExperimentError(f"{where}.variant.{pat}: expected a table with 'set' only")
        per[pat] = _flatten_set(sub.get("set", {}), f"{where}.variant.{pat}.set")
    return Scale(
        name=name,
        seeds=t.seeds or None,
        variants=_strings(t.variants, f"{where}.variants"),
        defaults=_flatten_set(t.defaults, f"{where}.defaults"),
        overrides=_flatten_set(t.set, f"{where}.set"),
        variant_overrides=per,
        analysis=dict(t.analysis),
        notes=_strings(t.notes, f"{where}.notes"),
    )


def _array(d: Mapping[str, Any], key: str, name: str) -> list[Any]:
    value = d.get(key, [])
    if not isinstance(value, list):
        raise ExperimentError(f"{name}: use [[{key}]] (an array of tables)")
    return value


def parse_experiment(d: Mapping[str, Any], path: Path) -> Experiment:
    """Build an :class:`Experiment` from a parsed TOML document. Checks the file's own schema
    and references; the runs' configurations are checked by
    :func:`normlab.experiments.load_experiment` with ``validate=True``."""
    name = path.stem
    if not isinstance(d.get("experiment"), Mapping):
        raise ExperimentError(f"{path}: not an experiment file (no [experiment] table)")
    unknown = set(d) - set(_TOP_KEYS)
    if unknown:
        raise ExperimentError(
            f"{path}: unknown top-level table(s) {sorted(unknown)}; valid: {sorted(_TOP_KEYS)}"
        )
    head = _build(Header, d["experiment"], f"{name}: experiment")
    raw_variants = _array(d, "variant", name) + _expand_grids(d.get("grid", []), name)
    if not raw_variants:
        raise ExperimentError(f"{name}: needs at least one [[variant]] or [[grid]]")
    variants = [_variant_from(rv, f"{name}: variant[{i}]") for i, rv in enumerate(raw_variants)]
    names = [v.name for v in variants]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ExperimentError(f"{name}: duplicate variant names {sorted(dup)}")
    scales = {}
    scale_tables = d.get("scale", {})
    if not isinstance(scale_tables, Mapping):
        raise ExperimentError(f"{name}: [scale] must be a table of [scale.NAME] tables")
    for sname, table in scale_tables.items():
        if sname == "full":
            raise ExperimentError(
                f"{name}: [scale.full] is the base protocol itself; put it in [base]"
            )
        sc = scales[sname] = _scale_from(sname, table, f"{name}: [scale.{sname}]")
        for pat in sc.variant_overrides:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise ExperimentError(f'{name}: [scale.{sname}.variant."{pat}"] matches no variant')
    base = d.get("base", {})
    if not isinstance(base, Mapping):
        raise ExperimentError(f"{name}: [base] must be a table of config sections")
    tables = [
        _build(Table, t, f"{name}: table[{i}]") for i, t in enumerate(_array(d, "table", name))
    ]
    for i, t in enumerate(tables):
        t.rows = _strings(t.rows, f"{name}: table[{i}].rows")
        if not t.columns:
            raise ExperimentError(f"{name}: every [[table]] needs a non-empty 'columns' list")
        if t.headers and len(t.headers) != len(t.columns):
            raise ExperimentError(
                f"{name}: table {t.title!r}: headers and columns differ in length"
            )
    claims = [
        _build(Claim, c, f"{name}: claim[{i}]") for i, c in enumerate(_array(d, "claim", name))
    ]
    for c in claims:
        if c.op not in ("increasing", "decreasing") and c.b is None:
            raise ExperimentError(f"{name}: claim {c.text!r} with op {c.op!r} needs 'b'")
    analysis = d.get("analysis", {})
    if not isinstance(analysis, Mapping):
        raise ExperimentError(f"{name}: [analysis] must be a table")
    return Experiment(
        path=path,
        name=name,
        title=head.title or name,
        kind=head.kind,
        cite=head.cite,
        source=head.source,
        seeds=head.seeds,
        description=head.description.strip(),
        notes=_strings(head.notes, f"{name}: experiment.notes"),
        base=copy.deepcopy(dict(base)),
        variants=variants,
        scales=scales,
        collect=_collect_from(d.get("collect", {}), f"{name}: collect"),
        tables=tables,
        claims=claims,
        plots=_plots_from(d.get("plots", {}), f"{name}: plots"),
        analysis=dict(analysis),
        launcher=launcher_from(d.get("launcher", {}), f"{name}: launcher"),
        raw=dict(d),
    ).check_references()
