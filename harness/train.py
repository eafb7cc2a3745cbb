"""Training: compute-matched budgets, exact resume, single- or multi-process data parallel.

    mor-train model=mor_expert size=tiny train.budget.kind=flops train.budget.value=3e13

The number of optimizer steps follows from the budget and the model's own analytic FLOPs per
token (`train.flops_convention`), so families trained with one budget get the same compute by
construction. Everything is written to the run directory (docs/run_dir.md); a checkpoint is
resumed exactly (model, optimizer, RNG, data position), `DONE` is never retrained.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from models import ConfigError, build_model

from . import records
from .config import model_config_from
from .data import build_loader, load_tokenizer

# dense bf16 peak FLOP/s per device, for MFU (None when unknown, e.g. CPUs)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12}


class Preempted(Exception):
    """Raised after a checkpoint was saved on SIGTERM/SIGUSR1/SIGUSR2; the job should be requeued.

    `signum` is the signal that stopped training (harness.main hands SIGUSR1/SIGUSR2 to submitit's
    requeue path when the job runs under submitit)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


class NonFiniteLoss(RuntimeError):
    pass


# -- distributed -----------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _export_slurm_env() -> None:
    """Set torch's env:// variables (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) from Slurm's.

    The values are the ones submitit's `TorchDistributedEnvironment` derives (first host of
    SLURM_JOB_NODELIST, parsed by submitit; a port seeded by the job id unless MASTER_PORT is set),
    but this works in any Slurm task, not only in submitit-launched jobs (`srun python -m harness.main`),
    and variables that are already set win instead of raising."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    job = SlurmJobEnvironment()
    port = os.environ.get("MASTER_PORT") or str(random.Random(job.job_id).randint(20000, 60000))
    env = {
        "MASTER_ADDR": job.hostnames[0],
        "MASTER_PORT": port,
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes),
    }
    for key, value in env.items():
        os.environ.setdefault(key, value)


def dist_device_kind(tcfg) -> str:
    """ "cuda" or "cpu": which process-group backend (NCCL or gloo) train.device asks for."""
    return "cuda" if tcfg.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"


def init_distributed(device_kind: str) -> DistInfo:
    """Rank/world from torchrun's variables or from Slurm's (`_export_slurm_env`); no-op for one process."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        _export_slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


# -- schedule ----------------------------------------------------------------------------------------
def lr_at(step: int, steps: int, tcfg) -> float:
    """Warmup-stable-decay (linear cool-down over the last decay_frac) or cosine, after linear warmup."""
    ref = tcfg.warmup_ref_steps or steps
    warm = max(1, round(tcfg.warmup_frac * ref)) if tcfg.warmup_frac > 0 else 0
    peak, floor = tcfg.lr, tcfg.lr * tcfg.min_lr_ratio
    if step < warm:
        return peak * (step + 1) / warm
    if tcfg.schedule == "wsd":
        decay = max(1, round(tcfg.decay_frac * steps))
        start = steps - decay
        if step < start:
            return peak
        return floor + (peak - floor) * (steps - step) / decay
    if tcfg.schedule == "cosine":
        t = (step - warm) / max(1, steps - warm)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    raise ConfigError(f"train.schedule={tcfg.schedule!r} is invalid: allowed wsd, cosine")


# -- budget -------------------------------------------------------------------------------------------
@dataclass
class Plan:
    steps: int
    accum: int
    tokens_per_step: int
    flops_per_token: float  # in the budget's convention (train FLOPs for exact, forward for paper)
    flops_per_token_exact_train: float
    flops_per_token_paper: float


