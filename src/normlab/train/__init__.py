"""normlab.train: one training loop for every experiment.

::

    from normlab.train import load_config, train
    cfg = load_config("experiments/digits_bn.toml", ["optim.lr=0.05"])
    result = train(cfg)              # writes runs/digits_bn/{config.toml, env.json, metrics.jsonl, ...}
    result.summary["best_test_acc"]

Pieces: :mod:`~normlab.train.config` (nested dataclasses from TOML + dotted overrides),
:mod:`~normlab.train.optim` (optimizers, schedules), :mod:`~normlab.train.checkpoint` (atomic,
``weights_only``-safe checkpoints and RNG states), :mod:`~normlab.train.loop` (the loop and run
directory) and :mod:`~normlab.train.quickstart` (the ``normlab quickstart`` comparison).
"""

from normlab.train.checkpoint import (
    atomic_write_text,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from normlab.train.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    diff_configs,
    dump_toml,
    load_config,
    parse_override,
)
from normlab.train.loop import (
    RunResult,
    Trainer,
    build_model,
    environment,
    progress_enabled,
    read_metrics,
    select_device,
    train,
)
from normlab.train.optim import LRSchedule, build_optimizer, param_groups

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "LRSchedule",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "RunResult",
    "ScheduleConfig",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "atomic_write_text",
    "build_model",
    "build_optimizer",
    "capture_rng",
    "config_from_dict",
    "config_to_dict",
    "diff_configs",
    "dump_toml",
    "environment",
    "load_checkpoint",
    "load_config",
    "param_groups",
    "parse_override",
    "progress_enabled",
    "read_metrics",
    "restore_rng",
    "save_checkpoint",
    "select_device",
    "train",
]
