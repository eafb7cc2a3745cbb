"""Hydra entry points. One job = one run directory; stages train -> eval -> bench.

    mor-run   experiment=demo -m            # every stage, a multirun over the preset's models
    mor-train model=mor_expert size=tiny    # train only (stages=[train])
    mor-eval  "run_dir='results/runs/demo/model=vanilla'" eval=paper
    mor-bench model=mor_expert size=small bench.weights=random

The run directory is derived from the overrides that define the run (not from eval/bench keys),
so every entry point finds the same place. Run names contain `=` and `,`, so a `run_dir=` value
is quoted for Hydra's override parser as above. A job that trains skips a run with `DONE`;
mor-eval / mor-bench on a finished run evaluate or probe it again. A run with a checkpoint resumes;
a lock file keeps two jobs from working on one run at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from models import ConfigError

from . import records
from .config import STAGES, register_configs, run_dir_of, run_name_from_overrides

log = logging.getLogger("mor")
register_configs()


class RunLock:
    """Exclusive lock on <run_dir>/.lock (released when the process dies).

    Tries for `wait_s` seconds (a `mor-status` probe holds a shared lock for an instant), then gives up:
    another job is working on the run."""

    def __init__(self, run_dir: Path, wait_s: float = 1.0):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        self.fd = None
        self.wait_s = wait_s

    def __enter__(self) -> bool:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    self.fd = None
                    return False
                time.sleep(0.1)

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def resolve_run(cfg: DictConfig) -> Path:
    if cfg.run_name is None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        with open_dict(cfg):
            cfg.run_name = run_name_from_overrides(overrides)
    return run_dir_of(cfg)


def _launch_rank() -> int:
    """Global rank set by the launcher (torchrun's RANK, or Slurm's SLURM_PROCID in a multi-task job)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


