"""Declarative experiment configuration: nested dataclasses loaded from TOML, with dotted overrides.

A config file has up to six tables, one per section class below::

    [data]      name = "digits"
    [model]     name = "small_cnn"; norm = "bn"; conv = "plain"; include = "*"
    [optim]     name = "sgd"; lr = 0.05; momentum = 0.9; weight_decay = 5e-4
    [schedule]  name = "step"; milestones = [0.5, 0.75]; gamma = 0.1
    [train]     epochs = 10; batch_size = 64
    [run]       seed = 0; dir = "runs"

Every key is optional (defaults below). ``--set optim.lr=0.05`` style overrides use the same dotted
names; the value is read as a TOML value (``0.05``, ``true``, ``[0.5, 0.75]``, ``"gn"``) and, when
it is not valid TOML, as a bare string (so ``--set model.norm=gn(num_groups=8)`` works unquoted).
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` (a ``ValueError``)
whose message starts with the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.data import available_datasets
from normlab.models import available_models
from normlab.models._blocks import parse_conv
from normlab.nn.registry import available_norms, parse_spec

__all__ = [
    "IMAGENET_KWARGS",
    "STREAMED_DATASETS",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "diff_configs",
    "dump_toml",
    "is_streamed",
    "load_config",
    "parse_override",
]


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the dotted key."""


#: Datasets streamed from files by DataLoaders instead of held as tensors (``data.name``).
STREAMED_DATASETS = ("imagenet",)
#: The ``data.kwargs`` a streamed ImageNet accepts (the others are set from the config).
IMAGENET_KWARGS = ("size", "resize", "pin_memory", "normalize")


def is_streamed(name: str) -> bool:
    """Whether dataset ``name`` streams from files (:data:`STREAMED_DATASETS`)."""
    return name.lower() in STREAMED_DATASETS


def _meta(help: str, **kw: Any) -> dict[str, Any]:
    return {"help": help, **kw}


@dataclass
class DataConfig:
    """Which dataset, and the training-time augmentation."""

    name: str = field(
        default="digits", metadata=_meta("dataset name (normlab.data.available_datasets())")
    )
    root: str = field(
        default="", metadata=_meta("directory with the dataset files ('' = loader default)")
    )
    download: bool = field(
        default=False, metadata=_meta("download missing dataset files (needs a network)")
    )
    split_seed: int = field(
        default=0,
        metadata=_meta("seed of the train/test split where a dataset has no official one", ge=0),
    )
    workers: int = field(
        default=4,
        metadata=_meta(
            "streamed datasets (imagenet): DataLoader worker processes decoding the images per "
            "process (0 = in the main process)",
            ge=0,
        ),
    )
    augment: bool = field(
        default=False,
        metadata=_meta(
            "random pad-and-crop + horizontal flip on training batches (in-memory datasets; "
            "imagenet augments while decoding)"
        ),
    )
    pad: int = field(
        default=4, metadata=_meta("augmentation: padding of the random crop (0 = no crop)", ge=0)
    )
    flip: bool = field(default=True, metadata=_meta("augmentation: random horizontal flips"))
    kwargs: dict = field(
        default_factory=lambda: {},
        metadata=_meta(
            "extra keyword arguments for the dataset loader (imagenet: "
            + ", ".join(IMAGENET_KWARGS)
            + ")"
        ),
    )


