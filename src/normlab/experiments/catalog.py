"""Where experiment files are found, and loading them with every run's configuration checked.

An experiment is named by its file stem. :func:`find_experiment` looks in
:func:`experiments_dir` (``$NORMLAB_EXPERIMENTS``, else ``./experiments``, else the one next to
the source tree of an editable install) and then among the experiments shipped inside the
package (the quickstart).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from pathlib import Path

from normlab.experiments.analyses import get_runner
from normlab.experiments.spec import Experiment, ExperimentError, parse_experiment

__all__ = [
    "PACKAGED",
    "available_experiments",
    "experiments_dir",
    "find_experiment",
    "load_experiment",
    "validate_experiment",
]

#: The experiments shipped with the package (``quickstart.toml``).
PACKAGED = Path(__file__).resolve().parent


def experiments_dir() -> Path | None:
    """The ``experiments/`` directory: ``$NORMLAB_EXPERIMENTS``, else ``./experiments``, else the
    one next to the source tree of an editable install; ``None`` if none exists."""
    env = os.environ.get("NORMLAB_EXPERIMENTS")
    cands = [Path(env)] if env else []
    cands += [Path.cwd() / "experiments", PACKAGED.parents[2] / "experiments"]
    for c in cands:
        if c.is_dir():
            return c
    return None


def _experiment_files(root: Path) -> list[Path]:
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
    """Experiment names (file stems) in ``root`` mapped to their titles. The default is
    :func:`experiments_dir` and the packaged experiments. Plain training configs without an
    ``[experiment]`` table are not listed."""
    roots = [Path(root)] if root else [r for r in (experiments_dir(), PACKAGED) if r is not None]
    out: dict[str, str] = {}
    for r in roots:
        for p in _experiment_files(r):
            if p.stem not in out:
                d = tomllib.loads(p.read_text(encoding="utf-8"))
                out[p.stem] = str(d["experiment"].get("title", ""))
    return out


def find_experiment(name: str | os.PathLike[str]) -> Path:
    """Resolve an experiment argument: an existing path, or a file stem (``mixture_cifar_cnn``,
    with or without ``.toml``) in :func:`experiments_dir` or among the packaged experiments.
    Raises :class:`ExperimentError` listing the available names."""
    p = Path(name)
    if p.is_file():
        return p
    stem = p.name.removesuffix(".toml")
    for root in (experiments_dir(), PACKAGED):
        if root is not None and (root / f"{stem}.toml").is_file():
            return root / f"{stem}.toml"
    names = ", ".join(available_experiments()) or "(none found)"
    raise ExperimentError(f"experiment {str(name)!r} not found; available experiments: {names}")


def validate_experiment(exp: Experiment, scales: Sequence[str] | None = None) -> Experiment:
    """Build (and so validate) every run's configuration, or check every analysis run's
    parameters with its runner, at every scale (default: full and the file's own); returns
    ``exp``."""
    for sc in scales or ("full", *exp.scales):
        for v in exp.variants_at(sc):
            if v.disabled:
                continue
            if exp.kind == "train":
                exp.config(v, sc)
            else:
                params = exp.analysis_params(v, sc)
                get_runner(params.get("runner"), exp.name).validate(params, v)
    return exp


def load_experiment(name: str | os.PathLike[str], validate: bool = False) -> Experiment:
    """Read an experiment file (a path or a name, see :func:`find_experiment`); ``validate=True``
    also builds every run's configuration at every scale (:func:`validate_experiment`).

    Example::

        >>> exp = load_experiment("quickstart")
        >>> [v.name for v in exp.variants][:3]
        ['bn', 'gn+ws', 'bcn+ws']
    """
    path = find_experiment(name)
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"{path}: invalid TOML: {e}") from None
    exp = parse_experiment(d, path)
    if exp.kind == "analysis":
        get_runner(exp.analysis.get("runner"), exp.name)
    return validate_experiment(exp) if validate else exp