def _agree(state: str | None, cfg: DictConfig) -> str | None:
    """Rank 0's go/no-go (None: go; else why not) for every rank of a data-parallel job: the other
    ranks cannot see rank 0's lock, and would otherwise wait for it in training forever."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    if world == 1:
        return state
    import torch.distributed as dist

    from .train import dist_device_kind, init_distributed, resolve_device

    info = init_distributed(dist_device_kind(cfg.train))
    resolve_device(cfg.train.device, info)  # NCCL collectives need the rank's GPU set
    box = [state]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:  # no rank trains: leave the group now (left to interpreter exit, gloo
        # aborted rank 0 once in CI: "terminate called without an active exception")
        dist.destroy_process_group()
    return box[0]


def record_job(cfg: DictConfig, run_dir: Path) -> None:
    """overrides.yaml (what recreates this run: `mor-run <overrides>`) and slurm.json (job ids, per start)."""
    if "train" in cfg.stages or not (run_dir / "overrides.yaml").exists():
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        text = OmegaConf.to_yaml(
            {"overrides": overrides, "experiment": cfg.experiment, "run_name": cfg.run_name}
        )
        records.atomic_write_text(run_dir / "overrides.yaml", text)
    env = os.environ
    if "SLURM_JOB_ID" in env:
        array = env.get("SLURM_ARRAY_JOB_ID")
        job = f"{array}_{env['SLURM_ARRAY_TASK_ID']}" if array and "SLURM_ARRAY_TASK_ID" in env else None
        current = {
            "job": job or env["SLURM_JOB_ID"],  # the id squeue/scancel/sacct show
            "job_id": env["SLURM_JOB_ID"],
            "array_job_id": array,
            "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
            "restart_count": int(env.get("SLURM_RESTART_COUNT", "0")),
            "ntasks": int(env.get("SLURM_NTASKS", "1")),
            "node": env.get("SLURMD_NODENAME"),
            "stages": list(cfg.stages),
            "time": time.time(),
        }
        path = run_dir / "slurm.json"
        history = (records.read_json(path).get("history", []) if path.exists() else [])[-49:]
        records.write_json(path, {"current": current, "history": [*history, current]})


def _after_preemption(e: Exception) -> None:
    """Training stopped on a signal with a checkpoint saved. Under submitit, requeue or leave quietly.

    SIGUSR1/SIGUSR2: hand over to the USR2 handler submitit installed (calls the launcher's
    `checkpoint()`, `scontrol requeue`s the job, exits), as if the signal had come now. SIGTERM: Slurm is
    stopping the job itself (scancel, preemption, `scontrol requeue`); exit without a result, so the
    submitting process keeps waiting for a requeued job instead of reporting this attempt as failed.
    Outside submitit the exception propagates: a rerun resumes from the checkpoint.
    """
    handler = signal.getsignal(signal.SIGUSR2)
    owner = getattr(handler, "__self__", None)
    if owner is None or not type(owner).__module__.startswith("submitit"):
        return
    signum = getattr(e, "signum", None)
    if _launch_rank() != 0 or signum == signal.SIGTERM:
        log.warning("%s; leaving it to Slurm", e)
        raise SystemExit(1) from e
    log.warning("%s; requeueing through submitit", e)
    handler(signal.SIGUSR2, None)  # requeues and exits (or raises if out of requeues)


def run(cfg: DictConfig) -> str:
    """Run the requested stages of one run; returns its final state (done/skipped/locked/trained...)."""
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise ConfigError(f"stages={list(cfg.stages)} contains {bad}: allowed {', '.join(STAGES)}")
    if "bench" in cfg.stages:  # a typo in bench.* fails now, not after training
        from .bench import validate_bench

        validate_bench(cfg.bench)
    run_dir = resolve_run(cfg)
    # a job that trains completes the run: once DONE there is nothing left to do. Evaluating or
    # probing a run is asked for explicitly (mor-eval / mor-bench run_dir=...): DONE does not stop it
    skip_done = "train" in cfg.stages
    if cfg.run_dir and not skip_done and not run_dir.exists():
        raise ConfigError(f"run_dir={cfg.run_dir} does not exist (stages={list(cfg.stages)} need a run)")
    if skip_done and (run_dir / "DONE").exists():
        log.info("%s: DONE, skipping", run_dir)
        return "skipped"
    attempts_file = run_dir / "attempts.json"
    # a data-parallel job runs this on every rank: rank 0 holds the lock and writes the markers, the
    # other ranks only join training (evaluation and probes are single-process stages)
    rank0 = _launch_rank() == 0
    with RunLock(run_dir) if rank0 else nullcontext(True) as locked:
        attempts = records.read_json(attempts_file) if attempts_file.exists() else {"failed": 0}
        stop = None
        if not locked:
            log.warning("%s is locked by another job; skipping", run_dir)
            stop = "locked"
        elif skip_done and (run_dir / "DONE").exists():  # finished by the job that held the lock
            log.info("%s: DONE, skipping", run_dir)
            stop = "skipped"
        elif attempts["failed"] >= cfg.train.max_retries:
            log.error("%s failed %d times (train.max_retries); not retrying", run_dir, attempts["failed"])
            stop = "failed"
        if "train" in cfg.stages:  # only training runs on every rank
            stop = _agree(stop, cfg)
        if stop:
            return stop
        if rank0:
            record_job(cfg, run_dir)
        try:
            if "train" in cfg.stages:
                from .train import train

                train(cfg, run_dir)
            if not rank0:
                return "ran"
            if "eval" in cfg.stages:
                from .evaluate import evaluate_run

                evaluate_run(run_dir, OmegaConf.to_object(cfg.eval))
            if "bench" in cfg.stages:
                from .bench import run_bench

                run_bench(cfg, run_dir)
        except Exception as e:
            from .train import Preempted

            if rank0 and not isinstance(e, Preempted | ConfigError):
                attempts["failed"] += 1
                records.write_json(attempts_file, attempts)
                records.atomic_write_text(
                    run_dir / "FAILED", f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}"
                )
            raise
        (run_dir / "FAILED").unlink(missing_ok=True)
        if set(cfg.stages) == set(STAGES):
            records.atomic_write_text(run_dir / "DONE", "")
            return "done"
    return "ran"


class UserError(CompactHydraException):
    """A ConfigError at the command line: Hydra prints its message alone, without a traceback."""


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> str:
    try:
        return run(cfg)
    except ConfigError as e:
        raise UserError(f"error: {e}") from None
    except Exception as e:
        from .train import Preempted

        if isinstance(e, Preempted):
            _after_preemption(e)
        raise


def _with_stages(stages: str):
    def entry():
        if not any(a.startswith("stages=") for a in sys.argv[1:]):
            sys.argv.insert(1, f"stages={stages}")
        _hydra_main()

    return entry


main = _hydra_main
train_main = _with_stages("[train]")
eval_main = _with_stages("[eval]")
bench_main = _with_stages("[bench]")

if __name__ == "__main__":
    main()
