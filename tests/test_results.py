"""The committed results: every experiment has one, made from the experiment file as it is now,
by committed code, and the tables that summarise them are generated from them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from normlab.experiments import available_experiments, find_experiment
from normlab.provenance import sha256_of
from normlab.report.index import (
    QS_END,
    QS_START,
    quickstart_table,
    result_problems,
    results_index,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
EXPERIMENTS = list(available_experiments())


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def _in_git_checkout() -> bool:
    try:
        return _git("rev-parse", "--show-toplevel").returncode == 0
    except OSError:
        return False


def test_the_experiment_list_is_the_catalogue():
    # the list the checks below iterate over is what `normlab run --list` shows
    assert "quickstart" in EXPERIMENTS and "mixture_cifar_cnn" in EXPERIMENTS
    assert len(EXPERIMENTS) >= 29


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_has_a_committed_result_of_its_current_file(name):
    problems = result_problems(RESULTS, name)
    assert not problems, "; ".join(problems) + " (run the experiment again and commit the result)"
    res = json.loads((RESULTS / name / "results.json").read_text(encoding="utf-8"))
    assert res["experiment"] == name
    assert res["provenance"]["experiment_sha256"] == sha256_of(find_experiment(name))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_a_committed_result_comes_from_a_commit_of_this_history(name):
    if not _in_git_checkout() or _git("rev-parse", "--is-shallow-repository").stdout.strip() != (
        "false"
    ):
        pytest.skip("needs a full git checkout")
    prov = json.loads((RESULTS / name / "results.json").read_text("utf-8"))["provenance"]
    r = _git("merge-base", "--is-ancestor", prov["git_commit"], "HEAD")
    assert r.returncode == 0, (
        f"results/{name}: commit {prov['git_commit']} is not in HEAD's history"
    )


def test_results_readme_is_generated_from_the_committed_files():
    want = results_index(RESULTS)
    assert (RESULTS / "README.md").read_text(encoding="utf-8") == want, (
        "results/README.md differs from `normlab report --index results`: regenerate it"
    )
    for name in EXPERIMENTS:
        assert f"[{name}]({name}/report.md)" in want


def test_readme_quickstart_table_is_generated_from_the_committed_result():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = text.index(QS_START) + len(QS_START), text.index(QS_END)
    assert text[start:end].strip() == quickstart_table(RESULTS).strip(), (
        "the README's quickstart table differs from results/quickstart: run "
        "`normlab report --index results --readme README.md`"
    )


def test_discussions_say_something_of_their_own():
    for name in EXPERIMENTS:
        p = RESULTS / name / "discussion.md"
        if p.is_file():
            words = len(p.read_text(encoding="utf-8").split())
            assert words >= 40, f"results/{name}/discussion.md has only {words} words"
