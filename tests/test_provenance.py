"""Provenance of results (git state, sha256 of the experiment file), the staleness check, the
generated results index, and labels that name the data a small-scale run used."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from normlab.analysis._plot import figure_caption, new_figure, save_figure
from normlab.experiments import find_experiment, run_experiment
from normlab.provenance import git_state, provenance, sha256_of
from normlab.report import write_report
from normlab.report.index import result_problems, results_index
from normlab.report.labels import data_name, run_label
from normlab.report.metrics import load_suite_data

TINY = ["train.steps=2", "model.kwargs.width=0.25"]


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.fixture
def repo(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    r = tmp_path / "repo"
    r.mkdir()
    _git(r, "init", "-q")
    _git(r, "config", "user.email", "t@example.com")
    _git(r, "config", "user.name", "t")
    (r / "a.txt").write_text("one\n")
    _git(r, "add", "a.txt")
    _git(r, "commit", "-qm", "first")
    return r


def test_git_state_reports_the_commit_and_tracked_changes_only(repo):
    st = git_state(repo)
    assert st == {"git_commit": _git(repo, "rev-parse", "HEAD"), "git_dirty": False}
    (repo / "new.txt").write_text("untracked\n")  # untracked files do not make it dirty
    assert git_state(repo)["git_dirty"] is False
    (repo / "a.txt").write_text("two\n")
    assert git_state(repo)["git_dirty"] is True


def test_git_state_never_reports_an_enclosing_repository(repo):
    sub = repo / "sub"
    sub.mkdir()
    assert git_state(sub) == {"git_commit": None, "git_dirty": None}
    assert git_state(repo.parent / "nowhere") == {"git_commit": None, "git_dirty": None}


def test_provenance_hashes_the_experiment_file(tmp_path):
    f = tmp_path / "e.toml"
    f.write_bytes(b"[experiment]\ntitle = 'x'\n")
    rec = provenance("cpu", f)
    assert rec["experiment_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert rec["experiment_file"] == "e.toml" and rec["device"] == "cpu"
    assert rec["torch"] and rec["normlab"]


def _tiny_result(tmp_path: Path) -> tuple[Path, Path, str]:
    """A one-run result of a copy of the quickstart file: (results dir, experiment file, name)."""
    exp = tmp_path / "qs_copy.toml"
    shutil.copyfile(find_experiment("quickstart"), exp)
    runs = tmp_path / "runs"
    suite = run_experiment(exp, runs, seeds=1, variants=["bn"], overrides=TINY)
    assert suite["provenance"]["experiment_sha256"] == sha256_of(exp)
    env = json.loads((runs / "bn" / "seed0" / "env.json").read_text())
    assert {"git_commit", "git_dirty"} <= set(env)
    results = tmp_path / "results"
    write_report(runs, results / "qs_copy")
    (results / "qs_copy" / "discussion.md").write_text("A reading of our own.\n")
    return results, exp, "qs_copy"


def _set_provenance(results: Path, name: str, **kv) -> None:
    p = results / name / "results.json"
    res = json.loads(p.read_text())
    res["provenance"].update(kv)
    p.write_text(json.dumps(res))


def test_results_json_records_provenance_and_a_changed_experiment_file_makes_it_stale(
    tmp_path, monkeypatch
):
    results, exp, name = _tiny_result(tmp_path)
    monkeypatch.setenv("NORMLAB_EXPERIMENTS", str(tmp_path))  # where the index finds qs_copy
    res = json.loads((results / name / "results.json").read_text())
    prov = res["provenance"]
    assert prov["experiment_sha256"] == sha256_of(exp)
    assert prov["device"] == "cpu" and prov["torch"]
    assert res["data"] == data_name("digits")
    _set_provenance(results, name, git_commit="a" * 40, git_dirty=False, mixed=False)
    assert result_problems(results, name, exp) == []
    exp.write_text(exp.read_text() + "\n# an edit\n")
    probs = result_problems(results, name, exp)
    assert len(probs) == 1 and "stale" in probs[0]
    assert "stale" in results_index(results, {name: ""})


def test_result_problems_name_dirty_code_missing_files_and_figures(tmp_path):
    results, exp, name = _tiny_result(tmp_path)
    _set_provenance(results, name, git_commit="b" * 40, git_dirty=True, mixed=False)
    assert any("uncommitted" in p for p in result_problems(results, name, exp))
    _set_provenance(results, name, git_dirty=False, mixed=True)
    assert any("more than one code state" in p for p in result_problems(results, name, exp))
    _set_provenance(results, name, mixed=False)
    figs = list((results / name).glob("*.png"))
    assert figs
    figs[0].unlink()
    assert any("missing figure" in p for p in result_problems(results, name, exp))
    (results / name / "discussion.md").unlink()
    assert any("discussion.md is missing" in p for p in result_problems(results, name, exp))
    assert result_problems(results, "never_run", exp) == [
        "never_run/report.md is missing",
        "never_run/results.json is missing",
        "never_run/discussion.md is missing",
    ]


def test_results_index_rows_count_claims_and_quote_the_discussion(tmp_path):
    results = tmp_path / "results"
    d = results / "mode_small_batch"
    d.mkdir(parents=True)
    claims = [
        {"text": "MGN beats GN", "ours": "31.0 vs 32.0 (p = 0.01)", "holds": True},
        {"text": "MN beats BN", "ours": "30.0 vs 29.0 (p = 0.4)", "holds": False, "note": "n.s."},
    ]
    res = {"experiment": "mode_small_batch", "scale": "small", "seeds": 2, "claims": claims}
    res["data"] = "four-domain 8×8 digits"
    (d / "results.json").write_text(json.dumps(res))
    (d / "discussion.md").write_text(
        "# Title\n\n**In short.** First paragraph\nof two lines.\n\nSecond.\n"
    )
    text = results_index(results, {"mode_small_batch": "", "mode_multitask": ""})
    row = next(line for line in text.splitlines() if line.startswith("| [mode_small_batch]"))
    assert "**1 of 2 checked claims hold**" in row
    assert "✓ MGN beats GN (31.0 vs 32.0 (p = 0.01));" in row
    assert "✗ MN beats BN (30.0 vs 29.0 (p = 0.4), n.s.);" in row
    assert "First paragraph of two lines." in row and "Second." not in row
    assert "In short" not in row
    assert "small: four-domain 8×8 digits, 2 seeds" in row
    assert "| mode_multitask |" in text and "**no committed result**" in text


def test_labels_name_the_data_that_ran_beside_the_papers_group(tmp_path):
    runs = tmp_path / "runs"
    run_experiment("mixture_cifar_cnn", runs, seeds=1, variants=["c100-BN-2"], overrides=TINY[:1])
    data = load_suite_data(runs)
    want = (
        "CIFAR-100 rows (Kalayeh & Shah, Tables 2-3, Fig. 2-3), run on scikit-learn's 8×8 "
        "digits, small scale"
    )
    assert run_label(data, "CIFAR-100") == want
    report = write_report(runs, tmp_path / "out").read_text()
    assert f"Ours: {want}" in report
    assert "| max. acc. (%) (ours on digits, small) | max. acc. (%) (paper) |" in report


def test_figure_caption_titles_untitled_figures_only(tmp_path):
    fig, _ = new_figure()
    with figure_caption("run on digits, small scale"):
        save_figure(fig, tmp_path / "a.png")
    assert fig.get_suptitle() == "run on digits, small scale"
    fig2, _ = new_figure()
    fig2.suptitle("own title")
    with figure_caption("run on digits"):
        save_figure(fig2, tmp_path / "b.png")
    assert fig2.get_suptitle() == "own title"
    fig3, _ = new_figure()
    save_figure(fig3, tmp_path / "c.png")
    assert fig3.get_suptitle() == ""


def test_a_sweep_resumed_on_other_code_keeps_the_earlier_provenance_and_reads_mixed(tmp_path):
    runs = tmp_path / "runs"
    run_experiment("quickstart", runs, seeds=1, variants=["bn"], overrides=TINY)
    suite_path = runs / "suite.json"
    suite = json.loads(suite_path.read_text())
    earlier = {**suite["provenance"], "git_commit": "c" * 40}  # as if made by another commit
    suite["provenance"] = earlier
    suite_path.write_text(json.dumps(suite))
    again = run_experiment("quickstart", runs, seeds=1, variants=["bn"], overrides=TINY)
    assert [r["status"] for r in again["runs"]] == ["skipped"]
    assert again["provenance_history"] == [earlier]
    prov = json.loads((runs / "suite.json").read_text())["provenance"]
    assert prov["git_commit"] != "c" * 40
    write_report(runs, tmp_path / "out")
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["provenance"]["mixed"] is True and "c" * 40 in res["provenance"]["run_commits"]