@dataclass
class ModelConfig:
    """The architecture and where which normalization goes.

    The model is built with ``norm`` in every slot when ``include == "*"`` and ``exclude`` is
    empty; otherwise it is built with ``base_norm`` and then ``normlab.convert(model, norm,
    include=include, exclude=exclude)`` swaps the matching slots (e.g. ``include = "conv3.*"`` for
    Kalayeh & Shah's "MN at conv3 only").
    """

    name: str = field(
        default="small_cnn", metadata=_meta("architecture (normlab.models.available_models())")
    )
    norm: str | dict = field(
        default="bn", metadata=_meta("norm spec, e.g. 'bn', 'gn(num_groups=8)', or a table")
    )
    base_norm: str | dict = field(
        default="bn", metadata=_meta("norm in the slots not matched by include/exclude")
    )
    include: str | list = field(
        default="*", metadata=_meta("glob pattern(s) of the norm slots that get `norm`")
    )
    exclude: list = field(
        default_factory=lambda: [],
        metadata=_meta("glob pattern(s) of norm slots that keep `base_norm`"),
    )
    conv: str | dict = field(
        default="plain",
        metadata=_meta(
            "conv spec: 'plain', 'ws' (Weight Standardization) or 'ws(center=false)' / "
            "'ws(scale=false)' / 'ws(eps=1e-4)', or a table {name='ws', center=false}"
        ),
    )
    std_loss_weight: float = field(
        default=0.0,
        metadata=_meta("weight of the standardization loss (Collins et al.); 0 = off", ge=0.0),
    )
    std_loss_include: str | list = field(
        default="",
        metadata=_meta(
            "glob pattern(s) of the modules the standardization loss watches ('' = its default)"
        ),
    )
    kwargs: dict = field(
        default_factory=lambda: {},
        metadata=_meta("extra keyword arguments for normlab.models.create (e.g. width)"),
    )


