"""Probes: decode throughput, training-step throughput, memory. Rows go to bench.jsonl.

    mor-bench model=mor_expert size=small bench=decode bench.weights=random

Decode (the paper's protocol, section 3 of reference/paper.md): prompt-free generation (one BOS
token) of `num_requests` requests whose lengths are drawn from Normal(gen_len_mean, gen_len_std),
served FIFO by the decode engine (harness/engine.py): continuous sequence-wise batching for
vanilla/recursive models, continuous depth-wise batching for MoR, static KV caches. Each batch size
in `batch_sizes` gives a row; `max_batch` adds the largest batch whose parameters + KV cache fit
`memory_budget_gb` (`max_batch_rule=relative`: the paper's 32 x fit(model)/fit(vanilla)).
tokens/s counts only generated tokens. Rows carry measured and analytic KV bytes per token, peak
memory, the exit-depth histogram (MoR) and the analytic forward-FLOP ratio to the vanilla model of
the same effective depth; the measured speed ratio is taken across runs by the analysis.
Expert-choice MoR decodes with its causal rule; with random weights its thresholds are first
calibrated to the trained capacities (and sampling, `temperature`, keeps the token stream close to
the calibration data).
"""

from __future__ import annotations

import copy
import logging
import resource
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from models import ConfigError, ModelConfig, build_model
from models import flops as flops_lib
from models.recursive import schedule

from . import records
from .config import model_config_from
from .engine import Request, make_engine
from .train import autocast_for

log = logging.getLogger("mor.bench")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROBES = ("decode", "train", "memory")
CHOICES = {
    "weights": ("run", "random"),
    "dtype": ("auto", "bf16", "fp32"),
    "max_batch_rule": ("fit", "relative"),
}


def validate_bench(bcfg) -> None:
    """Every bench.* value checked before any work (a typo must not cost a probe, or a training)."""
    bad = [p for p in bcfg.probes if p not in PROBES]
    if bad:  # [] is allowed: a pipeline whose bench stage probes nothing (e.g. experiment=routers)
        raise ConfigError(f"bench.probes={list(bcfg.probes)}: allowed a list of {', '.join(PROBES)}")
    for key, allowed in CHOICES.items():
        if bcfg[key] not in allowed:
            raise ConfigError(f"bench.{key}={bcfg[key]!r} is invalid: allowed {', '.join(allowed)}")
    if "decode" in bcfg.probes:
        if not bcfg.batch_sizes or min(bcfg.batch_sizes) < 1:
            raise ConfigError(
                f"bench.batch_sizes={list(bcfg.batch_sizes)} must be a non-empty list of ints >= 1"
            )
        for key, low in (("num_requests", 1), ("gen_len_mean", 1), ("gen_len_std", 0), ("prompt_len", 0)):
            if bcfg[key] < low:
                raise ConfigError(f"bench.{key}={bcfg[key]} must be >= {low}")
    for key, low in (("temperature", 0), ("kv_slack", 0), ("seq_slots_factor", 1), ("warmup", 0)):
        if bcfg[key] < low:
            raise ConfigError(f"bench.{key}={bcfg[key]} must be >= {low}")
    if not 0 < bcfg.flush_frac <= 1:
        raise ConfigError(f"bench.flush_frac={bcfg.flush_frac} must be in (0, 1]")
    if bcfg.train_steps < 1:
        raise ConfigError(f"bench.train_steps={bcfg.train_steps} must be >= 1")
    if bcfg.compile and bcfg.cuda_graphs:
        raise ConfigError(
            "bench.compile=true and bench.cuda_graphs=true: choose one (the graphs capture the eager layers)"
        )


