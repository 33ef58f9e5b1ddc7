"""normlab.train: one training loop for every experiment.

::

    from normlab.train import load_config, train
    cfg = load_config("experiments/digits_bn.toml", ["optim.lr=0.05"])
    result = train(cfg)              # writes runs/digits_bn/{config.toml, env.json, metrics.jsonl, ...}
    result.summary["best_test_acc"]

Pieces: :mod:`~normlab.train.config` (nested dataclasses from TOML + dotted overrides),
:mod:`~normlab.train.optim` (optimizers, schedules), :mod:`~normlab.train.build` (the model and
what its layers add to the loop: auxiliary losses, step hooks), :mod:`~normlab.train.loop` (the
loop), :mod:`~normlab.train.stream` (streamed datasets: ImageNet's DataLoaders in the loop),
:mod:`~normlab.train.rundir` (the run directory and resume), :mod:`~normlab.train.checkpoint`
(atomic, checksummed, ``weights_only``-safe checkpoints and RNG states),
:mod:`~normlab.train.tblog` (TensorBoard event files, ``run.tensorboard``) and
:mod:`~normlab.train.ddp` (the multi-process context) with :mod:`~normlab.train.distributed`
(joining a ``torchrun`` job).
"""

from normlab.train.build import (
    BuiltModel,
    Wiring,
    build_training_model,
    register_wiring,
)
from normlab.train.checkpoint import (
    CheckpointError,
    CheckpointWarning,
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
from normlab.train.ddp import DDPContext, RemoteRankError
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
from normlab.train.rundir import RESUME_MUTABLE_KEYS, RunDir
from normlab.train.stream import StreamedData, open_streamed
from normlab.train.tblog import TensorBoardLog

__all__ = [
    "RESUME_MUTABLE_KEYS",
    "BuiltModel",
    "CheckpointError",
    "CheckpointWarning",
    "Config",
    "ConfigError",
    "DDPContext",
    "DataConfig",
    "LRSchedule",
    "ModelConfig",
    "OptimConfig",
    "RemoteRankError",
    "RunConfig",
    "RunDir",
    "RunResult",
    "ScheduleConfig",
    "StreamedData",
    "TensorBoardLog",
    "TrainConfig",
    "Trainer",
    "Wiring",
    "apply_overrides",
    "atomic_write_text",
    "build_model",
    "build_optimizer",
    "build_training_model",
    "capture_rng",
    "config_from_dict",
    "config_to_dict",
    "diff_configs",
    "dump_toml",
    "environment",
    "load_checkpoint",
    "load_config",
    "open_streamed",
    "param_groups",
    "parse_override",
    "progress_enabled",
    "read_metrics",
    "register_wiring",
    "restore_rng",
    "save_checkpoint",
    "select_device",
    "train",
]