def plan_budget(cfg: DictConfig, model, world: int) -> Plan:
    t, seq = cfg.train, cfg.data.seq_len
    per_pass = seq * t.micro_batch_size * world
    if t.global_batch_tokens % per_pass:
        raise ConfigError(
            f"train.global_batch_tokens={t.global_batch_tokens} must be divisible by data.seq_len x "
            f"train.micro_batch_size x world size = {seq} x {t.micro_batch_size} x {world} = {per_pass}"
        )
    if t.flops_convention not in ("exact", "paper"):
        raise ConfigError(f"train.flops_convention={t.flops_convention!r} is invalid: allowed exact, paper")
    exact = model.flops_per_token(seq, "exact").train
    paper = model.flops_per_token(seq, "paper").forward
    fpt = exact if t.flops_convention == "exact" else paper
    kind, value = t.budget.kind, float(t.budget.value)
    if kind == "flops":
        steps = int(value // (fpt * t.global_batch_tokens))
    elif kind == "tokens":
        steps = int(value // t.global_batch_tokens)
    elif kind == "steps":
        steps = int(value)
    else:
        raise ConfigError(f"train.budget.kind={kind!r} is invalid: allowed flops, tokens, steps")
    if steps < 1:
        raise ConfigError(
            f"train.budget ({kind}={value:g}) is too small for one step of {t.global_batch_tokens} tokens "
            f"({fpt * t.global_batch_tokens:.3g} FLOPs per step in the {t.flops_convention} convention)"
        )
    return Plan(steps, t.global_batch_tokens // per_pass, t.global_batch_tokens, fpt, exact, paper)


# -- checkpoints -----------------------------------------------------------------------------------------
_RESUME_IGNORE = ("train.progress", "train.resume_force", "train.max_retries", "stages", "eval", "bench")


def _comparable(cfg: DictConfig) -> dict:
    d = OmegaConf.to_container(cfg, resolve=True)
    for key in _RESUME_IGNORE:
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            node = node.get(p, {})
        node.pop(parts[-1], None)
    return d


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict, list]:
    sd = opt.state_dict()
    tensors = {
        f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()
    }
    return tensors, sd["param_groups"]


def _fully_shard(model) -> None:
    """FSDP2: shard every block, then the rest (embeddings, norm, head, router) at the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)


def _is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _optim_param_names(model, opt) -> list[str]:
    """Parameter name of each optimizer index (the numbering of `opt.state_dict()`)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]


def gather_full_state(model, opt) -> tuple[dict, dict, list] | None:
    """FSDP: (model tensors, optimizer tensors, param groups) of the whole model on rank 0, in the layout
    `save_checkpoint` writes for an unsharded model (optimizer state keyed by parameter index; the models
    tie embeddings functionally, so no tensor appears under two names). None on other ranks.
    Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=options)
    osd = get_optimizer_state_dict(model, opt, options=options)
    if dist.get_rank() != 0:
        return None
    index = {n: i for i, n in enumerate(_optim_param_names(model, opt))}
    tensors = {f"{index[n]}.{k}": v.contiguous() for n, st in osd["state"].items() for k, v in st.items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {k: v.contiguous() for k, v in msd.items()}, tensors, groups


def _load_full_state(ckpt: Path, model, opt, meta: dict, tensors: dict) -> None:
    """FSDP: rank 0 reads the full checkpoint and broadcasts it; every rank keeps its shards. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    msd, osd = {}, {}
    if dist.get_rank() == 0:
        msd = load_file(str(ckpt / records.MODEL_FILE))
        names = _optim_param_names(model, opt)
        state: dict[str, dict] = {}
        for key, value in tensors.items():
            if not key.startswith("rng."):
                i, k = key.split(".", 1)
                state.setdefault(names[int(i)], {})[k] = value
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in meta["param_groups"]]
        osd = {"state": state, "param_groups": groups}
    set_model_state_dict(model, msd, options=options)
    set_optimizer_state_dict(model, opt, osd, options=options)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    opt,
    loaders_state: list,
    meta: dict,
    keep: int,
    full_state: tuple | None = None,
) -> Path:
    """Write checkpoint `step` atomically. `full_state`: from `gather_full_state` (FSDP), else `model` and
    `opt` are read directly."""
    root = run_dir / records.CHECKPOINTS
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if full_state is None:
        save_model(model, str(tmp / records.MODEL_FILE))
        tensors, groups = _optim_tensors(opt)
    else:
        weights, tensors, groups = full_state
        save_file(weights, str(tmp / records.MODEL_FILE))
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optim.safetensors"))
    # trainer.json is the completeness marker: written last, inside the temp dir before the rename
    records.write_json(
        tmp / "trainer.json", {**meta, "step": step, "loader": loaders_state, "param_groups": groups}
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in records.checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, opt, device) -> dict:
    """Restore weights, optimizer, RNG; returns trainer.json. Safetensors + JSON only (no pickle).

    An FSDP-sharded model is restored collectively (every rank must call this)."""
    meta = records.read_json(ckpt / "trainer.json")
    tensors = load_file(str(ckpt / "optim.safetensors"))
    if _is_sharded(model):
        _load_full_state(ckpt, model, opt, meta, tensors)
    else:
        load_model(model, str(ckpt / records.MODEL_FILE), device=str(device))
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("rng."):
                continue
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = value.to(device) if name != "step" else value
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