@dataclass
class OptimConfig:
    """The optimizer (torch.optim), with the papers' options."""

    name: str = field(
        default="sgd", metadata=_meta("optimizer", choices=("sgd", "rmsprop", "adam", "adamw"))
    )
    lr: float = field(default=0.05, metadata=_meta("initial (peak) learning rate", gt=0.0))
    momentum: float = field(default=0.9, metadata=_meta("SGD/RMSprop momentum", ge=0.0, lt=1.0))
    nesterov: bool = field(default=False, metadata=_meta("SGD: Nesterov's accelerated gradient"))
    weight_decay: float = field(
        default=0.0,
        metadata=_meta("L2 weight decay (added to the gradient; AdamW: decoupled)", ge=0.0),
    )
    decay_norm_and_bias: bool = field(
        default=True,
        metadata=_meta("apply weight decay to 1-d parameters (norm affine, biases) too"),
    )
    alpha: float = field(
        default=0.9,
        metadata=_meta("RMSprop: decay of the squared-gradient average", gt=0.0, lt=1.0),
    )
    betas: list = field(
        default_factory=lambda: [0.9, 0.999], metadata=_meta("Adam: (beta1, beta2)")
    )
    eps: float = field(default=1e-8, metadata=_meta("RMSprop/Adam epsilon", gt=0.0))
    grad_clip: float = field(
        default=0.0, metadata=_meta("clip the global gradient norm to this value; 0 = off", ge=0.0)
    )


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, a pure function of the optimizer-step counter.

    * ``constant``: lr.
    * ``exp``: lr · gamma^⌊epoch / every_epochs⌋ (Kalayeh & Shah: gamma = 0.93 every 2 or 4 epochs);
      ``staircase = false`` makes the exponent continuous.
    * ``step``: lr · gamma^(number of milestones passed); ``milestones`` are fractions of training
      (``milestone_unit = "fraction"``, Kalayeh & Shah's (0.5, 0.75) and (0.3, 0.6, 0.8)), epochs or steps.
    * ``cosine``: lr · (min_factor + (1 - min_factor) · ½(1 + cos(π t / T))).

    A linear warm-up (Collins et al. ResNet-50) multiplies the above by ``warmup_start + (1 - warmup_start)
    · t / W`` for the first ``W`` steps (``warmup_epochs`` or ``warmup_steps``).
    """

    name: str = field(
        default="constant",
        metadata=_meta("schedule kind", choices=("constant", "exp", "step", "cosine")),
    )
    gamma: float = field(
        default=0.1,
        metadata=_meta("exp: decay factor per period; step: factor per milestone", gt=0.0),
    )
    every_epochs: float = field(default=1.0, metadata=_meta("exp: epochs per decay period", gt=0.0))
    staircase: bool = field(
        default=True, metadata=_meta("exp: decay in whole periods (true) or continuously (false)")
    )
    milestones: list = field(
        default_factory=lambda: [], metadata=_meta("step: where the lr drops, in milestone_unit")
    )
    milestone_unit: str = field(
        default="fraction",
        metadata=_meta("unit of milestones", choices=("fraction", "epoch", "step")),
    )
    min_factor: float = field(
        default=0.0, metadata=_meta("cosine: final lr as a fraction of lr", ge=0.0, le=1.0)
    )
    warmup_epochs: float = field(
        default=0.0, metadata=_meta("linear warm-up length in epochs", ge=0.0)
    )
    warmup_steps: int = field(
        default=0,
        metadata=_meta("linear warm-up length in optimizer steps (adds to warmup_epochs)", ge=0),
    )
    warmup_start: float = field(
        default=0.0, metadata=_meta("lr factor at the start of the warm-up", ge=0.0, le=1.0)
    )


@dataclass
class TrainConfig:
    """Length of training, batching and evaluation."""

    epochs: int = field(
        default=10, metadata=_meta("training epochs (ignored when steps > 0)", ge=1)
    )
    steps: int = field(
        default=0,
        metadata=_meta(
            "train for this many optimizer steps instead of `epochs` (0 = use epochs)", ge=0
        ),
    )
    batch_size: int = field(
        default=64, metadata=_meta("samples per forward pass (per micro-batch)", ge=1)
    )
    accum_steps: int = field(
        default=1,
        metadata=_meta(
            "gradient accumulation: micro-batches averaged per optimizer step ('iteration size', Qiao et al., Sec. 8.1.3)",
            ge=1,
        ),
    )
    drop_last: bool = field(
        default=True, metadata=_meta("drop the last incomplete micro-batch of each epoch")
    )
    eval_batch_size: int = field(default=1000, metadata=_meta("batch size for evaluation", ge=1))
    eval_every_steps: int = field(
        default=0,
        metadata=_meta("also evaluate every N optimizer steps (0 = only at epoch ends)", ge=0),
    )
    label_smoothing: float = field(
        default=0.0, metadata=_meta("cross-entropy label smoothing", ge=0.0, lt=1.0)
    )


@dataclass
class RunConfig:
    """Where the run goes and how it runs. Launched by ``torchrun --nproc_per_node=N`` the run
    trains on N processes with DistributedDataParallel (see :mod:`normlab.train.loop`);
    ``sync_stats`` and ``dist_backend`` only matter then."""

    seed: int = field(
        default=0,
        metadata=_meta("seed of model init, data order, augmentation and every RNG", ge=0),
    )
    dir: str = field(default="runs", metadata=_meta("parent directory of run directories"))
    name: str = field(
        default="", metadata=_meta("run directory name ('' = the config file's stem, or 'run')")
    )
    device: str = field(
        default="auto", metadata=_meta("'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    )
    compile: bool = field(default=False, metadata=_meta("torch.compile the model"))
    amp: bool = field(
        default=True, metadata=_meta("automatic mixed precision on CUDA (ignored on CPU)")
    )
    amp_dtype: str = field(
        default="bfloat16", metadata=_meta("AMP dtype on CUDA", choices=("bfloat16", "float16"))
    )
    threads: int = field(
        default=0, metadata=_meta("torch CPU threads (0 = leave torch's default)", ge=0)
    )
    save_checkpoints: bool = field(
        default=True, metadata=_meta("write checkpoint.pt (needed for --resume)")
    )
    checkpoint_every_steps: int = field(
        default=0,
        metadata=_meta("also checkpoint every N optimizer steps (0 = at epoch ends)", ge=0),
    )
    progress: str = field(
        default="auto",
        metadata=_meta(
            "progress bar: 'auto' (on a terminal, not under CI), 'on', 'off'",
            choices=("auto", "on", "off"),
        ),
    )
    sync_stats: bool = field(
        default=False,
        metadata=_meta(
            "multi-process runs (torchrun): batch statistics over all processes' samples "
            "(normlab.sync_stats); no effect in one process"
        ),
    )
    dist_backend: str = field(
        default="auto",
        metadata=_meta(
            "torch.distributed backend under torchrun: 'auto' (nccl on CUDA, gloo on CPU)",
            choices=("auto", "nccl", "gloo"),
        ),
    )
    tensorboard: bool = field(
        default=False,
        metadata=_meta(
            "also write TensorBoard event files into the run directory (needs the optional "
            "tensorboard package: pip install 'normlab[tensorboard]')"
        ),
    )


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "run": RunConfig,
}


@dataclass
class Config:
    """A whole experiment: one field per TOML table."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> Config:
        """Check every value and the cross-field rules; returns ``self``. Raises ConfigError."""
        for sec in _SECTIONS:
            obj = getattr(self, sec)
            hints = typing.get_type_hints(type(obj))
            for f in dataclasses.fields(obj):
                key = f"{sec}.{f.name}"
                setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], key, f.metadata))
        _cross_checks(self)
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return config_to_dict(self)

    def get(self, key: str) -> Any:
        """The value at a dotted key, e.g. ``cfg.get("optim.lr")``."""
        sec, _, name = key.partition(".")
        return getattr(getattr(self, sec), name)


