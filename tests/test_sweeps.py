"""Sweeps without Slurm: the paper-grid presets plan to the paper's numbers, errors surface before any
submission, the size-aware launcher groups and skips correctly, locks keep concurrent sweeps from
training a run twice, partial failures rerun only what is missing, and mor-status reads a results tree.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus

from harness import records
from harness.plan import PlanError, expand, plan
from harness.plan import main as plan_main
from harness.status import main as status_main
from harness.status import run_state
from harness.sweeps import MorSlurmLauncher, check_batch, validate_resources
from models import ConfigError
from tests.helpers import FAST_PIPELINE, ROOT, run_cli, spawn_cli

FAST = FAST_PIPELINE

# Table 9 (reference/paper.md 6.1): training tokens (B) per (size, family, budget)
TABLE9_TOKENS = {
    "135m": {"vanilla": (6.5, 16.1, 53.3), "recursive": (6.1, 15.1, 50.0), "mor": (9.2, 23.1, 76.2)},
    "360m": {"vanilla": (2.4, 6.0, 19.8), "recursive": (2.4, 6.0, 19.8), "mor": (3.6, 9.0, 29.7)},
    "730m": {"vanilla": (1.2, 3.1, 10.1), "recursive": (1.2, 3.1, 10.1), "mor": (1.8, 4.5, 14.9)},
    "1.7b": {"vanilla": (0.6, 1.5, 4.8), "recursive": (0.5, 1.3, 4.5), "mor": (0.8, 2.0, 6.5)},
}
BUDGETS = (2.0e18, 5.0e18, 16.5e18)


def test_isoflop_plan_lists_36_runs_with_the_papers_budgets(tmp_path):
    rows = plan(["experiment=isoflop", f"results_root={tmp_path}"])
    assert len(rows) == 36
    assert len({r.run_dir for r in rows}) == 36
    assert all(Path(r.run_dir).parent == tmp_path / "isoflop" for r in rows)
    seen = set()
    for r in rows:
        family = r.family.split("/")[0]
        assert r.budget_kind == "flops" and r.budget_value in BUDGETS
        seen.add((r.size, family, r.budget_value))
        paper = TABLE9_TOKENS[r.size][family][BUDGETS.index(r.budget_value)]
        assert r.tokens / 1e9 == pytest.approx(paper, abs=0.06), (r.size, family, r.budget_value)
        # the budget is spent: steps x tokens/step x FLOPs/token is within one step of it
        assert r.budget_value - r.tokens * r.flops_per_token_paper < 2097152 * r.flops_per_token_paper
        assert r.state == "pending" and r.gpu_hours > 0
    assert len(seen) == 36
    # warmup: 5% of the steps this model takes at the smallest budget (released 360M configs: 57 / 86)
    warm = {(r.size, r.family): r.warmup_steps for r in rows}
    assert warm[("360m", "vanilla")] == 57 and warm[("360m", "mor/expert_choice")] == 86


def test_table3_plan_has_every_row(tmp_path):
    rows = {Path(r.run_dir).name: r for r in plan(["experiment=table3", f"results_root={tmp_path}"])}
    assert len(rows) == 12
    # steps of the released 360M configs at 16.5e18 (ours floor the budget: at most one step fewer)
    released = {
        "vanilla": 9438,
        "recursive_r2": 9438,
        "recursive_r3": 9438,
        "recursive_r4": 8883,
        "mor_expert_r2": 12619,
        "mor_expert_r3": 14161,
        "mor_expert_r4": 14216,
        "mor_token_r3": 14161,
        "mor_expert_r3_kv_share": 14672,
    }
    for name, steps in released.items():
        r = rows[f"row=table3_{name}"]
        assert r.size == "360m" and r.budget_value == 16.5e18
        assert steps - 1 <= r.steps <= steps, name
    assert rows["row=table3_recursive_r4"].num_recursions == 4
    assert rows["row=table3_mor_token_r3"].family == "mor/token_choice"
    # non-embedding params of the Table 3 column: 315M, 167M, 118M, 98M
    for name, params in (
        ("vanilla", 315),
        ("mor_expert_r2", 167),
        ("mor_expert_r3", 118),
        ("mor_expert_r4", 98),
    ):
        assert rows[f"row=table3_{name}"].params_unique_nonemb / 1e6 == pytest.approx(params, rel=0.01)
    # fixed 20B tokens: the vanilla run's tokens, and the effective FLOPs the table prints (12.3, 11.0, 11.0)
    for r_, flops in ((2, 12.3), (3, 11.0), (4, 11.0)):
        r = rows[f"row=table3_mor_expert_r{r_}_20b"]
        assert r.budget_kind == "tokens" and r.tokens == rows["row=table3_vanilla"].tokens
        assert r.tokens * r.flops_per_token_paper / 1e18 == pytest.approx(flops, abs=0.05)


@pytest.mark.parametrize(
    "experiment, n_runs",
    [("sharing", 16), ("sharing_baselines", 6), ("routing", 27), ("kv", 12), ("demo", 3), ("routers", 7)],
)
def test_every_preset_plans(tmp_path, experiment, n_runs):
    rows = plan([f"experiment={experiment}", f"results_root={tmp_path}"])
    assert len(rows) == n_runs and len({r.run_dir for r in rows}) == n_runs


def test_sharing_layouts_follow_table10(tmp_path):
    """Non-embedding params of Table 10: the per-recursion block is rounded down (mor.floor_block)."""
    rows = plan(["experiment=sharing", f"results_root={tmp_path}", "size=360m", "model.num_recursions=3"])
    params = {r.overrides.split("model.sharing=")[1].split()[0]: r.params_unique_nonemb / 1e6 for r in rows}
    assert params == pytest.approx(
        {"cycle": 98, "sequence": 98, "middle_cycle": 118, "middle_sequence": 118}, rel=0.01
    )
    rows = plan(["experiment=sharing", f"results_root={tmp_path}", "size=135m", "model.sharing=middle_cycle"])
    assert sorted(round(r.params_unique_nonemb / 1e6) for r in rows) == [39, 57]


def test_sweep_over_an_unknown_key_fails_before_anything_runs(tmp_path, capsys):
    assert plan_main(["experiment=isoflop", "train.bogus=1,2", f"results_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "train.bogus" in err and "sweep point #0" in err
    # and mor-run itself: Hydra composes every sweep point before launching the first
    proc = run_cli(
        ["--multirun", "experiment=demo", "train.bogus=1,2", f"results_root={tmp_path}"], ROOT, check=False
    )
    assert proc.returncode != 0 and "bogus" in proc.stderr
    assert not list(tmp_path.rglob("config.yaml"))


def test_launcher_preset_with_an_unknown_key_fails(tmp_path, capsys):
    assert plan_main(["experiment=isoflop", "hydra/launcher=slurm", "hydra.launcher.gpus=2"]) == 2
    assert "hydra.launcher.gpus" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="resources.135m has unknown key.*gpu"):
        validate_resources({"135m": {"gpu": 2}})
    with pytest.raises(ConfigError, match="gpus"):
        MorSlurmLauncher(submitit_folder="x", resources={"360m": {"gpus": 2}})
    # a per-size GPU count the global batch does not split over
    (job,) = expand(["experiment=table3", "row=table3/vanilla"])
    check_batch(job.cfg, 8, "here")
    with pytest.raises(ConfigError, match="not divisible.*3 processes"):
        check_batch(job.cfg, 3, "here")


def test_results_root_not_writable_fails(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PlanError, match="not a directory"):
        plan(["experiment=demo", f"results_root={blocker / 'runs'}"])
    with pytest.raises(PlanError, match="not writable"):
        plan(["experiment=demo", "results_root=/proc/mor-bench-runs"])


def test_slurm_launcher_groups_by_size_and_skips_finished(tmp_path, monkeypatch):
    """One array per distinct per-size request; DONE and retry-exhausted runs are not submitted."""
    from hydra import initialize_config_module
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import HydraContext, RunMode
    from omegaconf import OmegaConf

    args = ["experiment=isoflop", "hydra/launcher=slurm", f"results_root={tmp_path}"]
    jobs = expand([*args, "size=135m,1.7b", "model=vanilla", "train.budget.value=2e18,5e18"])
    assert len(jobs) == 4
    done, failed = jobs[0].run_dir, jobs[1].run_dir  # 135m at 2e18 and 5e18
    done.mkdir(parents=True)
    (done / "DONE").write_text("")
    failed.mkdir(parents=True)
    (failed / "FAILED").write_text("boom")
    records.write_json(failed / "attempts.json", {"failed": 2})

    submitted = []

    class FakeJob:
        def __init__(self, overrides):
            self.overrides = overrides

        def results(self):
            return [JobReturn(overrides=self.overrides, status=JobStatus.COMPLETED, _return_value="done")]

    class FakeExecutor:
        def __init__(self, params):
            self.params = params

        def map_array(self, fn, *lists):
            submitted.append((self.params, [a[0] for a in zip(*lists, strict=True)]))
            return [FakeJob(a[0]) for a in zip(*lists, strict=True)]

    monkeypatch.setattr(MorSlurmLauncher, "_executor", lambda self, params: FakeExecutor(params))
    GlobalHydra.instance().clear()
    with initialize_config_module("conf", version_base="1.3"):
        gh = GlobalHydra.instance().hydra
        master = gh.compose_config("config", [*args, "model=vanilla"], run_mode=RunMode.MULTIRUN)
        node = OmegaConf.to_container(master.hydra.launcher, resolve=True)
        node.pop("_target_")
        launcher = MorSlurmLauncher(**node)
        launcher.setup(
            hydra_context=HydraContext(config_loader=gh.config_loader, callbacks=Callbacks()),
            task_function=lambda cfg: None,
            config=master,
        )
        results = launcher.launch([j.overrides for j in jobs], initial_job_idx=0)
    assert [r.return_value for r in results] == ["skipped", "failed", "done", "done"]
    assert len(submitted) == 1  # only the 1.7b runs remain: one array with the 1.7b requests
    params, overrides = submitted[0]
    assert params["gpus_per_node"] == 8 and params["tasks_per_node"] == 8 and params["mem_gb"] == 512
    assert all("size=1.7b" in " ".join(o) for o in overrides) and len(overrides) == 2
    # the executor it would build maps fields as hydra-submitit-launcher does (submitit wants an
    # `srun` on PATH to build one; a machine without Slurm gets a stand-in that is never run)
    monkeypatch.undo()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    ex = MorSlurmLauncher._executor(launcher, {**params, "submitit_folder": str(tmp_path / "%j")})
    assert ex._executor.parameters["ntasks_per_node"] == 8 and ex._executor.parameters["mem"] == "512GB"
    assert ex._executor.max_num_timeout == params["max_num_timeout"]


def _hold_lock(run_dir: Path):
    """A subprocess holding the run's lock, as a running job does; returns it once the lock is held."""
    code = (
        "import sys, time; from pathlib import Path; from harness.main import RunLock\n"
        "with RunLock(Path(sys.argv[1])) as ok:\n    print(ok, flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "True"
    return proc


def test_locked_run_is_skipped_and_status_says_running(tmp_path):
    args = ["stages=[train]", *FAST, f"results_root={tmp_path}"]
    (job,) = expand(args)
    holder = _hold_lock(job.run_dir)
    try:
        assert run_state(job.run_dir).state == "running"
        proc = run_cli(args, ROOT)
        assert "locked by another job" in proc.stdout + proc.stderr
        assert not (job.run_dir / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    run_cli(args, ROOT)
    assert run_state(job.run_dir).state == "trained"


def test_two_concurrent_sweeps_train_each_run_once(tmp_path):
    args = [
        "--multirun",
        "model=vanilla,mor_expert",
        *FAST,
        "train.budget.value=60",
        f"results_root={tmp_path}",
    ]
    procs = [spawn_cli(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = sorted((tmp_path / "default").iterdir())
    assert len(runs) == 2 and all((r / "DONE").exists() for r in runs)
    # every (process, run) pair either trained the run or skipped it (DONE or locked): 4 pairs, 2 trainings
    text = "".join(outs)
    assert text.count("DONE, skipping") + text.count("locked by another job") == 2, text[-3000:]
    for r in runs:
        steps = [row["step"] for row in records.read_jsonl(r / "metrics.jsonl")]
        assert steps == sorted(set(steps)) and steps[-1] == 60


def test_rerun_after_partial_failure_runs_only_what_is_missing(tmp_path):
    args = ["--multirun", "train.lr=3e-3,nan", *FAST, "train.max_retries=2", f"results_root={tmp_path}"]
    first = run_cli(args, ROOT, check=False)
    assert first.returncode != 0  # the nan-lr run failed
    runs = {p.name: run_state(p) for p in (tmp_path / "default").iterdir()}
    states = {k: s.state for k, s in runs.items()}
    ok = next(k for k, s in runs.items() if "train.lr=0.003" in s.overrides)
    bad = next(k for k, s in runs.items() if "train.lr=nan" in s.overrides)
    assert states == {ok: "done", bad: "failed"}
    second = run_cli(args, ROOT, check=False)  # the done run is skipped, the failed one retried
    assert second.returncode != 0 and (second.stdout + second.stderr).count("DONE, skipping") == 1
    assert records.read_json(tmp_path / "default" / bad / "attempts.json")["failed"] == 2
    third = run_cli(args, ROOT)  # out of retries: left FAILED, not retried forever
    assert "not retrying" in third.stdout + third.stderr
    assert records.read_json(tmp_path / "default" / bad / "attempts.json")["failed"] == 2


def _run(root: Path, name: str, files: dict) -> Path:
    d = root / "exp" / name
    d.mkdir(parents=True)
    for rel, content in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content if isinstance(content, str) else json.dumps(content))
    return d


def test_status_over_a_results_tree(tmp_path, capsys):
    summary = {"steps": 100, "budget": {"kind": "tokens", "value": 25600}, "tokens_per_step": 256}
    metrics = "".join(
        json.dumps({"step": s, "tokens": 256 * s, "loss": 5.0 - s / 100}) + "\n" for s in (10, 40)
    )
    ckpt = {"checkpoints/step_00000040/trainer.json": {"step": 40, "finished": False}}
    over = "overrides:\n- model=vanilla\n- train.lr=nan\nexperiment: exp\nrun_name: failed\n"
    _run(tmp_path, "done", {"DONE": "", "summary.json": summary, "metrics.jsonl": metrics})
    _run(
        tmp_path,
        "failed",
        {"FAILED": "ValueError: lr\n", "attempts.json": {"failed": 2}, "overrides.yaml": over},
    )
    _run(tmp_path, "preempted", {"summary.json": summary, "metrics.jsonl": metrics, **ckpt})
    _run(
        tmp_path,
        "trained",
        {
            "checkpoints/step_00000100/trainer.json": {"finished": True},
            "slurm.json": {"current": {"job": "7_3"}},
        },
    )
    _run(tmp_path, "pending", {"overrides.yaml": "overrides: []\n"})
    running = _run(tmp_path, "running", {"summary.json": summary, **ckpt})
    fd = os.open(running / ".lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        states = {
            p: run_state(tmp_path / "exp" / p)
            for p in ("done", "failed", "preempted", "trained", "pending", "running")
        }
        assert {k: s.state for k, s in states.items()} == {k: k for k in states}
        pre = states["preempted"]
        assert pre.progress == 0.4 and pre.last_loss == pytest.approx(4.6) and pre.done_units == 10240
        assert states["trained"].slurm_job == "7_3"
        assert states["failed"].error == "ValueError: lr" and states["failed"].retries_left == 0
        assert status_main([str(tmp_path), "--experiment", "exp"]) == 0
        out = capsys.readouterr().out
        assert "40% (40/100)" in out and "6 runs:" in out and "1 running" in out
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert status_main([str(tmp_path), "--state", "failed", "--resubmit-failed"]) == 0
    out = capsys.readouterr().out
    assert "mor-run model=vanilla train.lr=nan" in out and "preempted" not in out
    assert records.read_json(tmp_path / "exp" / "failed" / "attempts.json") == {"failed": 0, "resets": [2]}


def test_status_lists_not_started_runs_of_a_preset(tmp_path, capsys):
    assert status_main([str(tmp_path), "--experiment", "demo", "--sweep"]) == 0
    out = capsys.readouterr().out
    assert "3 runs: 3 pending" in out and "demo/model=mor_expert" in out


def test_run_finished_while_waiting_for_its_lock_is_skipped(tmp_path):
    """The DONE check is repeated under the lock: a job that gets the lock just after another job
    finished the run must not train it again."""
    import threading
    import time

    from harness.main import RunLock, run
    from tests.helpers import compose

    cfg = compose([*FAST_PIPELINE, "stages=[train,eval,bench]", f"results_root={tmp_path}", "run_name=r"])
    run_dir = tmp_path / "default" / "r"
    result = {}
    with RunLock(run_dir):
        worker = threading.Thread(target=lambda: result.update(state=run(cfg)))
        worker.start()
        time.sleep(0.3)  # the worker is now waiting (up to 1 s) for the lock
        records.atomic_write_text(run_dir / "DONE", "")
    worker.join(60)
    assert result == {"state": "skipped"} and not (run_dir / "metrics.jsonl").exists()
