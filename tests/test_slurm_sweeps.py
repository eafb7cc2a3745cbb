"""Sweeps through `hydra/launcher=slurm_local` on the real single-node Slurm of scripts/local_slurm.sh.

    scripts/local_slurm.sh start
    SLURM_CONF=$PWD/.slurm/slurm.conf pytest -m slurm tests/test_slurm_sweeps.py -q

A 3-run multirun of micro models finishes every stage (DONE); relaunching it submits nothing, and after
one run loses its DONE only that one is submitted; a job preempted twice (USR2: checkpoint at the end of
the step and requeue through submitit; then `scontrol requeue`: SIGTERM, checkpoint, Slurm requeues)
finishes with the losses of an uninterrupted run; a 2-task job trains data parallel (rank/world from
Slurm). About 2.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import records
from harness.status import run_state
from tests.helpers import FAST_PIPELINE, MICRO, ROOT, SLURM_CONF, cli_env, skip_unless_local_slurm

pytestmark = pytest.mark.slurm

FAST = [o for o in FAST_PIPELINE if not o.startswith(("train.budget.value=", "train.log_every="))] + [
    "train.budget.value=20",
    "train.log_every=5",
]
SWEEP = ["--multirun", "hydra/launcher=slurm_local", "model=vanilla,recursive,mor_expert", *FAST]


@pytest.fixture(scope="module", autouse=True)
def local_slurm():
    skip_unless_local_slurm()


def _env() -> dict:
    return {**cli_env(), "SLURM_CONF": str(SLURM_CONF)}


def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "harness.main", *args]


def _mor_run(args: list[str], timeout: int = 180) -> str:
    proc = subprocess.run(_cmd(args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def _runs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "default").iterdir() if p.is_dir())


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records.read_jsonl(run / "metrics.jsonl")}


def _wait(cond, timeout: float, what: str, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("sweep")
    return root, _mor_run([*SWEEP, f"results_root={root}"])


def test_sweep_finishes_and_a_relaunch_submits_only_what_is_missing(sweep_root):
    root, out = sweep_root
    assert "submitting 3 of 3 runs in 1 array(s)" in out
    runs = _runs(root)
    assert len(runs) == 3
    jobs = set()
    for run in runs:
        st = run_state(run)
        assert st.state == "done" and st.progress == 1.0, run
        assert st.slurm_job and "_" in st.slurm_job  # array task id, e.g. 12_0
        jobs.add(st.slurm_job)
        assert (run / "eval.jsonl").exists() and (run / "bench.jsonl").exists()
    assert len(jobs) == 3
    # everything DONE: nothing is submitted
    again = _mor_run([*SWEEP, f"results_root={root}"])
    assert "submitting 0 of 3 runs in 0 array(s), 3 done" in again
    # one run lost its DONE (e.g. its evaluation was deleted): only it is submitted, its training reused
    mtimes = {r: (r / "metrics.jsonl").stat().st_mtime for r in runs}
    (runs[1] / "DONE").unlink()
    third = _mor_run([*SWEEP, f"results_root={root}"])
    assert "submitting 1 of 3 runs in 1 array(s), 2 done" in third
    assert all(run_state(r).state == "done" for r in runs)
    assert mtimes == {r: (r / "metrics.jsonl").stat().st_mtime for r in runs}


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(tmp_path):
    steps = 1500
    args = [
        "stages=[train]",
        "model=mor_expert",
        *MICRO,
        "train.budget.kind=steps",
        f"train.budget.value={steps}",
        "train.log_every=10",
        "train.ckpt_every=1000",
        "train.keep_checkpoints=10",
    ]
    env = _env()
    ref = subprocess.Popen(
        _cmd([*args, f"results_root={tmp_path / 'ref'}"]),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    root = tmp_path / "slurm"
    sweep = subprocess.Popen(
        _cmd(["--multirun", "hydra/launcher=slurm_local", *args, f"results_root={root}"]),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        run = _wait(
            lambda: next(iter(_runs(root)), None) if (root / "default").exists() else None, 60, "the run dir"
        )

        def history():
            path = run / "slurm.json"
            return json.loads(path.read_text())["history"] if path.exists() else []

        def last_step():
            rows = records.read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
            return rows[-1]["step"] if rows else 0

        # 1) USR2, as Slurm sends before the time limit: checkpoint at the end of the step, submitit requeues
        _wait(lambda: history() and last_step() >= 150, 90, "the job to train 150 steps")
        job = history()[-1]["job"]
        subprocess.run(["scancel", "--signal=USR2", job], env=env, check=True)
        _wait(lambda: len(history()) >= 2, 120, "the requeued job to start")
        first_stop = int(records.checkpoint_dirs(run)[-1].name.split("_")[1])  # the USR2 checkpoint
        # 2) `scontrol requeue` (SIGTERM, which submitit ignores): checkpoint, Slurm requeues the job itself
        _wait(lambda: last_step() >= first_stop + 100, 90, "100 more steps")
        subprocess.run(["scontrol", "requeue", job], env=env, check=True)
        out = sweep.communicate(timeout=240)[0]
    finally:
        if sweep.poll() is None:
            sweep.kill()
        ref_err = ref.communicate(timeout=240)[1]
    assert sweep.returncode == 0, out[-5000:]
    assert ref.returncode == 0, ref_err[-3000:]
    assert [h["restart_count"] for h in history()] == [0, 1, 2]
    stops = [int(p.name.split("_")[1]) for p in records.checkpoint_dirs(run)]
    stopped_at = [s for s in stops if s % 1000 and s != steps]  # saved at the end of the signalled step
    assert len(stopped_at) == 2, stops
    assert stops[-1] == steps and run_state(run).state == "trained"
    (ref_run,) = _runs(tmp_path / "ref")
    got, want = _losses(run), _losses(ref_run)
    # the preempted run also logged the two signalled steps; every regular row is the reference's
    assert set(got) - set(want) <= set(stopped_at) and len(want) == steps // 10
    assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-6, abs=0)


def test_two_task_job_trains_data_parallel(sweep_root, tmp_path):
    root, _ = sweep_root
    _mor_run(
        [
            "--multirun",
            "hydra/launcher=slurm_local",
            "hydra.launcher.tasks_per_node=2",
            "model=mor_expert",
            *FAST,
            f"results_root={tmp_path}",
        ]
    )
    (run,) = _runs(tmp_path)
    assert run_state(run).state == "done"
    assert records.read_json(run / "summary.json")["world_size"] == 2
    assert json.loads((run / "slurm.json").read_text())["current"]["ntasks"] == 2
    single = next(r for r in _runs(root) if records.read_json(r / "summary.json")["family"] == "mor")
    assert _losses(run) == pytest.approx(_losses(single), rel=1e-4)