# ----------------------------------------------------------------------------------------------
# value coercion and validation


def _type_name(tp: Any) -> str:
    names = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        list: "a list",
        dict: "a table",
    }
    args = typing.get_args(tp)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return names.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, meta: Mapping[str, Any]) -> Any:
    args = typing.get_args(tp)
    if args:  # a union such as str | dict
        for a in args:
            try:
                return _coerce(value, a, key, meta)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    elif tp is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
    elif tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        value = dict(value)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for op, test, word in (
            ("ge", lambda v, b: v >= b, ">="),
            ("gt", lambda v, b: v > b, ">"),
            ("le", lambda v, b: v <= b, "<="),
            ("lt", lambda v, b: v < b, "<"),
        ):
            if op in meta and not test(value, meta[op]):
                raise ConfigError(f"{key}: must be {word} {meta[op]}, got {value!r}")
    return value


def _patterns(value: str | list, key: str) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"{key}: expected glob pattern strings, got {value!r}")
    return list(value)


def _check_spec(spec: str | dict, key: str) -> None:
    try:
        name, _ = parse_spec(spec)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}: {e}") from None
    names = available_norms()
    if name not in names:
        raise ConfigError(f"{key}: unknown normalization {name!r}; valid names: {', '.join(names)}")


def _check_conv(spec: str | dict, key: str) -> None:
    try:
        parse_conv(spec)
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(f"{key}: {msg.removeprefix('conv: ')}") from None


def _check_streamed(d: DataConfig) -> None:
    if d.download:
        raise ConfigError(
            f"data.download: {d.name!r} cannot be downloaded by normlab (ImageNet needs an "
            "image-net.org account); put its train/ and val/ folders under data.root"
        )
    for k in d.kwargs:
        if k not in IMAGENET_KWARGS:
            raise ConfigError(
                f"data.kwargs.{k}: not an option of {d.name!r} (valid: "
                f"{', '.join(IMAGENET_KWARGS)}; batch sizes, workers, seed and sharding come from "
                "the config)"
            )


