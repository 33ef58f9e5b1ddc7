"""The registry of analysis runners: experiment kinds that are not one classifier training run.

A runner is an object with two static methods, registered under a name with
:func:`register_analysis`:

* ``validate(params, variant)`` raises :class:`~normlab.experiments.spec.ExperimentError` for bad
  parameters (called when an experiment file is validated and before a run);
* ``run(params, seed, out_dir, log) -> dict`` computes one run and returns its JSON-able result,
  which the runner writes to ``<variant>/seed<k>/result.json`` (``out_dir`` may receive files).

An ``[analysis]`` table names its runner with ``runner = "..."``; :func:`get_runner` looks it up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.experiments.spec import ExperimentError, Variant
from normlab.nn.registry import parse_spec

__all__ = [
    "ANALYSES",
    "AnalysisRunner",
    "check_norm_specs",
    "check_params",
    "get_runner",
    "positive_int",
    "register_analysis",
]


@dataclass
class AnalysisRunner:
    """A registered analysis: its ``run`` and ``validate`` functions and a one-line description."""

    name: str
    run: Callable[[dict[str, Any], int, Path, Callable[[str], None]], dict[str, Any]]
    validate: Callable[[dict[str, Any], Variant], None]
    description: str = ""


#: runner name -> :class:`AnalysisRunner`
ANALYSES: dict[str, AnalysisRunner] = {}


def register_analysis(name: str, description: str = "") -> Callable[[Any], Any]:
    """Class decorator registering an object with ``run`` and ``validate`` as runner ``name``."""

    def deco(obj: Any) -> Any:
        ANALYSES[name] = AnalysisRunner(name, obj.run, obj.validate, description)
        return obj

    return deco


def get_runner(name: Any, where: str) -> AnalysisRunner:
    """The runner registered as ``name``; :class:`ExperimentError` naming ``where`` otherwise."""
    if not isinstance(name, str) or name not in ANALYSES:
        raise ExperimentError(
            f"{where}: [analysis].runner must be one of {sorted(ANALYSES)}, got {name!r}"
        )
    return ANALYSES[name]


def positive_int(v: Any, key: str, where: str) -> int:
    """``v`` if it is a positive integer, else :class:`ExperimentError` naming ``key``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ExperimentError(f"{where}: {key} must be a positive integer, got {v!r}")
    return v


def check_norm_specs(params: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    """Every ``params[key]`` present must parse as a norm spec."""
    for key in keys:
        if key in params:
            try:
                parse_spec(params[key])
            except (ValueError, TypeError) as e:
                raise ExperimentError(f"{where}: params.{key}: {e}") from None


def check_params(
    params: Mapping[str, Any],
    where: str,
    names: Mapping[str, tuple[str, Iterable[str]]] = {},
    positive: Sequence[str] = (),
    norms: Sequence[str] = (),
) -> None:
    """The common checks of a runner's parameters: each key of ``names`` must be one of its
    ``(what, valid names)``, the ``positive`` keys positive integers (when present) and the
    ``norms`` keys norm specs."""
    for key, (what, valid) in names.items():
        valid = list(valid)
        if params.get(key) not in valid:
            raise ExperimentError(
                f"{where}: params.{key} must be a {what} name, got {params.get(key)!r}; "
                f"valid: {', '.join(map(str, valid))}"
            )
    for key in positive:
        positive_int(params.get(key, 1), key, where)
    check_norm_specs(params, tuple(norms), where)