def _model_overrides() -> list[str]:
    """`model.<key>=...` and group (`model=`, `size=`) overrides on this command line."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    keys = [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
    return [k for k in keys if k.startswith("model.") or k in ("model", "size")]


def check_run_architecture(cfg: DictConfig, run_cfg: DictConfig, run_dir: Path) -> None:
    """What the command line says about the model must match the trained run (e.g. model.kv: the KV
    strategy is part of the trained model; or model=/size= presets); silently benchmarking
    something else is worse."""
    overrides = _model_overrides()
    for k in (o.removeprefix("model.") for o in overrides if o.startswith("model.")):
        want, have = OmegaConf.select(cfg.model, k), OmegaConf.select(run_cfg.model, k)
        if want != have:
            raise ConfigError(
                f"model.{k}={want} was requested, but {run_dir} was trained with model.{k}={have}: "
                "benchmark its weights as trained (drop the override) or use bench.weights=random"
            )
    groups = [g for g in ("model", "size") if g in overrides]
    if groups:  # a preset: every model key it sets must agree
        want, have = OmegaConf.to_container(cfg.model), OmegaConf.to_container(run_cfg.model)
        diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        if diff:
            shown = ", ".join(f"model.{k}={want.get(k)} (trained: {have.get(k)})" for k in diff[:4])
            raise ConfigError(
                f"{'= / '.join(groups)}= on the command line selects a model unlike the one {run_dir} "
                f"trained: {shown}: drop the override to benchmark its weights, or use bench.weights=random"
            )


def load_bench_model(cfg: DictConfig, run_dir: Path | None, device: torch.device):
    """(model, weights label): a run's trained checkpoint, or random init with calibrated routing."""
    if cfg.bench.weights == "run" and run_dir is not None and records.latest_checkpoint(run_dir):
        loaded = records.load_run(run_dir, device=str(device))
        check_run_architecture(cfg, loaded.config, run_dir)
        return loaded.model, "trained"
    if cfg.bench.weights == "run" and cfg.get("run_dir"):  # named explicitly: its weights were meant
        raise ConfigError(
            f"run_dir={cfg.run_dir} has no checkpoint to benchmark: train it first, or set "
            "bench.weights=random to probe a randomly initialised model"
        )
    torch.manual_seed(cfg.seed)
    model = build_model(model_config_from(cfg.model)).to(device).eval()
    if hasattr(model, "calibrate"):
        ids = torch.randint(0, model.cfg.vocab_size, (4, min(256, model.cfg.max_seq_len)), device=device)
        model.calibrate([ids])
    return model, "random"


BOS = 0  # prompt-free generation starts every request from this one token

# Dense (no sparsity) peak FLOP/s per GPU from the vendors' data sheets, by compute dtype; fp32 is
# plain FP32 (no TF32). Matched by substring of torch.cuda.get_device_name(); first match wins.
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp32": 67e12},  # SXM
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp32": 30.3e12},
}


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The table's peak for this device and dtype; None when unknown (CPUs: MFU is not reported)."""
    for key, peaks in PEAK_FLOPS.items():
        if key in device_name:
            return peaks.get(dtype)
    return None


def gen_lengths(bcfg, seed: int, max_len: int) -> list[int]:
    """Generated tokens per request ~ Normal(gen_len_mean, gen_len_std), clipped to [1, context]
    (the mean itself must fit: a tail is clipped, a distribution is not)."""
    if 1 + bcfg.prompt_len + bcfg.gen_len_mean > max_len:
        raise ConfigError(
            f"bench.prompt_len={bcfg.prompt_len} + 1 BOS + bench.gen_len_mean={bcfg.gen_len_mean} "
            f"exceeds the model's context model.max_seq_len={max_len}"
        )
    g = torch.Generator().manual_seed(seed)
    lens = torch.normal(
        float(bcfg.gen_len_mean), float(max(bcfg.gen_len_std, 0)), (bcfg.num_requests,), generator=g
    ).round()
    top = max_len - 1 - bcfg.prompt_len
    clipped = int((lens > top).sum())
    if clipped:
        log.warning(
            "bench: %d of %d generation lengths drawn above the context's %d tokens were clipped to it "
            "(bench.gen_len_mean=%d, bench.gen_len_std=%d, model.max_seq_len=%d)",
            clipped,
            len(lens),
            top,
            bcfg.gen_len_mean,
            bcfg.gen_len_std,
            max_len,
        )
    return [int(x) for x in lens.clamp(1, top)]