def _cross_checks(c: Config) -> None:
    datasets = [*available_datasets(), *STREAMED_DATASETS]
    if c.data.name.lower() not in datasets:
        raise ConfigError(
            f"data.name: unknown dataset {c.data.name!r}; valid names: {', '.join(datasets)}"
        )
    if is_streamed(c.data.name):
        _check_streamed(c.data)
    models = list(available_models())
    if c.model.name not in models:
        raise ConfigError(
            f"model.name: unknown model {c.model.name!r}; valid names: {', '.join(models)}"
        )
    _check_spec(c.model.norm, "model.norm")
    _check_spec(c.model.base_norm, "model.base_norm")
    _check_conv(c.model.conv, "model.conv")
    _patterns(c.model.include, "model.include")
    _patterns(c.model.exclude, "model.exclude")
    _patterns(c.model.std_loss_include, "model.std_loss_include")
    for k in c.model.kwargs:
        if k in ("num_classes", "in_channels", "norm", "conv"):
            raise ConfigError(
                f"model.kwargs.{k}: set by the trainer (use model.{k} or the dataset)"
            )

    o = c.optim
    if len(o.betas) != 2 or not all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in o.betas
    ):
        raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {o.betas!r}")
    o.betas = [float(b) for b in o.betas]
    if o.nesterov and (o.name != "sgd" or o.momentum <= 0.0):
        raise ConfigError(
            f"optim.nesterov: Nesterov needs optim.name = 'sgd' and optim.momentum > 0, got "
            f"name={o.name!r}, momentum={o.momentum}"
        )

    s = c.schedule
    if not all(
        isinstance(m, (int, float)) and not isinstance(m, bool) and m >= 0 for m in s.milestones
    ):
        raise ConfigError(
            f"schedule.milestones: expected non-negative numbers, got {s.milestones!r}"
        )
    if list(s.milestones) != sorted(s.milestones):
        raise ConfigError(f"schedule.milestones: must be increasing, got {s.milestones!r}")
    if s.milestone_unit == "fraction" and any(m > 1 for m in s.milestones):
        raise ConfigError(
            f"schedule.milestones: with milestone_unit = 'fraction' every milestone must be in "
            f"[0, 1], got {s.milestones!r}"
        )
    if s.name == "step" and not s.milestones:
        raise ConfigError("schedule.milestones: the 'step' schedule needs at least one milestone")

    dev = c.run.device
    if dev != "auto" and not (
        dev == "cpu" or dev == "cuda" or dev.startswith("cuda:") or dev == "mps"
    ):
        raise ConfigError(
            f"run.device: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {dev!r}"
        )
    if c.run.name and (os.sep in c.run.name or c.run.name in (".", "..")):
        raise ConfigError(f"run.name: must be a plain directory name, got {c.run.name!r}")


# ----------------------------------------------------------------------------------------------
# dict <-> Config


