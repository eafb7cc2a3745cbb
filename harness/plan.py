"""Dry run of a sweep: every run a preset would launch, its budget, steps and cost. Submits nothing.

    mor-plan experiment=isoflop                    # the 36 runs of the paper's Table 9
    mor-plan experiment=table3 hydra/launcher=slurm --mfu 0.35
    mor-plan experiment=demo model=vanilla,mor_expert --format csv

The sweep is expanded exactly as `mor-run --multirun` would: the preset's `hydra.sweeper.params` and the
command-line overrides go through Hydra's own parser and `BasicSweeper.split_arguments` (so `a=1,2`,
`+key=...`, `range(...)`, `glob(...)` and list values behave the same), and every sweep point is composed
by Hydra's config loader, as the launcher composes it for the job. Models are built on the meta device
(no memory, no weights), so even the 1.7B grid plans in seconds.

Errors a launch would hit are raised here, before anything is submitted: an override of a key that does
not exist (Hydra's composition error, naming the sweep point), an unknown field in a launcher preset or
in its per-size `resources`, a budget too small for one step, a global batch that the size's GPU count
does not divide, and a results root that is not writable.

GPU-hours = steps x tokens/step x exact training FLOPs/token / (MFU x peak FLOP/s) / 3600: the exact
(forward + backward, as executed) count, whatever convention the budget is in.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from models import ConfigError

from .bench import PEAK_FLOPS
from .config import register_configs
from .sweeps import (
    LAUNCHER_TARGET,
    check_writable,
    launcher_params_for,
    register,
    run_dir_for,
    validate_resources,
    world_size_of,
)

H100_PEAK = PEAK_FLOPS["H100"]["bf16"]  # dense bf16 FLOP/s
SLURM_TARGETS = (LAUNCHER_TARGET, "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")


@dataclass
class Job:
    index: int
    overrides: list[str]
    cfg: DictConfig
    run_dir: Path
    launcher: dict | None  # the launcher fields this job is submitted with (Slurm presets), else None


@dataclass
class PlanRow:
    run_dir: str
    state: str
    family: str
    size: str
    num_recursions: int
    params_unique_nonemb: int
    flops_per_token_paper: float
    flops_per_token_exact: float  # training (forward + backward) FLOPs per token, as executed
    budget_kind: str
    budget_value: float
    steps: int
    tokens: int
    warmup_steps: int
    gpus: int
    gpu_hours: float
    wall_hours: float
    overrides: str


class PlanError(Exception):
    """A sweep that cannot be launched; the message says which sweep point and why."""


def _hydra_errors():
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (HydraException, OmegaConfBaseException)


def expand(overrides: list[str]) -> list[Job]:
    """Compose every sweep point of `mor-run --multirun OVERRIDES` (no side effects)."""
    from hydra import initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    register_configs()
    register()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    errors = _hydra_errors()
    with initialize_config_module("conf", version_base="1.3"):
        gh = GlobalHydra.instance().hydra
        loader = gh.config_loader
        try:
            master = gh.compose_config("config", list(overrides), run_mode=RunMode.MULTIRUN)
        except errors as e:
            raise PlanError(f"cannot compose {' '.join(overrides) or 'the default config'}: {e}") from None
        sweeper = master.hydra.sweeper
        if not str(sweeper._target_).endswith("BasicSweeper"):
            raise PlanError(f"hydra.sweeper={sweeper._target_}: mor-plan expands only Hydra's BasicSweeper")
        launcher = _launcher_fields(master)
        params = [f"{k}={v}" for k, v in (sweeper.params or {}).items()]
        task = list(OmegaConf.to_container(master.hydra.overrides.task))
        try:
            parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + task)
            batches = BasicSweeper.split_arguments(parsed, sweeper.max_batch_size)
        except errors as e:
            raise PlanError(f"cannot parse the sweep ({' '.join(params + task)}): {e}") from None
        jobs = []
        for i, job in enumerate(j for batch in batches for j in batch):
            try:
                cfg = loader.load_sweep_config(master, list(job))
                _resolve_task(cfg)
            except errors as e:
                raise PlanError(f"sweep point #{i} ({' '.join(job)}) does not compose: {e}") from None
            fields = None if launcher is None else launcher_params_for(*launcher, cfg.size)
            jobs.append(Job(i, list(job), cfg, run_dir_for(cfg, job), fields))
    return jobs


def _launcher_fields(master: DictConfig) -> tuple[dict, dict] | None:
    """(launcher fields, per-size resources) of a Slurm preset, validated; None for other launchers."""
    node = master.hydra.launcher
    if str(node.get("_target_")) not in SLURM_TARGETS:
        return None
    fields = OmegaConf.to_container(node, resolve=True)
    fields.pop("_target_", None)
    resources = fields.pop("resources", None)
    fields.pop("skip_finished", None)
    validate_resources(resources)
    return fields, resources or {}


def _resolve_task(cfg: DictConfig) -> None:
    """Resolve and type-check the job's own config (everything but `hydra`), as the job will."""
    task = cfg.copy()
    with open_dict(task):
        task.pop("hydra", None)
    OmegaConf.to_object(task)