# -- validation ---------------------------------------------------------------------------------------
def validation_metrics(model, batches, device, autocast, calibrate_batches: int) -> dict[str, float]:
    """`val/nll` overall, per token class and per depth, under the model's inference routing.

    Expert-choice thresholds are first re-fitted to the training capacities on held-out batches,
    so mid-training numbers use the same causal rule as the final evaluation."""
    from .evaluate import nll_stats

    with autocast:
        if hasattr(model, "calibrate"):
            model.calibrate([b["input_ids"].to(device) for b in batches[:calibrate_batches]])
        return {f"val/{name}": mean for name, mean, _, _ in nll_stats(model, batches, device)}


# -- the loop ---------------------------------------------------------------------------------------
class _Signals:
    """SIGTERM/SIGUSR1/SIGUSR2 set a flag; the loop checkpoints at the end of the step and raises Preempted.

    SIGUSR2 is submitit's checkpoint signal (Slurm sends it `signal_delay_s` before the time limit).
    submitit's own handler would requeue and exit at once, mid-step; it is held back here and restored
    on exit, and harness.main calls it after the checkpoint. With several processes `hit` is agreed
    across ranks (a max all-reduce), so every rank checkpoints at the same step. A signal that arrives
    too late to act on (SIGUSR2 during the last step) is re-raised on exit for the restored handler, so
    submitit still requeues.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self._hit: int | None = None
        self._old = {}

    @property
    def hit(self) -> int | None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([self._hit or 0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return int(flag.item()) or None
        return self._hit

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._set)
            except ValueError:  # not the main thread
                pass
        return self

    def _set(self, signum, frame):
        self._hit = signum

    def __exit__(self, exc_type, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        old = self._old.get(signal.SIGUSR2)
        if self._hit == signal.SIGUSR2 and exc_type is None and callable(old):
            signal.raise_signal(signal.SIGUSR2)  # not acted on: submitit's handler requeues


def _wandb_init(cfg: DictConfig, run_dir: Path):
    """Optional W&B mirror of metrics.jsonl (the files stay the source of truth)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb=true needs the wandb package: pip install wandb") from None
    return wandb.init(
        project=f"mor-bench-{cfg.experiment}",
        name=cfg.run_name,
        id=hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16],  # resumes the same W&B run
        resume="allow",
        dir=str(run_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def autocast_for(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return nullcontext()
    raise ConfigError(f"precision={precision!r} is invalid: allowed auto, bf16, fp32")


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train (or resume) the run in run_dir; returns summary.json's content."""
    t = cfg.train
    info = init_distributed(dist_device_kind(t))
    device = resolve_device(t.device, info)
    torch.manual_seed(cfg.seed)
    if info.world > 1 and not info.main:
        dist.barrier()  # rank 0 first: it may train and cache a tokenizer that the others then load
    tok = load_tokenizer(cfg.data)
    if info.world > 1 and info.main:
        dist.barrier()
    mcfg = model_config_from(cfg.model)
    if tok.vocab_size > mcfg.vocab_size:
        raise ConfigError(
            f"tokenizer data.tokenizer={cfg.data.tokenizer!r} has {tok.vocab_size} tokens, more than "
            f"model.vocab_size={mcfg.vocab_size}"
        )
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}")
    if t.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"train.parallel={t.parallel!r} is invalid: allowed ddp, fsdp")
    wandb_run = _wandb_init(cfg, run_dir) if t.wandb and info.main else None
    model = build_model(mcfg).to(device)
    plan = plan_budget(cfg, model, info.world)
    autocast = autocast_for(t.precision, device)
    fsdp = info.world > 1 and t.parallel == "fsdp"
    if fsdp:
        _fully_shard(model)  # before the optimizer is built: it must hold the sharded parameters

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        foreach=device.type == "cuda" or None,
    )
    loader = build_loader(cfg.data, tok, "train", t.micro_batch_size, info.rank, info.world)

    start, elapsed = 0, 0.0
    ckpt = records.latest_checkpoint(run_dir)
    saved_cfg = run_dir / "config.yaml"
    if ckpt is not None:
        meta = load_checkpoint(ckpt, model, opt, device)
        if meta.get("finished") and (run_dir / "summary.json").exists():
            return records.read_json(run_dir / "summary.json")
        if not t.resume_force:
            old = _comparable(OmegaConf.load(saved_cfg))
            if old != _comparable(cfg) or meta.get("world_size", 1) != info.world:
                raise ConfigError(
                    f"{run_dir} holds a checkpoint from a different config or world size "
                    f"(saved world size {meta.get('world_size')}, now {info.world}); "
                    "use a new run name, or set train.resume_force=true"
                )
        start, elapsed = meta["step"], meta.get("elapsed_s", 0.0)
        loader.load_state_dict(meta["loader"][info.rank])
        if info.main:  # drop log rows written after the checkpoint: they will be re-logged identically
            rows = [r for r in records.read_jsonl(run_dir / "metrics.jsonl") if r["step"] <= start]
            records.atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        records.atomic_write_text(saved_cfg, OmegaConf.to_yaml(cfg, resolve=True))
        records.write_json(run_dir / "env.json", records.env_info(device))
        tok.save(run_dir / "tokenizer.json")

    summary = {
        "family": mcfg.family,
        "params_unique": model.num_params(unique=True, embedding=True),
        "params_unique_nonemb": model.num_params(unique=True, embedding=False),
        "params_applied": model.num_params(unique=False, embedding=False),
        "flops_per_token_paper": plan.flops_per_token_paper,
        "flops_per_token_exact_train": plan.flops_per_token_exact_train,
        "flops_convention": t.flops_convention,
        "budget": {"kind": t.budget.kind, "value": float(t.budget.value)},
        "steps": plan.steps,
        "tokens_per_step": plan.tokens_per_step,
        "grad_accum": plan.accum,
        "world_size": info.world,
        "status": "running",
    }
    if info.main:
        records.write_json(run_dir / "summary.json", summary)

    if t.compile:
        model = torch.compile(model)
    ddp = model  # FSDP shards in place (above); DDP wraps
    if info.world > 1 and not fsdp:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    core = model._orig_mod if hasattr(model, "_orig_mod") else model
    val_batches = None

    def get_val():
        nonlocal val_batches
        if val_batches is None:
            vl = build_loader(cfg.data, tok, "val", t.micro_batch_size, 0, 1)
            val_batches = [b for _, b in zip(range(t.val_batches), vl, strict=False)]
        return val_batches

    def checkpoint(step: int, finished: bool = False):
        states = [loader.state_dict()]
        if info.world > 1:
            states = [None] * info.world
            dist.all_gather_object(states, loader.state_dict())
        full = gather_full_state(core, opt) if fsdp else None  # collective
        if info.main:
            meta = {"world_size": info.world, "elapsed_s": elapsed, "finished": finished}
            save_checkpoint(run_dir, step, core, opt, states, meta, t.keep_checkpoints, full)
        if info.world > 1:
            dist.barrier()

    batches = iter(loader)  # continues from the (restored) position; state_dict() tracks it
    quiet = os.environ.get("CI", "").lower() in ("1", "true") or not t.progress or not info.main
    bar = tqdm(total=plan.steps, initial=start, disable=quiet, desc=f"train {cfg.run_name}", unit="step")
    metrics_path = run_dir / "metrics.jsonl"
    model.train()
    step = start
    with _Signals() as sig:
        t_log, last_logged = time.perf_counter(), start
        for step in range(start, plan.steps):
            lr = lr_at(step, plan.steps, t)
            for g in opt.param_groups:
                g["lr"] = lr
            if hasattr(core, "set_step"):
                core.set_step(step)
            loss_sum = torch.zeros((), device=device)
            aux_sums: dict[str, torch.Tensor] = {}
            stat_sums: dict[str, torch.Tensor] = {}
            for micro in range(plan.accum):
                batch = next(batches)
                ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
                last_micro = micro == plan.accum - 1
                sync = nullcontext() if info.world == 1 or last_micro or fsdp else ddp.no_sync()
                if fsdp:  # reduce-scatter gradients once per step, like DDP's no_sync
                    core.set_requires_gradient_sync(last_micro)
                with sync, autocast:
                    out = ddp(ids, labels=labels)
                    total = out.loss + sum(out.aux_losses.values(), torch.zeros((), device=device))
                    (total / plan.accum).backward()
                loss_sum += out.loss.detach()
                for k, v in out.aux_losses.items():
                    aux_sums[k] = aux_sums.get(k, 0) + v.detach()
                for k, v in out.stats.items():
                    stat_sums[k] = stat_sums.get(k, 0) + v.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if hasattr(core, "router"):
                core.router.post_step()
            done_steps = step + 1
            bar.update(1)
            last = done_steps == plan.steps
            if done_steps % t.log_every == 0 or last or sig.hit:
                loss = loss_sum / plan.accum
                if info.world > 1:
                    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
                loss_v = float(loss)
                if not math.isfinite(loss_v):
                    raise NonFiniteLoss(
                        f"loss is {loss_v} at step {done_steps}; the last good checkpoint is kept "
                        f"({records.latest_checkpoint(run_dir)}); lower train.lr or check the data"
                    )
                now = time.perf_counter()
                elapsed += now - t_log
                tok_s = (done_steps - last_logged) * plan.tokens_per_step / max(now - t_log, 1e-9)
                row = {
                    "step": done_steps,
                    "tokens": done_steps * plan.tokens_per_step,
                    "flops": done_steps * plan.tokens_per_step * plan.flops_per_token,
                    "loss": loss_v,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tok_per_s": tok_s,
                    "elapsed_s": elapsed,
                }
                row.update({f"aux/{k}": float(v / plan.accum) for k, v in aux_sums.items()})
                row.update({k: float(v / plan.accum) for k, v in stat_sums.items()})
                loads = [row.get(f"router/load_r{r}") for r in range(core.cfg.num_recursions)]
                if core.cfg.family == "mor" and None not in loads:
                    # compute this step's routing really spent, next to the nominal budget rule
                    # (token-choice budgets assume perfect balancing, as the paper does)
                    f = core.flops_per_token(cfg.data.seq_len, t.flops_convention, fractions=loads)
                    row["flops_per_token_measured"] = f.train if t.flops_convention == "exact" else f.forward
                peak = PEAK_FLOPS.get(next((k for k in PEAK_FLOPS if k in records.device_name(device)), ""))
                if peak:
                    row["mfu"] = tok_s * plan.flops_per_token_exact_train / (peak * info.world)
                if device.type == "cuda":
                    row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
                if t.eval_every and done_steps % t.eval_every == 0 and not last:
                    row.update(validation_metrics(core, get_val(), device, autocast, t.calibrate_batches))
                if info.main:
                    records.append_jsonl(metrics_path, row)
                    if wandb_run is not None:
                        wandb_run.log(row, step=done_steps)
                bar.set_postfix(loss=f"{loss_v:.3f}")
                t_log, last_logged = now, done_steps
            if last:
                break
            if sig.hit or done_steps % t.ckpt_every == 0:
                checkpoint(done_steps)
                if sig.hit:
                    bar.close()
                    raise Preempted(f"signal {sig.hit}: checkpoint saved at step {done_steps}", sig.hit)
    bar.close()
    final = validation_metrics(core, get_val(), device, autocast, t.calibrate_batches)
    if hasattr(core, "router") and core.router.kind == "expert":  # thresholds saved with the weights
        summary["thresholds"] = [float(x) for x in core.router.threshold]
    checkpoint(plan.steps, finished=True)
    if info.main:
        rows = records.read_jsonl(metrics_path)
        if rows and rows[-1]["step"] == plan.steps:
            rows[-1].update(final)
            records.atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        summary.update(
            tokens=plan.steps * plan.tokens_per_step,
            flops=plan.steps * plan.tokens_per_step * plan.flops_per_token,
            final_loss=rows[-1]["loss"] if rows else None,
            val_nll=final["val/nll"],
            wall_s=elapsed,
            status="trained",
        )
        records.write_json(run_dir / "summary.json", summary)
    return summary
