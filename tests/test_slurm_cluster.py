"""End-to-end checks against the real single-node Slurm of ``scripts/local_slurm.sh``.

    scripts/local_slurm.sh start
    SLURM_CONF=$PWD/.slurm/slurm.conf pytest -m slurm tests/test_slurm_cluster.py -q

submitit shells out to sbatch/squeue/sacct/scontrol/scancel, so the tests point ``SLURM_CONF`` at
``.slurm/slurm.conf`` for the whole module.  Both tests need real accounting: without slurmdbd,
``sacct`` fails and submitit reports every state as UNKNOWN.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from submitit.helpers import Checkpointable

from tests.helpers import SLURM_CONF, skip_unless_local_slurm

pytestmark = pytest.mark.slurm


# The job runs `python -m submitit.core._submit` from the submission directory, where this test
# module is not importable: ship its functions and classes by value instead of by reference.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def local_slurm():
    skip_unless_local_slurm()
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(SLURM_CONF))
    yield
    mp.undo()


def _executor(folder: Path, name: str) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, slurm_max_num_timeout=2)
    assert executor.cluster == "slurm", "sbatch is on PATH, AutoExecutor should pick Slurm"
    executor.update_parameters(
        name=name, slurm_partition="debug", timeout_min=3, cpus_per_task=1, slurm_signal_delay_s=30
    )
    return executor


def _wait_done(job: submitit.Job, timeout_s: float) -> None:
    """job.done() with a deadline, so a stuck job fails the test instead of hanging it."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout_s:.0f} s (state {job.state})")
        time.sleep(0.5)


def _final_state(job: submitit.Job, timeout_s: float = 30) -> str:
    """The accounting state once the job has left the active states.

    The result pickle is written before the job step exits, so sacct can say RUNNING or
    COMPLETING for a moment after result() returned.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        state = job.watcher.get_state(job.job_id, mode="force")
        if state not in {"PENDING", "RUNNING", "COMPLETING", "REQUEUED", "CONFIGURING"}:
            return state
        if time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def _square_on(x: int) -> tuple[int, str]:
    return x * x, socket.gethostname()


def test_submit_function_and_get_result(tmp_path):
    job = _executor(tmp_path / "submitit", "mor-slurm-result").submit(_square_on, 7)
    _wait_done(job, timeout_s=60)
    value, host = job.result()
    assert value == 49
    assert host == socket.gethostname()
    # UNKNOWN here would mean sacct cannot see the job: accounting (slurmdbd) is not working.
    assert _final_state(job) == "COMPLETED"
    assert job.state == "COMPLETED"


class StepCounter(Checkpointable):
    """Appends one line per step to a progress file, one step a second, resumable.

    Its state (`next_step`) travels through submitit's checkpoint: on USR2, submitit pickles
    this object as it is, requeues the job, and the requeued job calls it again.
    """

    def __init__(self, progress: str, n_steps: int) -> None:
        self.progress = progress
        self.n_steps = n_steps
        self.next_step = 0

    def __call__(self) -> int:
        with open(self.progress + ".starts", "a") as f:
            f.write(f"{self.next_step}\n")
        for step in range(self.next_step, self.n_steps):
            time.sleep(1.0)  # USR2 lands here almost always
            # Hold USR2 back while a step is written and counted, so a checkpoint never sees a
            # step that is on disk but not counted (duplicated on resume), or the reverse (lost).
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
            try:
                with open(self.progress, "a") as f:
                    f.write(f"{step}\n")
                    f.flush()
                    os.fsync(f.fileno())
                self.next_step = step + 1
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
        return self.next_step


def _lines(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_checkpoint_requeue_resume(tmp_path):
    n_steps = 8
    progress = tmp_path / "progress.txt"
    job = _executor(tmp_path / "submitit", "mor-slurm-requeue").submit(StepCounter(str(progress), n_steps))

    deadline = time.monotonic() + 60
    while len(_lines(progress)) < 3:
        if time.monotonic() > deadline or job.done():
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} did not make 3 steps in 60 s (state {job.state})")
        time.sleep(0.2)

    job._interrupt()  # SIGTERM (ignored by submitit), then USR2: checkpoint, requeue, exit
    t_interrupt = time.monotonic()
    _wait_done(job, timeout_s=90)
    assert job.result() == n_steps
    resume_s = time.monotonic() - t_interrupt

    steps = _lines(progress)
    starts = _lines(Path(str(progress) + ".starts"))
    assert steps == list(range(n_steps)), f"steps duplicated or lost: {steps}"
    assert len(starts) == 2, f"expected one interrupted run and one resumed run, got starts {starts}"
    assert starts[0] == 0 and 3 <= starts[1] < n_steps, starts
    assert _final_state(job) == "COMPLETED"
    print(f"interrupt -> result: {resume_s:.1f} s (resumed at step {starts[1]})")