def plan_row(job: Job, mfu: float, peak: float) -> PlanRow:
    import torch

    from models import build_model

    from .config import model_config_from
    from .status import run_state
    from .train import plan_budget

    cfg = job.cfg
    mcfg = model_config_from(cfg.model)
    world = world_size_of(job.launcher) if job.launcher else 1
    with torch.device("meta"):
        model = build_model(mcfg)
    try:
        p = plan_budget(cfg, model, world)
    except ConfigError as e:
        raise PlanError(f"sweep point #{job.index} ({' '.join(job.overrides)}): {e}") from None
    t = cfg.train
    warm = max(1, round(t.warmup_frac * (t.warmup_ref_steps or p.steps))) if t.warmup_frac > 0 else 0
    gpu_h = p.steps * p.tokens_per_step * p.flops_per_token_exact_train / (mfu * peak) / 3600
    family = mcfg.family if mcfg.family != "mor" else f"mor/{mcfg.router.name}"
    return PlanRow(
        run_dir=str(job.run_dir),
        state=run_state(job.run_dir, cfg.train.max_retries).state,
        family=family,
        size=str(cfg.size),
        num_recursions=mcfg.num_recursions,
        params_unique_nonemb=model.num_params(unique=True, embedding=False),
        flops_per_token_paper=p.flops_per_token_paper,
        flops_per_token_exact=p.flops_per_token_exact_train,
        budget_kind=str(cfg.train.budget.kind),
        budget_value=float(cfg.train.budget.value),
        steps=p.steps,
        tokens=p.steps * p.tokens_per_step,
        warmup_steps=warm,
        gpus=world,
        gpu_hours=gpu_h,
        wall_hours=gpu_h / world,
        overrides=" ".join(job.overrides),
    )


def plan(overrides: list[str], mfu: float = 0.4, peak: float = H100_PEAK) -> list[PlanRow]:
    """Every run of the sweep with its budget and estimated cost; raises PlanError before any work."""
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu={mfu} must be in (0, 1]")
    jobs = expand(overrides)
    for root in sorted({Path(j.cfg.results_root) for j in jobs if not j.cfg.run_dir}):
        try:
            check_writable(root)
        except ConfigError as e:
            raise PlanError(str(e)) from None
    rows = [plan_row(j, mfu, peak) for j in jobs]
    dup = {r.run_dir for r in rows if sum(x.run_dir == r.run_dir for x in rows) > 1}
    if dup:
        raise PlanError(
            f"sweep points share a run directory (they would overwrite each other): {sorted(dup)}"
        )
    return rows


def _si(x: float) -> str:
    return f"{x:.3g}"


def format_table(rows: list[PlanRow], mfu: float, peak: float) -> str:
    header = ["run", "state", "family", "size", "N_r", "params", "FLOPs/tok paper", "FLOPs/tok exact"]
    header += ["budget", "steps", "tokens", "warmup", "GPUs", "GPU-h", "wall-h"]
    common = str(Path(*_common_parts([Path(r.run_dir) for r in rows]))) if rows else ""
    body = []
    for r in rows:
        name = str(Path(r.run_dir).relative_to(common)) if common else r.run_dir
        body.append(
            [
                name,
                r.state,
                r.family,
                r.size,
                str(r.num_recursions) if r.family != "vanilla" else "-",
                f"{r.params_unique_nonemb / 1e6:.1f}M",
                _si(r.flops_per_token_paper),
                _si(r.flops_per_token_exact),
                f"{r.budget_kind} {_si(r.budget_value)}",
                str(r.steps),
                f"{r.tokens / 1e9:.2f}B" if r.tokens >= 1e8 else f"{r.tokens:,}",
                str(r.warmup_steps),
                str(r.gpus),
                f"{r.gpu_hours:.3g}",
                f"{r.wall_hours:.3g}",
            ]
        )
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = [f"runs under {common}/"] if common else []
    lines += ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in [header, *body]]
    states = {}
    for r in rows:
        states[r.state] = states.get(r.state, 0) + 1
    todo = sum(r.gpu_hours for r in rows if r.state != "done")
    lines.append(
        f"{len(rows)} runs ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}); "
        f"{sum(r.gpu_hours for r in rows):.4g} GPU-hours in all, {todo:.4g} not done, "
        f"at MFU {mfu:g} of {peak:.3g} FLOP/s per GPU"
    )
    return "\n".join(lines)


def _common_parts(paths: list[Path]) -> list[str]:
    parts = list(paths[0].parent.parts)
    for p in paths[1:]:
        q = p.parent.parts
        n = 0
        while n < min(len(parts), len(q)) and parts[n] == q[n]:
            n += 1
        parts = parts[:n]
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mor-plan",
        description="Compose every run a sweep would launch and print its budget and cost; submits nothing.",
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for `mor-run --multirun`")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilization (default 0.4)")
    ap.add_argument("--peak", type=float, default=H100_PEAK, help="GPU peak FLOP/s (default: H100, 989e12)")
    ap.add_argument("--format", choices=("table", "csv", "json"), default="table")
    args = ap.parse_args(argv)
    try:
        rows = plan(args.overrides, args.mfu, args.peak)
    except (PlanError, ConfigError) as e:
        print(f"mor-plan: error: {e}", file=sys.stderr)
        return 2
    if args.format == "table":
        print(format_table(rows, args.mfu, args.peak))
    elif args.format == "json":
        for r in rows:
            print(json.dumps(asdict(r)))
    else:
        w = csv.DictWriter(sys.stdout, fieldnames=list(asdict(rows[0]))) if rows else None
        if w:
            w.writeheader()
            w.writerows(asdict(r) for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
