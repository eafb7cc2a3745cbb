"""Hydra entry points. One job = one run directory; stages train -> eval -> bench.

    mor-run   experiment=demo -m            # every stage, a multirun over the preset's models
    mor-train model=mor_expert size=tiny    # train only (stages=[train])
    mor-eval  run_dir=results/runs/demo/model=vanilla eval=paper
    mor-bench model=mor_expert size=small bench.weights=random

The run directory is derived from the overrides that define the run (not from eval/bench keys),
so every entry point finds the same place. A run with `DONE` is skipped; a run with a checkpoint
resumes; a lock file keeps two jobs from working on one run at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from models import ConfigError

from . import records
from .config import STAGES, register_configs, run_dir_of, run_name_from_overrides

log = logging.getLogger("mor")
register_configs()


class RunLock:
    """Exclusive, non-blocking lock on <run_dir>/.lock (released when the process dies)."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        self.fd = None

    def __enter__(self) -> bool:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            return False
        return True

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


def run(cfg: DictConfig) -> str:
    """Run the requested stages of one run; returns its final state (done/skipped/locked/trained...)."""
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise ConfigError(f"stages={list(cfg.stages)} contains {bad}: allowed {', '.join(STAGES)}")
    run_dir = resolve_run(cfg)
    if (run_dir / "DONE").exists():
        log.info("%s: DONE, skipping", run_dir)
        return "skipped"
    attempts_file = run_dir / "attempts.json"
    with RunLock(run_dir) as locked:
        if not locked:
            log.warning("%s is locked by another job; skipping", run_dir)
            return "locked"
        attempts = records.read_json(attempts_file) if attempts_file.exists() else {"failed": 0}
        if attempts["failed"] >= cfg.train.max_retries:
            log.error("%s failed %d times (train.max_retries); not retrying", run_dir, attempts["failed"])
            return "failed"
        try:
            if "train" in cfg.stages:
                from .train import train

                train(cfg, run_dir)
            if "eval" in cfg.stages:
                from .evaluate import evaluate_run

                evaluate_run(run_dir, OmegaConf.to_object(cfg.eval))
            if "bench" in cfg.stages:
                from .bench import run_bench

                run_bench(cfg, run_dir)
        except Exception as e:
            from .train import Preempted

            if not isinstance(e, Preempted | ConfigError):
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


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> str:
    return run(cfg)


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
