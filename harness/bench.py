"""Probes: decode throughput, training-step throughput, memory. Rows go to bench.jsonl.

    mor-bench model=mor_expert size=small bench=decode bench.weights=random

Decode (first form): prompt-free generation (one BOS token) of `num_requests` requests whose
lengths are drawn from Normal(gen_len_mean, gen_len_std), served in batches of `batch_size` with
KV-cached decoding; tokens/s counts only requested tokens. Expert-choice MoR decodes with its
causal rule; with random weights its thresholds are first calibrated to the trained capacities.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from models import build_model

from . import records
from .config import model_config_from
from .train import autocast_for

log = logging.getLogger("mor.bench")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_bench_model(cfg: DictConfig, run_dir: Path | None, device: torch.device):
    """(model, weights label): a run's trained checkpoint, or random init with calibrated routing."""
    if cfg.bench.weights == "run" and run_dir is not None and records.latest_checkpoint(run_dir):
        return records.load_run(run_dir, device=str(device)).model, "trained"
    torch.manual_seed(cfg.seed)
    model = build_model(model_config_from(cfg.model)).to(device).eval()
    if hasattr(model, "calibrate"):
        ids = torch.randint(0, model.cfg.vocab_size, (4, min(256, model.cfg.max_seq_len)), device=device)
        model.calibrate([ids])
    return model, "random"


def gen_lengths(bcfg, seed: int, max_len: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.normal(
        float(bcfg.gen_len_mean), float(max(bcfg.gen_len_std, 0)), (bcfg.num_requests,), generator=g
    )
    return [int(x) for x in lens.round().clamp(1, max_len - 1 - bcfg.prompt_len)]


@torch.no_grad()
def decode_probe(model, bcfg, batch_size: int, lengths: list[int], device, autocast) -> dict:
    """Serve the requests in FIFO batches; returns throughput, latency and KV measurements."""
    bos = 0
    n_tok = steps = 0
    kv_used = 0
    t_total = 0.0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start : start + batch_size]
        B, L = len(chunk), max(chunk)
        cache = model.make_cache(B, bcfg.prompt_len + 1 + L)
        ids = torch.full((B, 1 + bcfg.prompt_len), bos, dtype=torch.long, device=device)
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            logits = model(ids, cache=cache).logits[:, -1]
            for _ in range(L):
                nxt = logits.argmax(-1, keepdim=True)
                logits = model(nxt, cache=cache).logits[:, -1]
        _sync(device)
        t_total += time.perf_counter() - t0
        n_tok += sum(chunk)
        steps += L
        kv_used += int(cache.bytes_used().sum()) / max(1, cache.seen * B)
    n_batches = -(-len(lengths) // batch_size)
    return {
        "tokens_per_s": n_tok / t_total,
        "ms_per_step": 1000 * t_total / max(steps, 1),
        "generated_tokens": n_tok,
        "kv_bytes_per_token": kv_used / n_batches,
    }


def train_probe(model, cfg: DictConfig, device, autocast) -> dict:
    bcfg = cfg.bench
    model.train()
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len
    ids = torch.randint(0, model.cfg.vocab_size, (B, T + 1), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(bcfg.warmup + bcfg.train_steps):
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            out = model(ids[:, :-1], labels=ids[:, 1:])
            loss = out.loss + sum(out.aux_losses.values(), torch.zeros((), device=device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= bcfg.warmup:
            times.append(time.perf_counter() - t0)
    model.eval()
    step = sorted(times)[len(times) // 2]
    return {"tokens_per_s": B * T / step, "ms_per_step": 1000 * step, "batch_size": B, "seq_len": T}


def run_bench(cfg: DictConfig, run_dir: Path | None) -> list[dict]:
    bcfg = cfg.bench
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    autocast = autocast_for(bcfg.dtype, device)
    model, weights = load_bench_model(cfg, run_dir, device)
    if bcfg.compile:
        model = torch.compile(model)
    core = getattr(model, "_orig_mod", model)
    base = {
        "weights": weights,
        "device": records.device_name(device),
        "dtype": bcfg.dtype if bcfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32"),
        "compile": bool(bcfg.compile),
        "family": core.cfg.family,
        "routing": getattr(core, "routing_rule", None),
        "flops_per_token_forward": core.flops_per_token(cfg.data.seq_len, "exact").forward,
        "params_unique": core.num_params(unique=True, embedding=True),
        **{k: v for k, v in records.git_info().items()},
    }
    rows = []
    for probe in bcfg.probes:
        if probe == "decode":
            lengths = gen_lengths(bcfg, cfg.seed, core.cfg.max_seq_len)
            elem = 2 if base["dtype"] == "bf16" else 4
            for bs in bcfg.batch_sizes:
                decode_probe(model, bcfg, bs, lengths[: bs * bcfg.warmup], device, autocast)  # warm-up
                res = decode_probe(model, bcfg, bs, lengths, device, autocast)
                rows.append(
                    {
                        **base,
                        "probe": "decode",
                        "batch_size": bs,
                        **res,
                        "kv_bytes_per_token_analytic": core.kv_bytes_per_token(elem),
                    }
                )
        elif probe == "train":
            rows.append({**base, "probe": "train", **train_probe(model, cfg, device, autocast)})
        elif probe == "memory":
            elem = 2 if base["dtype"] == "bf16" else 4
            params_b = sum(p.numel() * p.element_size() for p in core.parameters())
            kv = core.kv_bytes_per_token(elem) * core.cfg.max_seq_len
            rows.append({**base, "probe": "memory", "param_bytes": params_b, "kv_bytes_per_seq": kv})
        else:
            from models import ConfigError

            raise ConfigError(f"bench.probes contains {probe!r}: allowed decode, train, memory")
    if run_dir is not None:
        for r in rows:
            records.append_jsonl(Path(run_dir) / "bench.jsonl", r)
    for r in rows:
        log.info("bench %s: %s", r["probe"], {k: r[k] for k in ("tokens_per_s", "batch_size") if k in r})
    return rows