def vanilla_config(cfg: ModelConfig) -> ModelConfig:
    """The vanilla Transformer a model is compared with: same shapes, its effective depth (the paper
    compares MoR-4, 1 + 8x4 + 1 layers, with a 34-layer vanilla)."""
    return replace(
        cfg, family="vanilla", n_layers=len(schedule(cfg)), num_recursions=1, kv="cache", block_layers=None
    )


def _decode_context(lengths: list[int], prompt: int) -> float:
    """Mean number of keys a decoded token attends to (fed token at position p sees p + 1)."""
    fed = [prompt + n - 1 for n in lengths]
    return sum(t * (t + 1) / 2 for t in fed) / max(1, sum(fed))


def memory_fit(core, bcfg, elem: int, max_len: int) -> dict:
    """Largest decode batch within bench.memory_budget_gb: parameter bytes + analytic KV bytes per
    sequence at the static cache length (hidden states omitted, as in the paper)."""
    budget = bcfg.memory_budget_gb * 2**30

    def fit(params: float, kv_tok: float) -> tuple[int, float, float]:
        per_seq = kv_tok * max_len
        return int((budget - params) // per_seq) if budget > params else 0, params, per_seq

    b, params, per_seq = fit(
        core.num_params(unique=True, embedding=True) * elem, core.kv_bytes_per_token(elem)
    )
    vcfg = vanilla_config(core.cfg)
    with torch.device("meta"):
        vparams = build_model(vcfg).num_params(unique=True, embedding=True) * elem
    bv, _, _ = fit(vparams, flops_lib.kv_bytes_per_token(vcfg, elem, [1.0]))
    return {"fit": b, "fit_vanilla": bv, "param_bytes": params, "kv_bytes_per_seq": per_seq, "budget": budget}


def seqs_per_slot(bcfg, model) -> float:
    """MoR's decode batch is the shared block's slots, refilled from bench.seq_slots_factor x as
    many sequences in flight; every other family decodes one sequence per batch row."""
    return bcfg.seq_slots_factor if hasattr(model, "router") else 1.0


def sequences_in_flight(bcfg, model, batch_size: int) -> int:
    """Sequences (KV rows) a decode batch of `batch_size` holds."""
    return max(batch_size, round(seqs_per_slot(bcfg, model) * batch_size))


def check_batches(bcfg, mem: dict, model) -> None:
    """A requested batch that cannot fit is a user error: say so before any decoding."""
    for bs in bcfg.batch_sizes:
        seqs = sequences_in_flight(bcfg, model, bs)
        need = mem["param_bytes"] + seqs * mem["kv_bytes_per_seq"]
        if need > mem["budget"]:
            raise ConfigError(
                f"bench.batch_sizes: batch {bs} ({seqs} sequences in flight) needs {need / 2**30:.2f} GiB "
                f"(parameters {mem['param_bytes'] / 2**30:.2f} GiB + KV "
                f"{mem['kv_bytes_per_seq'] / 2**20:.1f} MiB per sequence) > "
                f"bench.memory_budget_gb={bcfg.memory_budget_gb}; the most sequences that fit: {mem['fit']}"
            )


def max_batch_size(bcfg, mem: dict, model) -> int:
    if bcfg.max_batch_rule == "fit":  # the largest batch whose sequences in flight fit
        return int(mem["fit"] // seqs_per_slot(bcfg, model))
    if bcfg.max_batch_rule == "relative":  # paper: 32 x (max batch of the model / of vanilla)
        return max(1, round(bcfg.batch_sizes[0] * mem["fit"] / max(1, mem["fit_vanilla"])))
    raise ConfigError(f"bench.max_batch_rule={bcfg.max_batch_rule!r} is invalid: allowed fit, relative")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"  # Linux: KiB


def _compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@torch.no_grad()
def decode_probe(model, bcfg, batch_size: int, lengths: list[int], device, seed: int = 0) -> dict:
    """Serve `lengths` prompt-free requests through the decode engine; throughput, memory, routing.

    Vanilla/recursive: continuous sequence-wise batching over `batch_size` rows. MoR: continuous
    depth-wise batching, `batch_size` items per shared-block pass, `seq_slots_factor x batch_size`
    sequences in flight, exits flushed through the last layer/head at `flush_frac x batch_size`."""
    prompt = [BOS] * (1 + bcfg.prompt_len)
    max_len = len(prompt) + max(lengths) - 1
    slots = sequences_in_flight(bcfg, model, batch_size)
    kw = {}
    if hasattr(model, "router"):
        kw = {
            "seq_slots": slots,
            "flush_at": max(1, round(bcfg.flush_frac * batch_size)),
            "kv_slack": bcfg.kv_slack,
        }
    cpu = device.type == "cpu"
    engine = make_engine(
        model,
        batch_size,
        max_len,
        temperature=bcfg.temperature,
        seed=seed,
        compile=bcfg.compile,
        cuda_graphs=bcfg.cuda_graphs,
        time_layers=cpu,
        **kw,
    )
    if bcfg.warmup > 0:
        # untimed: twice the slots' worth of requests, their lengths scaled to at most `warmup`
        # steps but as ragged as the real ones, so refills, partial batches and every read mode
        # happen (allocations; under compile, the graphs those shapes need)
        top = max(lengths)
        warm = [max(1, n * min(bcfg.warmup, top) // top) for n in lengths[: 2 * slots]]
        engine.run([Request(prompt, n) for n in warm])
    reqs = [Request(prompt, n) for n in lengths]

    def captures() -> int:  # CUDA graphs captured so far (cuda_graphs on a GPU)
        return engine.stage_graphs.captures if bcfg.cuda_graphs else 0

    graphs, cuda_graphs = _compiled_graphs(), captures()
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    results = engine.run(reqs)
    _sync(device)
    dt = time.perf_counter() - t0
    graphs, cuda_graphs = _compiled_graphs() - graphs, captures() - cuda_graphs
    peak, peak_kind = _peak(device)
    st = engine.stats
    n_tok = sum(lengths)
    lat = sorted(r.stats["latency_s"] for r in results)
    row = {
        "tokens_per_s": n_tok / dt,
        "ms_per_step": 1000 * dt / max(1, st["steps"]),
        "elapsed_s": dt,
        "steps": st["steps"],
        "generated_tokens": n_tok,
        "num_requests": len(reqs),
        "gen_len_mean_measured": n_tok / len(reqs),
        "latency_s_p50": lat[len(lat) // 2],
        "max_len": max_len,
        "temperature": bcfg.temperature,
        "kv_bytes_per_token": st["kv_bytes_per_token"],  # measured: cache entries actually written
        "kv_bytes_allocated": engine.kv_bytes_allocated(),  # static buffers (MoR: sized by capacity)
        "engine_extra_weight_bytes": engine.extra_weight_bytes(),  # fused, transposed weight copies (CPU)
        "peak_mem_bytes": peak,
        "peak_mem_kind": peak_kind,
        "compiled_while_timed": graphs,  # graphs torch.compile built inside the timed run (want 0)
        "cuda_graphs_captured_while_timed": cuda_graphs,  # (want 0; a widened MoR cache recaptures)
        "engine": type(engine).__name__,
        "engine_routing_exact": getattr(engine, "routing_exact", True),  # False: Router.engine_exact
        # {tokens in a layer call: calls}, keys as strings so the row reads back from JSON unchanged
        "layer_calls_by_tokens": {str(n): c for n, c in st["layer_calls_by_tokens"].items()},
    }
    if cpu:  # where the time goes (CPU: a layer call's ops are done when it returns)
        calls = sum(st["layer_calls_by_tokens"].values())
        row.update(
            layer_share=st["layer_s"] / dt,  # of the timed run, inside layer calls (the rest: embedding,
            # head, sampling, routing, host scheduling and uploads)
            ms_per_layer_call=1000 * st["layer_s"] / max(1, calls),
        )
    if "depth_counts" in st:
        counts = st["depth_counts"]
        total = max(1, sum(counts))
        row.update(
            depth_hist=[c / total for c in counts],  # share of tokens by exit depth 0..N_r
            depth_fractions=[sum(counts[r + 1 :]) / total for r in range(len(counts) - 1)],
            seq_slots=st["seq_slots"],
            flush_at=st["flush_at"],
            kv_grows=st.get("kv_grows", 0),  # recursion caches widened past capacity x (1 + kv_slack)
            block_steps=st["block_steps"],
            edge_steps=st["edge_steps"],
            mean_block_items=st["block_items"] / max(1, st["block_steps"]),
            mean_edge_exits=st["edge_exits"] / max(1, st["edge_steps"]),
        )
    return row


def decode_accounting(core, row: dict, elem: int, ctx: float) -> dict:
    """Analytic KV bytes and forward FLOPs per token next to the measurements, and the FLOP ratio
    to the vanilla model of the same size (its measured speed ratio comes from its own rows)."""
    design = core.depth_fractions()
    fractions = row.get("depth_fractions") or design
    vcfg = vanilla_config(core.cfg)
    out = {
        "kv_bytes_per_token_analytic": core.kv_bytes_per_token(elem),
        "kv_bytes_per_token_analytic_at_depths": core.kv_bytes_per_token(elem, fractions),
        "decode_context": ctx,
    }
    for conv in ("exact", "paper"):
        sfx = "" if conv == "exact" else "_paper"
        f_run = core.flops_per_token(round(ctx), conv, fractions).forward
        f_design = core.flops_per_token(round(ctx), conv, design).forward
        f_van = flops_lib.flops_per_token(vcfg, round(ctx), conv, [1.0]).forward
        out.update(
            {
                f"flops_per_token_decode{sfx}": f_run,
                f"flops_per_token_decode_vanilla{sfx}": f_van,
                f"flop_ratio_vs_vanilla{sfx}": f_run / f_van,  # at the depths tokens reached
                f"flop_ratio_vs_vanilla_design{sfx}": f_design / f_van,  # at the router's capacities
            }
        )
    out["flop_speedup_vs_vanilla"] = 1 / out["flop_ratio_vs_vanilla"]
    return out


def train_probe(model, core, cfg: DictConfig, device, autocast, dtype: str) -> dict:
    """Median train-step time (fwd + bwd + AdamW) at the run's micro-batch and sequence length;
    tokens/s, peak memory, and MFU = tokens/s x exact training FLOPs per token / the device's
    peak (PEAK_FLOPS; None where the device is not in the table)."""
    bcfg = cfg.bench
    model.train()
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len
    ids = torch.randint(0, model.cfg.vocab_size, (B, T + 1), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    _reset_peak(device)
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
    peak_mem, peak_kind = _peak(device)
    tok_s = B * T / step
    flops_tok = core.flops_per_token(T, "exact").train
    peak = peak_flops(records.device_name(device), dtype)
    return {
        "tokens_per_s": tok_s,
        "ms_per_step": 1000 * step,
        "batch_size": B,
        "seq_len": T,
        "flops_per_token_train": flops_tok,
        "achieved_flops": tok_s * flops_tok,
        "peak_flops": peak,
        "mfu": tok_s * flops_tok / peak if peak else None,
        "peak_mem_bytes": peak_mem,
        "peak_mem_kind": peak_kind,
    }


def run_bench(cfg: DictConfig, run_dir: Path | None) -> list[dict]:
    bcfg = cfg.bench
    validate_bench(bcfg)
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
        "cuda_graphs": bool(bcfg.cuda_graphs),
        "family": core.cfg.family,
        "routing": getattr(core, "routing_rule", None),
        "flops_per_token_forward": core.flops_per_token(cfg.data.seq_len, "exact").forward,
        "params_unique": core.num_params(unique=True, embedding=True),
        # traceable without the run directory's other files (a probe-only run has no env.json or
        # config.yaml): versions, host, and the configs of the model probed and of the probe
        **{k: v for k, v in records.env_info(device).items() if k != "time"},
        "model_config": asdict(core.cfg),
        "bench_config": OmegaConf.to_container(bcfg, resolve=True),
    }
    rows = []

    def emit(row: dict) -> None:  # each row is written as it is measured: a killed run keeps the rest
        rows.append(row)
        if run_dir is not None:
            records.append_jsonl(Path(run_dir) / "bench.jsonl", row)

    for probe in bcfg.probes:
        if probe == "decode":
            lengths = gen_lengths(bcfg, cfg.seed, core.cfg.max_seq_len)
            elem = 2 if base["dtype"] == "bf16" else 4
            dec = core
            if base["dtype"] == "bf16" and next(core.parameters()).dtype != torch.bfloat16:
                dec = copy.deepcopy(core).to(torch.bfloat16)  # the engine decodes in the weights' dtype
            max_len = 1 + bcfg.prompt_len + max(lengths) - 1
            mem = memory_fit(core, bcfg, elem, max_len)
            check_batches(bcfg, mem, core)
            batches = [(bs, "fixed") for bs in bcfg.batch_sizes]
            b_max = max_batch_size(bcfg, mem, core) if bcfg.max_batch else None
            if b_max is not None:  # a batch beyond the queue would only allocate idle rows
                batches.append((max(1, min(b_max, len(lengths))), "max"))
            ctx = _decode_context(lengths, 1 + bcfg.prompt_len)
            measured = {}
            for bs, kind in batches:
                if bs in measured:  # e.g. vanilla's relative max batch is its fixed 32: measured once
                    emit({**measured[bs], "batch_kind": kind, "measured_as": measured[bs]["batch_kind"]})
                    continue
                log.info(
                    "decode probe: batch %d (%s), %d requests, %d tokens%s",
                    *(bs, kind, len(lengths), sum(lengths)),
                    " (compiling first: minutes on CPU)" if bcfg.compile else "",
                )
                res = decode_probe(dec, bcfg, bs, lengths, device, seed=cfg.seed)
                measured[bs] = {
                    **base,
                    "probe": "decode",
                    "batch_size": bs,
                    "batch_kind": kind,
                    **res,
                    **decode_accounting(core, res, elem, ctx),
                    "max_batch_rule": bcfg.max_batch_rule,
                    "max_batch_computed": b_max,  # before clipping to the number of requests
                    "max_batch_fit": mem["fit"],
                    "max_batch_fit_vanilla": mem["fit_vanilla"],
                    "memory_budget_gb": bcfg.memory_budget_gb,
                }
                emit(measured[bs])
        elif probe == "train":
            res = train_probe(model, core, cfg, device, autocast, base["dtype"])
            emit({**base, "probe": "train", **res})
        elif probe == "memory":
            elem = 2 if base["dtype"] == "bf16" else 4
            params_b = sum(p.numel() * p.element_size() for p in core.parameters())
            kv = round(core.kv_bytes_per_token(elem) * core.cfg.max_seq_len)
            emit({**base, "probe": "memory", "param_bytes": params_b, "kv_bytes_per_seq": kv})
    shown = ("batch_size", "tokens_per_s", "mfu", "peak_mem_bytes", "param_bytes", "kv_bytes_per_seq")
    for r in rows:
        log.info("bench %s: %s", r["probe"], {k: r[k] for k in shown if k in r})
    return rows
