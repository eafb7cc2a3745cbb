"""Sweeps: config resolvers for the paper's grids, and the size-aware Slurm launcher.

Imported (and `register()`ed) by every entry point before Hydra composes a config:

* resolvers used by `conf/experiment/*.yaml`:
  - `${mor.steps_at:BUDGET}`: optimizer steps this run's model takes for a FLOP budget BUDGET in its
    own `train.flops_convention` (the paper's warmup is 5% of the smallest isoFLOP budget's steps:
    `train.warmup_ref_steps: ${mor.steps_at:2.0e18}` gives 57 steps for 360M vanilla, 86 for MoR-3,
    as in the released configs);
  - `${mor.floor_block:}` (on `model.block_layers`): unique layers per recursion rounded *down*, the
    layouts of the paper's Tables 10 and 15 (e.g. 360M Cycle N_r=3: 10 layers x 3, not 11 x 3).
* `hydra/launcher=slurm` (`MorSlurmQueueConf`): hydra-submitit-launcher's Slurm launcher plus
  - `resources`: per-size requests (`{size: {gpus_per_node, tasks_per_node, mem_gb, ...}}`); each
    sweep point gets the requests of its own size, and one Slurm job array is submitted per distinct
    request (a multirun over sizes becomes one array per size);
  - `skip_finished`: runs that are DONE, running (locked), or FAILED with no retries left are not
    submitted at all, so relaunching a sweep submits only what is missing.

Hydra instantiates launchers only from the `hydra_plugins` namespace, which this project does not
ship (it installs `models`, `harness`, `analysis`, `conf`); `register()` enters the class in Hydra's
plugin registry under `LAUNCHER_TARGET` instead. Jobs pickle the launcher by its real module path
(`harness.sweeps`), so nothing has to exist under `hydra_plugins/`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

from models import ConfigError

log = logging.getLogger("mor")

LAUNCHER_TARGET = "hydra_plugins.mor_bench.MorSlurmLauncher"
# SlurmQueueConf fields a size may set (everything but the plugin plumbing)
RESOURCE_KEYS = frozenset(f.name for f in dataclasses.fields(SlurmQueueConf)) - {
    "_target_",
    "submitit_folder",
}


# -- resolvers ------------------------------------------------------------------------------------
def steps_at(budget: float, *, _root_: DictConfig) -> int:
    """Optimizer steps of this run's model at a FLOP budget (its flops_convention, one process)."""
    t = _root_.train
    probe = {
        "model": OmegaConf.to_container(_root_.model, resolve=True),
        "train": {
            "global_batch_tokens": t.global_batch_tokens,
            "micro_batch_size": t.micro_batch_size,
            "flops_convention": t.flops_convention,
            "budget": {"kind": "flops", "value": float(budget)},
        },
        "data": {"seq_len": _root_.data.seq_len},
    }
    # the training loop reads the schedule every step: compute once per distinct model and budget
    return _steps_at(json.dumps(probe, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _steps_at(probe_json: str) -> int:
    import torch

    from models import build_model

    from .config import model_config_from
    from .train import plan_budget

    probe = OmegaConf.create(json.loads(probe_json))
    with torch.device("meta"):
        model = build_model(model_config_from(probe.model))
    return plan_budget(probe, model, 1).steps


def floor_block(*, _parent_: DictConfig) -> int:
    """Unique layers per recursion, rounded down: (n_layers - unique first/last) // N_r."""
    edge = 2 if str(_parent_.sharing).startswith("middle") else 0
    return max(1, (int(_parent_.n_layers) - edge) // max(1, int(_parent_.num_recursions)))


# -- launcher --------------------------------------------------------------------------------------
@dataclass
class MorSlurmQueueConf(SlurmQueueConf):
    _target_: str = LAUNCHER_TARGET
    # size name -> SlurmQueueConf fields for runs of that size; null: the same requests for all
    resources: dict[str, Any] | None = None
    # do not submit runs that are DONE, running, or FAILED with no retries left
    skip_finished: bool = True


def validate_resources(resources: dict | None) -> None:
    """Every per-size entry is a mapping of SlurmQueueConf fields; raise ConfigError naming the bad key."""
    for size, req in (resources or {}).items():
        if not isinstance(req, dict):
            raise ConfigError(f"hydra.launcher.resources.{size} must be a mapping, got {req!r}")
        bad = sorted(set(req) - RESOURCE_KEYS)
        if bad:
            raise ConfigError(
                f"hydra.launcher.resources.{size} has unknown key(s) {', '.join(bad)}: allowed "
                f"{', '.join(sorted(RESOURCE_KEYS))}"
            )


def launcher_params_for(params: dict, resources: dict | None, size: str) -> dict:
    """The launcher's fields with this size's requests applied."""
    req = (resources or {}).get(str(size)) or {}
    return {**params, **req}


def world_size_of(params: dict) -> int:
    return int(params.get("tasks_per_node") or 1) * int(params.get("nodes") or 1)


def check_batch(cfg: DictConfig, world: int, where: str) -> None:
    """The global batch must split evenly over the GPUs a run is given (as the trainer requires)."""
    per_pass = cfg.data.seq_len * cfg.train.micro_batch_size * world
    if cfg.train.global_batch_tokens % per_pass:
        raise ConfigError(
            f"{where}: train.global_batch_tokens={cfg.train.global_batch_tokens} is not divisible by "
            f"data.seq_len x train.micro_batch_size x {world} processes (tasks_per_node x nodes) = {per_pass}"
        )


def check_writable(root: Path) -> None:
    """Raise ConfigError unless `root` is writable or can be created (probed with a real temp dir)."""
    root = Path(root).absolute()
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"results_root={root}: {probe} is not a directory")
    try:
        with tempfile.TemporaryDirectory(dir=probe, prefix=".mor-write-probe-"):
            pass
    except OSError as e:
        what = "is not writable" if probe == root else f"cannot be created ({probe} is not writable)"
        raise ConfigError(f"results_root={root} {what}: {e}") from None


def run_dir_for(cfg: DictConfig, job_overrides: list[str]) -> Path:
    """The run directory harness.main.run will use for this composed sweep point."""
    from .config import run_dir_of, run_name_from_overrides

    if cfg.run_name is None:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.run_name = run_name_from_overrides(list(job_overrides))
    return run_dir_of(cfg)


class MorSlurmLauncher(SlurmLauncher):
    """hydra-submitit-launcher's SlurmLauncher with per-size requests and skipping of finished runs."""

    def __init__(self, **params: Any) -> None:
        resources = params.pop("resources", None)
        self.skip_finished = bool(params.pop("skip_finished", True))
        super().__init__(**params)
        if OmegaConf.is_config(resources):
            resources = OmegaConf.to_container(resources, resolve=True)
        validate_resources(resources)
        self.resources = resources or {}

    def launch(self, job_overrides, initial_job_idx):
        from .status import run_state

        assert self.config is not None and self.hydra_context is not None
        loader = self.hydra_context.config_loader
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        results: list[JobReturn | None] = [None] * len(job_overrides)
        groups: dict[tuple, list[tuple[int, list[str]]]] = {}
        params_of: dict[tuple, dict] = {}
        roots: set[Path] = set()
        skipped: dict[str, int] = {}
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            cfg = loader.load_sweep_config(self.config, list(overrides))
            root = Path(cfg.run_dir).parent if cfg.run_dir else Path(cfg.results_root)
            if root not in roots:
                check_writable(root)
                roots.add(root)
            run_dir = run_dir_for(cfg, overrides)
            lst = " ".join(filter_overrides(overrides))
            if self.skip_finished:
                state = run_state(run_dir, max_retries=cfg.train.max_retries)
                reason = {"done": "skipped", "running": "locked"}.get(state.state)
                if state.state == "failed" and not state.retries_left:
                    reason = "failed"
                if reason:
                    log.info(f"\t#{idx} : {lst}  [{state.state}: not submitted]")
                    skipped[state.state] = skipped.get(state.state, 0) + 1
                    results[i] = JobReturn(
                        overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=reason
                    )
                    continue
            params = launcher_params_for(self.params, self.resources, cfg.size)
            check_batch(cfg, world_size_of(params), f"sweep point #{idx} ({lst})")
            key = tuple(sorted((k, repr(v)) for k, v in params.items()))
            params_of[key] = params
            groups.setdefault(key, []).append((i, list(overrides)))
            log.info(f"\t#{idx} : {lst}")
        n_submit = sum(len(g) for g in groups.values())
        log.info(
            "Submitit 'slurm' sweep: submitting %d of %d runs in %d array(s)%s; output dir %s",
            n_submit,
            len(job_overrides),
            len(groups),
            "".join(f", {n} {s}" for s, n in sorted(skipped.items())),
            sweep_dir,
        )
        if groups:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        submitted = []
        for key, members in groups.items():
            executor = self._executor(params_of[key])
            job_params = [
                (
                    ov,
                    "hydra.sweep.dir",
                    initial_job_idx + i,
                    f"job_id_for_{initial_job_idx + i}",
                    Singleton.get_state(),
                )
                for i, ov in members
            ]
            jobs = executor.map_array(self, *zip(*job_params, strict=True))
            submitted += [(i, job) for (i, _), job in zip(members, jobs, strict=True)]
        for i, job in submitted:
            results[i] = job.results()[0]
        return results

    def _executor(self, params: dict):
        """A submitit executor for one group of sweep points (the plugin's own mapping of fields)."""
        import submitit

        init_keys = {"max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=params["submitit_folder"],
            **{f"{self._EXECUTOR}_{k}": v for k, v in params.items() if k in init_keys},
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                k if k in base else f"{self._EXECUTOR}_{k}": v
                for k, v in params.items()
                if k not in init_keys | {"submitit_folder"}
            }
        )
        return executor


# -- registration -----------------------------------------------------------------------------------
_registered = False


def register() -> None:
    """Resolvers, the launcher schema (`hydra/launcher=mor_submitit_slurm`) and its plugin entry."""
    global _registered
    if not _registered:
        OmegaConf.register_new_resolver("mor.steps_at", steps_at, replace=True)
        OmegaConf.register_new_resolver("mor.floor_block", floor_block, replace=True)
        _registered = True
    ConfigStore.instance().store(
        group="hydra/launcher", name="mor_submitit_slurm", node=MorSlurmQueueConf, provider="mor_bench"
    )
    from hydra.core.plugins import Plugins

    Plugins.instance().class_name_to_class[LAUNCHER_TARGET] = MorSlurmLauncher
