"""End-to-end: the demo pipeline (train -> eval -> bench -> tables) at a micro scale, reruns, seeding."""

from __future__ import annotations

import csv

from analysis.cli import main as tables_main
from harness import records
from tests.helpers import FAST_PIPELINE, ROOT, run_cli

FAST = FAST_PIPELINE


def test_demo_pipeline_end_to_end(tmp_path):
    root = tmp_path / "runs"
    run_cli(["--multirun", "experiment=demo", *FAST, f"results_root={root}"], cwd=ROOT)
    runs = sorted((root / "demo").iterdir())
    assert len(runs) == 3
    families = set()
    for run in runs:
        for name in ("config.yaml", "env.json", "metrics.jsonl", "eval.jsonl", "bench.jsonl", "DONE"):
            assert (run / name).exists(), f"{run.name} lacks {name}"
        env = records.read_json(run / "env.json")
        assert env["git_sha"] and env["versions"]["torch"]
        evals = records.read_jsonl(run / "eval.jsonl")
        assert {"val", "demo_mc"} <= {r["task"] for r in evals}
        assert all(r["causal"] for r in evals)  # expert-choice is scored with its causal rule by default
        bench = records.read_jsonl(run / "bench.jsonl")
        assert bench[0]["probe"] == "decode" and bench[0]["tokens_per_s"] > 0
        families.add(records.read_json(run / "summary.json")["family"])
    assert families == {"vanilla", "recursive", "mor"}

    # a second launch finds DONE everywhere and trains nothing
    mtimes = {r: (r / "metrics.jsonl").stat().st_mtime for r in runs}
    again = run_cli(["--multirun", "experiment=demo", *FAST, f"results_root={root}"], cwd=ROOT)
    assert (again.stdout + again.stderr).count("DONE, skipping") == 3
    assert mtimes == {r: (r / "metrics.jsonl").stat().st_mtime for r in runs}

    out = tmp_path / "tables"
    assert (
        tables_main([str(root / "demo"), "--out", str(out), "--tables", "demo", "--plots", "loss", "-q"]) == 0
    )
    rows = list(csv.DictReader((out / "tables" / "demo.csv").open()))
    assert len(rows) == 3
    assert list((out / "plots").glob("*.png"))


def test_fresh_runs_are_seeded(tmp_path):
    losses = []
    for name in ("a", "b"):
        run_cli(["stages=[train]", "model=mor_expert", *FAST, f"results_root={tmp_path / name}"], cwd=ROOT)
        (run_dir,) = (tmp_path / name / "default").iterdir()
        rows = records.read_jsonl(run_dir / "metrics.jsonl")
        losses.append([r["loss"] for r in rows])
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_git_sha_of_a_copied_tree_comes_from_the_environment(monkeypatch):
    """A copy of the tree on another machine (a lent GPU; its .git missing or stale) records the SHA
    given in MOR_GIT_SHA, and does not claim to know whether it was dirty."""
    assert records.git_info()["git_sha"]  # this checkout has git
    monkeypatch.setenv("MOR_GIT_SHA", "ab" * 20)
    assert records.git_info() == {"git_sha": "ab" * 20, "git_dirty": None}
    monkeypatch.delenv("MOR_GIT_SHA")

    def no_git(*a, **k):
        raise OSError("git: not found")

    monkeypatch.setattr(records.subprocess, "run", no_git)
    assert records.git_info() == {"git_sha": None, "git_dirty": None}
