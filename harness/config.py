"""Typed Hydra schemas: every config group validates against a dataclass, so a typo is an error.

`conf/config.yaml` composes groups on top of `RunConfig` (registered as `base_config`). Model
dataclasses come from `models.config` (pure Python, no Hydra there); data and eval schemas from
their own modules.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from models.config import ModelConfig, RouterConfig

from .data import DataConfig
from .evaluate import EvalConfig


@dataclass
class BudgetConfig:
    kind: str = "flops"  # flops | tokens | steps
    value: float = 2e13  # total training FLOPs, tokens or optimizer steps


@dataclass
class TrainConfig:
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    flops_convention: str = "exact"  # exact (fwd+bwd as executed) | paper (App. D forward-only rule)
    global_batch_tokens: int = 8192  # tokens per optimizer step, all ranks and micro-batches together
    micro_batch_size: int = 16  # sequences per forward pass per rank
    lr: float = 3e-3  # peak learning rate (official 360M configs: 3e-3)
    min_lr_ratio: float = 0.0  # final LR as a fraction of peak
    schedule: str = "wsd"  # wsd (warmup-stable-decay, the paper's) | cosine
    warmup_frac: float = 0.05  # warmup steps as a fraction of `warmup_ref_steps` (or of this run's steps)
    warmup_ref_steps: int | None = None  # the smallest budget's steps in a sweep (paper: 5% of the 2e18 run)
    decay_frac: float = 0.2  # wsd: linear cool-down over the last fraction of steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # ddp | fsdp (multi-process only)
    log_every: int = 10  # steps between metrics.jsonl rows
    eval_every: int = 0  # steps between validation NLL rows (0: only at the end)
    val_batches: int = 8  # validation batches per NLL measurement
    ckpt_every: int = 100  # steps between checkpoints (and at SIGTERM/SIGUSR1 and the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    calibrate_batches: int = 4  # held-out batches to fit expert-choice causal thresholds after training
    resume_force: bool = False  # resume even if the saved config or world size differs
    max_retries: int = 2  # failed attempts before a run is left FAILED instead of retried
    progress: bool = True  # tqdm bar (off automatically under CI=true)
    wandb: bool = False  # mirror metrics to Weights & Biases (optional, needs wandb installed)


@dataclass
class BenchConfig:
    probes: list[str] = field(default_factory=lambda: ["decode"])  # decode | train | memory
    batch_sizes: list[int] = field(default_factory=lambda: [8])  # decode batch sizes to sweep
    max_batch: bool = False  # also run at the largest batch that fits `memory_budget_gb`
    memory_budget_gb: float = 80.0  # device memory for params + KV cache (paper: H100 VRAM)
    gen_len_mean: int = 64  # generated tokens per request, ~ Normal(mean, std) (paper: 256)
    gen_len_std: int = 8
    num_requests: int = 16  # requests in the decode queue
    prompt_len: int = 0  # 0: prompt-free generation as in the paper (one BOS token)
    warmup: int = 2  # untimed warm-up iterations
    train_steps: int = 5  # timed train-step probe iterations
    weights: str = "run"  # run (trained checkpoint when present) | random (calibrated router)
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    cuda_graphs: bool = False  # decode: each step's layer stack / MoR block pass replayed as a CUDA graph
    # (padded to the batch; CUDA only, off it the same padded steps run eagerly; not with compile)
    max_batch_rule: str = "fit"  # fit (largest batch in the budget) | relative (paper: B0 x fit/fit_vanilla)
    temperature: float = 1.0  # decode sampling temperature (0 = greedy; random weights collapse under greedy)
    seq_slots_factor: float = 1.0  # MoR: sequences in flight per block slot (1: the same KV rows as vanilla;
    # bench=paper: 2, the block's slots refilled at once while exits wait for the last layer)
    flush_frac: float = 1.0  # MoR: exits wait for this batch fraction before last layer + head (paper: 1)
    kv_slack: float = 0.25  # MoR: recursion r caches capacity_r x length x (1 + slack), widened if exceeded


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    size: str = "tiny"  # name of the size preset (conf/size), recorded for tables
    experiment: str = "default"  # experiment preset name: first level of the run directory
    run_name: str | None = None  # None: derived from the command-line overrides
    run_dir: str | None = None  # explicit run directory (e.g. to evaluate a finished run); else derived
    results_root: str = "results/runs"
    stages: list[str] = field(default_factory=lambda: ["train", "eval", "bench"])
    seed: int = 0


STAGES = ("train", "eval", "bench")


def register_configs() -> None:
    """Schemas, plus the sweep presets' resolvers and the Slurm launcher (harness/sweeps.py)."""
    from .sweeps import register as register_sweeps

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    cs.store(group="model/router", name="base_router", node=RouterConfig, package="model.router")
    register_sweeps()


def model_config_from(node: DictConfig | dict) -> ModelConfig:
    """OmegaConf/dict -> validated ModelConfig dataclass."""
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), node)
    return OmegaConf.to_object(merged)


def to_object(cfg: DictConfig) -> Any:
    return OmegaConf.to_object(cfg)


# keys that select *where/how* to run, not *what* is trained: they never enter the run name
_NAME_EXCLUDE = {
    "experiment",
    "stages",
    "results_root",
    "hydra/launcher",
    "run_name",
    "run_dir",
    "train.progress",
}
_NAME_EXCLUDE_PREFIX = ("eval", "bench", "hydra")


def run_name_from_overrides(overrides: list[str]) -> str:
    """Deterministic run directory name from the task overrides (order-independent)."""

    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    kept = sorted(
        o for o in overrides if key(o) not in _NAME_EXCLUDE and not key(o).startswith(_NAME_EXCLUDE_PREFIX)
    )
    if not kept:
        return "default"
    name = ",".join(kept)
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)
    if len(name) > 120:  # keep paths short but unique
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def run_dir_of(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path(cfg.results_root) / cfg.experiment / cfg.run_name
