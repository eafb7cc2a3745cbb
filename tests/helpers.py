"""Shared helpers for harness tests: compose configs and run the CLI on a tiny model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# a model small enough that a CPU run takes seconds (middle-cycle with 3 recursions needs >= 5 layers)
MICRO_MODEL = [
    "size=tiny",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.d_ff=64",
    "model.n_layers=5",
]
MICRO = [
    *MICRO_MODEL,
    "data.seq_len=32",
    "train.micro_batch_size=4",
    "train.global_batch_tokens=256",
    "train.val_batches=2",
    "train.calibrate_batches=1",
    "train.progress=false",
]


# the whole pipeline (train -> eval -> bench) in seconds: a few steps, a few eval docs and requests
FAST_PIPELINE = [
    *MICRO,
    "train.budget.kind=steps",
    "train.budget.value=8",
    "train.log_every=2",
    "eval.limit=8",
    "eval.val_batches=2",
    "eval.demo_docs=8",
    "eval.bootstrap_iters=0",
    "bench.num_requests=4",
    "bench.gen_len_mean=6",
    "bench.gen_len_std=1",
]


def kill_after_checkpoint(proc, trainer_json: Path, timeout: float = 240) -> None:
    """SIGKILL a training process as soon as a checkpoint is complete (its trainer.json exists)."""
    import signal
    import time

    deadline = time.time() + timeout
    while not trainer_json.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert trainer_json.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from harness.config import register_configs

    register_configs()
    with initialize_config_module("conf", version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def cli_env() -> dict[str, str]:
    """The environment of a CLI run in the tests: quiet (CI), offline, one thread per process."""
    return {
        **os.environ,
        "CI": "true",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def spawn_cli(args: list[str], **popen) -> subprocess.Popen:
    """`python -m harness.main args` in the background (stdout/stderr as `popen` says, text mode)."""
    return subprocess.Popen(
        [sys.executable, "-m", "harness.main", *args], cwd=ROOT, env=cli_env(), text=True, **popen
    )


def run_cli(
    args: list[str], cwd: Path, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "harness.main", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


SLURM_CONF = ROOT / ".slurm" / "slurm.conf"  # written by scripts/local_slurm.sh


def skip_unless_local_slurm() -> None:
    """Skip the calling test (module) unless the local test cluster is configured and its controller up."""
    import pytest

    hint = "start it with `scripts/local_slurm.sh start`"
    if not SLURM_CONF.exists():
        pytest.skip(f"no local Slurm cluster ({SLURM_CONF.relative_to(ROOT)} is absent): {hint}")
    if shutil.which("sbatch") is None:
        pytest.skip(f"Slurm client tools are not installed: {hint}")
    env = {**os.environ, "SLURM_CONF": str(SLURM_CONF)}
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, env=env)
    if "UP" not in ping.stdout:
        pytest.skip(f"local Slurm is configured but its controller is not up: {hint}")