def _suggest(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested tables (e.g. a parsed TOML file)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"config: expected a table of sections, got {type(d).__name__}")
    cfg = Config()
    for sec, table in d.items():
        if sec not in _SECTIONS:
            raise ConfigError(
                f"{sec}: unknown section{_suggest(sec, _SECTIONS)}; valid sections: {', '.join(_SECTIONS)}"
            )
        if not isinstance(table, Mapping):
            raise ConfigError(f"{sec}: expected a table, got {table!r}")
        obj = getattr(cfg, sec)
        names = [f.name for f in dataclasses.fields(obj)]
        for k, v in table.items():
            if k not in names:
                raise ConfigError(
                    f"{sec}.{k}: unknown key{_suggest(k, names)}; valid keys in [{sec}]: {', '.join(names)}"
                )
            setattr(obj, k, v)
    return cfg.validate()


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as nested plain dicts (JSON/TOML-ready)."""
    return {sec: dataclasses.asdict(getattr(cfg, sec)) for sec in _SECTIONS}


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=0.05"`` -> ``("optim.lr", 0.05)``; the value is TOML, else a bare string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.05")
    key, _, text = item.partition("=")
    key = key.strip()
    text = text.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def apply_overrides(
    d: dict[str, Any], overrides: Iterable[str | tuple[str, Any]]
) -> dict[str, Any]:
    """Apply ``key=value`` overrides (strings or pairs) to a nested dict in place; returns it.

    Keys are dotted: ``section.key`` or, inside table-valued keys, ``model.kwargs.width``.
    Unknown sections and keys raise ConfigError naming the key.
    """
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"{key}: expected a dotted key 'section.name', e.g. optim.lr")
        sec, name = parts[0], parts[1]
        if sec not in _SECTIONS:
            raise ConfigError(
                f"{key}: unknown section {sec!r}{_suggest(sec, _SECTIONS)}; valid sections: {', '.join(_SECTIONS)}"
            )
        names = {f.name: f for f in dataclasses.fields(_SECTIONS[sec])}
        if name not in names:
            raise ConfigError(
                f"{key}: unknown key{_suggest(name, names)}; valid keys in [{sec}]: {', '.join(names)}"
            )
        table = d.setdefault(sec, {})
        if len(parts) == 2:
            table[name] = value
            continue
        # nested: only into table-valued keys (kwargs, or a norm spec given as a table)
        sub = table.get(name)
        if sub is None:
            default = (
                names[name].default_factory()
                if names[name].default_factory is not dataclasses.MISSING
                else names[name].default
            )  # type: ignore[misc]
            sub = default if isinstance(default, dict) else None
        if not isinstance(sub, dict):
            raise ConfigError(f"{key}: {sec}.{name} is not a table, so it has no sub-keys")
        sub = dict(sub)
        node = sub
        for p in parts[2:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
            node[p] = dict(nxt)
            node = node[p]
        node[parts[-1]] = value
        table[name] = sub
    return d


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str | tuple[str, Any]] = (),
) -> Config:
    """Read a TOML config (or start from defaults when ``path`` is None), apply overrides, validate.

    When the file does not set ``run.name`` the run is named after the file's stem.
    """
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            d = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        run = d.setdefault("run", {})
        if isinstance(run, dict) and not run.get("name"):
            run["name"] = p.stem
    apply_overrides(d, overrides)
    return config_from_dict(d)


def diff_configs(a: Config | Mapping, b: Config | Mapping) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs, mapped to ``(a_value, b_value)``."""
    da = config_to_dict(a) if isinstance(a, Config) else a
    db = config_to_dict(b) if isinstance(b, Config) else b
    out: dict[str, tuple[Any, Any]] = {}
    for sec in _SECTIONS:
        ta, tb = da.get(sec, {}), db.get(sec, {})
        for k in sorted(set(ta) | set(tb)):
            if ta.get(k) != tb.get(k):
                out[f"{sec}.{k}"] = (ta.get(k), tb.get(k))
    return out


# ----------------------------------------------------------------------------------------------
# TOML writer (the standard library only reads TOML)


def _toml_key(k: str) -> str:
    if k and all(ch.isalnum() or ch in "_-" for ch in k):
        return k
    return json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        items = [f"{_toml_key(str(k))} = {_toml_value(x)}" for k, x in v.items() if x is not None]
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {type(v).__name__} value {v!r} as TOML")


def dump_toml(d: Mapping[str, Mapping[str, Any]] | Config) -> str:
    """Nested ``{section: {key: value}}`` as TOML text (tables of scalars, lists, inline tables)."""
    if isinstance(d, Config):
        d = config_to_dict(d)
    lines: list[str] = []
    for sec, table in d.items():
        lines.append(f"[{_toml_key(sec)}]")
        for k, v in table.items():
            if v is not None:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def dataclass_from_table(cls: type[Any], table: Any, where: str) -> Any:
    """Build the dataclass ``cls`` from a TOML table, checked like a config section.

    Unknown keys (with a close-match suggestion), missing required fields, wrong types and values
    outside a field's ``choices`` / ``ge`` / ``gt`` / ``le`` / ``lt`` metadata raise
    :class:`ConfigError` naming ``where.key``. Annotate the fields with the types the config
    sections use (``int``, ``float``, ``bool``, ``str``, ``list``, ``dict`` and unions of them).
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    fs = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in table:
        if k not in fs:
            raise ConfigError(
                f"{where}.{k}: unknown key{_suggest(str(k), fs)}; valid keys: {', '.join(fs)}"
            )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fs.items():
        if name in table:
            kwargs[name] = _coerce(table[name], hints[name], f"{where}.{name}", f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: needs '{name}'")
    return cls(**kwargs)
