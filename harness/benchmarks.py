"""`make bench`: the performance targets of the issues, measured side by side, written as JSON.

    python -m harness.benchmarks --out results/bench [--size small] [--quick] [--only NAME ...]

* model_speed: our vanilla forward+backward tokens/s vs transformers' LlamaForCausalLM (sdpa) on the
  same config and weights, eager and torch.compile'd (goal >= 1.2x).
* mor_step_ratio: MoR expert-choice N_r=3 train-step time / vanilla's, next to the analytic FLOP
  ratio (goal: within 15%).
* probes: decode / train / memory probes for vanilla, recursive, MoR-expert, MoR-token
  (random weights, routers calibrated to their capacities).
* decode_ratio: MoR-E (N_r=3) decode tokens/s over vanilla's at batch 32, runs interleaved (in
  alternating order) and repeated (median of the rounds' ratios), at `small_deep` (the paper's
  32-layer layout: MoR is 1+10x3+1), `small` and
  `medium` (8 layers: a 2-layer shared block), next to the analytic FLOP speed-up (goal: >= 90% of
  it, and more at the maximum batch), over the paper's 1000 requests (lengths ~64 instead of
  256 on CPU). MoR's batch is the shared block's 32 slots, refilled at once
  from twice as many sequences in flight (the paper's regime); also MoR at the relative maximum
  batch and with only vanilla's 32 sequences in flight; the layer weight passes per generated token
  of each, and the speed-up each MoR run's layer calls alone allow (`layer_time_ceiling`: every
  call priced at the measured cost of the engine's layer at its number of tokens,
  `layer_ms_by_tokens`), and where each run's time went (`ms_per_layer_call`,
  `share_outside_layers`). `speedup` times everything; `speedup_layer_phase` only the time inside
  the layer calls, closer to the paper's protocol (which times the transformer-block phase and
  leaves out embedding, first layer and KV bookkeeping).
Every file carries the device, versions and git SHA.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from models import ModelConfig, build_model

from . import records

CONF = Path(__file__).parents[1] / "conf"


def _size(name: str) -> dict:
    """The model keys of a conf/size preset (one source of truth for sizes)."""
    return OmegaConf.to_container(OmegaConf.load(CONF / "size" / f"{name}.yaml").model)


SIZES = {name: _size(name) for name in ("tiny", "small", "medium", "small_deep")}
# the paper's decode workload (conf/bench/paper.yaml): 1K requests at batch 32, about 31 per vanilla
# row. With few requests per row the drain (the queue empty, the last sequences finishing in ever
# emptier passes) is a large part of the run, and a larger one for MoR, which holds more sequences:
# at 256 requests of ~64 tokens MoR's block passes averaged 29.3 of 32 items (6.3 in the last tenth
# of them), at 1024 31.3
PAPER_REQUESTS = OmegaConf.load(CONF / "bench" / "paper.yaml").num_requests


def _median_time(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _interleaved_median_times(fns, warmup: int, iters: int) -> list[float]:
    """Median wall time of each of `fns`, timed in turn (a, b, a, b, ...) so that drift in the
    machine's speed hits every side alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def _fwd_bwd(model, ids, hf: bool):
    def step():
        if hf:
            out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
        else:
            out = model(ids[:, :-1], labels=ids[:, 1:])
        loss = out.loss + sum(getattr(out, "aux_losses", {}).values(), torch.zeros(()))
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def model_speed(size: dict, batch: int, seq: int, iters: int) -> dict:
    """Our vanilla vs HF Llama (sdpa), same weights, CPU fp32, forward+backward."""
    from models.hf_io import export_hf

    torch.manual_seed(0)
    ours = build_model(ModelConfig(family="vanilla", **size))
    import tempfile

    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as d:
        export_hf(ours, d)
        hf = LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa", torch_dtype=torch.float32)
    ids = torch.randint(0, size["vocab_size"], (batch, seq + 1))
    out = {"batch": batch, "seq_len": seq}
    for name, model, is_hf in (("ours", ours, False), ("hf", hf, True)):
        model.train()
        out[f"{name}_eager_tok_s"] = batch * seq / _median_time(_fwd_bwd(model, ids, is_hf), 2, iters)
        compiled = torch.compile(model)
        out[f"{name}_compiled_tok_s"] = batch * seq / _median_time(_fwd_bwd(compiled, ids, is_hf), 2, iters)
    out["speedup_eager"] = out["ours_eager_tok_s"] / out["hf_eager_tok_s"]
    out["speedup_compiled"] = out["ours_compiled_tok_s"] / out["hf_compiled_tok_s"]
    out["goal"] = ">= 1.2x"
    return out


def mor_step_ratio(size: dict, batch: int, seq: int, iters: int) -> dict:
    """Train-step time MoR-E (N_r=3) / vanilla vs their analytic exact train-FLOP ratio (steps timed
    in turn, so drift in the machine's speed hits both alike)."""
    torch.manual_seed(0)
    ids = torch.randint(0, size["vocab_size"], (batch, seq + 1))
    van = build_model(ModelConfig(family="vanilla", **size))
    mor = build_model(ModelConfig(family="mor", num_recursions=3, sharing="middle_cycle", **size))
    tv, tm = _interleaved_median_times(
        [_fwd_bwd(van.train(), ids, False), _fwd_bwd(mor.train(), ids, False)], 2, iters
    )
    fv = van.flops_per_token(seq, "exact").train
    fm = mor.flops_per_token(seq, "exact").train
    time_ratio, flop_ratio = tm / tv, fm / fv
    return {
        "batch": batch,
        "seq_len": seq,
        "vanilla_ms": 1000 * tv,
        "mor_ms": 1000 * tm,
        "time_ratio": time_ratio,
        "flop_ratio": flop_ratio,
        "relative_gap": time_ratio / flop_ratio - 1,
        "goal": "|relative_gap| <= 0.15",
    }


def eval_speed(size: dict, limit: int) -> dict:
    """Our lm-eval adapter vs lm-eval's `hf` backend on the same exported vanilla weights and the
    same multiple-choice task (demo_mc through simple_evaluate): requests/s and scores."""
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast

    from models.hf_io import export_hf

    from .data import synthetic_tokenizer
    from .evaluate import task_manager
    from .lm_eval_adapter import MoRLM
    from .tasks import write_demo_tasks

    torch.manual_seed(0)
    tok = synthetic_tokenizer()
    # the paper's 49152-token vocabulary (rows past the synthetic tokenizer's are simply unused):
    # the LM head over every position is what an adapter that scores only needed positions saves
    model = build_model(ModelConfig(family="vanilla", **{**size, "vocab_size": 49152})).eval()
    out: dict = {"task": "demo_mc", "limit": limit, "batch_size": 32, "vocab_size": 49152}
    with tempfile.TemporaryDirectory() as d:
        export_hf(model, f"{d}/hf")
        PreTrainedTokenizerFast(
            tokenizer_object=tok.backend, eos_token=tok.backend.id_to_token(tok.eos_id)
        ).save_pretrained(f"{d}/hf")
        tm = task_manager(["demo_mc"], [str(write_demo_tasks(Path(d) / "tasks", n=limit))])
        lms = {
            "ours": MoRLM.from_model(model, tok, batch_size=32),
            "hf": HFLM(pretrained=f"{d}/hf", device="cpu", batch_size=32, dtype="float32"),
        }
        for lm in lms.values():  # warm-up: lm-eval's task building and first-call costs, untimed
            simple_evaluate(model=lm, tasks=["demo_mc"], task_manager=tm, limit=8, bootstrap_iters=0)
        for name, lm in lms.items():
            t0 = time.perf_counter()
            res = simple_evaluate(
                model=lm, tasks=["demo_mc"], task_manager=tm, limit=limit, bootstrap_iters=0
            )
            dt = time.perf_counter() - t0
            n_req = 4 * limit  # demo_mc: one loglikelihood request per choice, 4 choices
            out[f"{name}_s"] = dt
            out[f"{name}_requests_per_s"] = n_req / dt
            out[f"{name}_acc"] = res["results"]["demo_mc"]["acc,none"]
    out["speedup"] = out["ours_requests_per_s"] / out["hf_requests_per_s"]
    out["same_scores"] = out["ours_acc"] == out["hf_acc"]
    out["goal"] = ">= 2x with the same scores"
    return out


def decode_vs_hf(size: dict, batch: int, new_tokens: int) -> dict:
    """Greedy prompt-free decoding: our engine (vanilla) vs transformers' generate with a static
    cache, same exported weights, same batch; tokens must agree."""
    import tempfile

    from transformers import LlamaForCausalLM

    from models.hf_io import export_hf

    from .engine import Request, make_engine

    torch.manual_seed(0)
    ours = build_model(ModelConfig(family="vanilla", **size)).eval()
    with tempfile.TemporaryDirectory() as d:
        export_hf(ours, d)
        hf = LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32).eval()
    bos = torch.zeros(batch, 1, dtype=torch.long)
    engine = make_engine(ours, batch, new_tokens + 1, temperature=0.0)
    reqs = [Request([0], new_tokens) for _ in range(batch)]

    def run_ours():
        return engine.run(reqs)

    def run_hf():
        return hf.generate(
            bos,
            attention_mask=torch.ones_like(bos),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )

    with torch.inference_mode():
        t_ours, t_hf = _interleaved_median_times([run_ours, run_hf], warmup=1, iters=5)
        same = [r.tokens for r in run_ours()] == run_hf()[:, 1:].tolist()
    n = batch * new_tokens
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "ours_tok_s": n / t_ours,
        "hf_static_tok_s": n / t_hf,
        "speedup": t_hf / t_ours,
        "same_tokens": same,
        "goal": ">= 1.5x",
    }


def layer_costs(model, tokens: list[int], ctx: int, iters: int = 15) -> dict[int, float]:
    """Seconds per call of the engine's decode layer (vanilla weights, in-place reads of `ctx` keys
    per row) at each token count: the per-call cost model behind `decode_ratio`'s ceilings."""
    from .engine import _Pack, decode_layer, make_engine

    eng = make_engine(model, max(tokens), ctx + 1)
    layer, (kb, vb) = eng.slots[0][0], eng.buffers[0]
    out = {}
    for n in tokens:
        rows, pos = np.arange(n), np.full(n, ctx - 1)
        pack = _Pack()
        w = pack.put(eng._widx(rows, pos))
        seg = eng._read(pack, 0, n, n, rows, pos + 1, ctx + 1)
        parts = eng._upload(pack, [seg])
        x = torch.randn(n, model.cfg.d_model)
        cos, sin = eng._rope(torch.as_tensor(pos))

        def ten_calls(x=x, cos=cos, sin=sin, w=parts[w], seg=seg, n=n):
            for _ in range(10):
                decode_layer(layer, x, cos, sin, kb, vb, w, n, [seg])

        out[n] = _median_time(ten_calls, warmup=2, iters=iters) / 10
    return out


def decode_ratio(
    size: dict, batch: int, num_requests: int, gen_len: int, repeats: int, slots_factor: float = 2.0
) -> dict:
    """MoR-E N_r=3 vs vanilla decode tokens/s through the engine (random weights, thresholds
    calibrated to the capacities), `repeats` rounds of every run (in alternating order: the VM's
    speed drifts), each ratio the median of its rounds' ratios; with the analytic
    forward-FLOP speed-up at the depths the tokens actually reached.

    Vanilla decodes `batch` sequences (continuous sequence-wise batching). MoR's batch is the
    shared block's `batch` slots, refilled at once from `slots_factor x batch` sequences in flight
    while exited tokens wait for the last layer (the paper's B=32 regime: "the vacant slots in the
    batch are immediately filled with new queries"); the same at the paper's relative maximum
    batch (batch x maxB(MoR) / maxB(vanilla) from parameters + KV cache in an 80 GB budget); and,
    side by side, MoR with only vanilla's `batch` sequences in flight, where the block runs partly
    empty while exits wait."""
    from dataclasses import replace

    from .bench import (
        _decode_context,
        decode_accounting,
        decode_probe,
        gen_lengths,
        max_batch_size,
        memory_fit,
    )
    from .config import BenchConfig

    bcfg = BenchConfig(
        warmup=8,
        gen_len_mean=gen_len,
        gen_len_std=gen_len // 4,
        num_requests=num_requests,
        memory_budget_gb=80.0,
        batch_sizes=[batch],
        max_batch_rule="relative",
    )
    lengths = gen_lengths(bcfg, 0, size["max_seq_len"])
    models = {}
    for name, kw in (("vanilla", {}), ("mor_expert", dict(num_recursions=3, sharing="middle_cycle"))):
        torch.manual_seed(0)
        m = build_model(ModelConfig(family="vanilla" if not kw else "mor", **size, **kw)).eval()
        if kw:
            m.calibrate([torch.randint(0, size["vocab_size"], (4, min(256, size["max_seq_len"])))])
        models[name] = m
    mor = models["mor_expert"]
    filled = replace(bcfg, seq_slots_factor=slots_factor)
    batch_max = max_batch_size(filled, memory_fit(mor, bcfg, 4, max(lengths)), mor)
    runs = {
        "vanilla": (models["vanilla"], batch, bcfg),
        "mor_expert": (mor, batch, filled),
        "mor_expert_max": (mor, batch_max, filled),
        "mor_expert_batch_seqs": (mor, batch, bcfg),  # only `batch` sequences in flight
    }
    rows: dict[str, list[dict]] = {k: [] for k in runs}
    for i in range(repeats):
        for name in list(runs)[:: 1 if i % 2 == 0 else -1]:
            m, b, c = runs[name]
            rows[name].append(decode_probe(m, c, b, lengths, torch.device("cpu")))

    def mid(key: str) -> dict[str, float]:  # each run's median over the repeats
        return {k: sorted(r[key] for r in v)[len(v) // 2] for k, v in rows.items()}

    med = mid("tokens_per_s")
    mor_row = rows["mor_expert"][0]
    ctx = _decode_context(lengths, 1)
    acc = decode_accounting(mor, mor_row, 4, ctx)

    def paired(seconds: dict[str, list[float]]) -> dict[str, float]:
        """Each MoR run's speed-up: the median over rounds of vanilla's seconds over its own, paired
        within a round (the runs next to each other in time; every run serves the same tokens)."""
        return {
            k: float(np.median([v / m for m, v in zip(seconds[k], seconds["vanilla"])]))
            for k in runs
            if k != "vanilla"
        }

    speedup = paired({k: [r["elapsed_s"] for r in v] for k, v in rows.items()})
    # the paper's protocol times only the transformer-block phase (no embedding, head, sampling
    # or KV bookkeeping): the time inside the layer calls (ours still include every unique layer
    # and the KV reads and writes)
    layer_s = {k: [r["elapsed_s"] * r["layer_share"] for r in v] for k, v in rows.items()}
    speedup_layers = paired(layer_s)
    flop_speedup = acc["flop_speedup_vs_vanilla"]
    # what the layers alone allow: each run's layer calls (by tokens per call) priced at the
    # measured per-call cost of the engine's layer, vanilla's total over each MoR run's
    calls = {k: {int(n): c for n, c in v[0]["layer_calls_by_tokens"].items()} for k, v in rows.items()}
    grid = sorted({1, 2, 4, 8, 12, 16, 20, 24, 28, 32} | {max(c) for c in calls.values()})
    with torch.inference_mode():
        cost = layer_costs(models["vanilla"], grid, round(ctx))
    ns, ts = list(cost), list(cost.values())

    def layer_time(c: dict) -> float:
        return sum(k * float(np.interp(n, ns, ts)) for n, k in c.items())

    n_tok = mor_row["generated_tokens"]  # every run serves the same requests
    ceiling = {k: layer_time(calls["vanilla"]) / layer_time(c) for k, c in calls.items() if k != "vanilla"}
    first = {k: v[0] for k, v in rows.items()}
    return {
        "batch": batch,
        "batch_max_mor": batch_max,
        "seq_slots": {k: r.get("seq_slots", batch) for k, r in first.items()},  # sequences in flight
        "num_requests": num_requests,
        "gen_len_mean": gen_len,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "vanilla_tok_s": med["vanilla"],
        "mor_tok_s": med["mor_expert"],
        "mor_max_batch_tok_s": med["mor_expert_max"],
        "mor_batch_seqs_tok_s": med["mor_expert_batch_seqs"],
        "all_tok_s": {k: [r["tokens_per_s"] for r in v] for k, v in rows.items()},
        "all_layer_s": layer_s,  # each round's seconds inside layer calls
        "speedup": speedup["mor_expert"],
        "speedup_max_batch": speedup["mor_expert_max"],
        "speedup_batch_seqs": speedup["mor_expert_batch_seqs"],
        "flop_speedup": flop_speedup,
        "fraction_of_flop_speedup": speedup["mor_expert"] / flop_speedup,
        "speedup_layer_phase": speedup_layers,  # time inside layer calls only (the paper's protocol)
        "fraction_of_flop_speedup_layer_phase": speedup_layers["mor_expert"] / flop_speedup,
        "depth_fractions": mor_row["depth_fractions"],
        "mean_block_items": {k: r["mean_block_items"] for k, r in first.items() if k != "vanilla"},
        # layer weight passes per generated token: at batch <= 32 a pass costs about the same
        # whatever the number of tokens riding along (weights are read once per pass)
        "layer_passes_per_token": {k: sum(c.values()) / n_tok for k, c in calls.items()},
        "kv_bytes_allocated": {k: r["kv_bytes_allocated"] for k, r in first.items()},
        "layer_ms_by_tokens": {n: 1000 * t for n, t in cost.items()},
        # where each run's time went (timed in the runs): per layer call (MoR: reads gathered from a
        # scattered subset of the slots), and the share outside the layer calls (host scheduling,
        # routing, uploads, embedding, head, sampling: per engine step)
        "ms_per_layer_call": mid("ms_per_layer_call"),
        "share_outside_layers": {k: 1 - v for k, v in mid("layer_share").items()},
        "layer_time_ceiling": ceiling,  # the speed-up the layer calls alone allow, per MoR run
        "fraction_of_ceiling": {k: speedup[k] / ceiling[k] for k in ceiling},
        "goal": "speedup >= 0.9 x flop_speedup, and speedup_max_batch > speedup",
        "meets_goal": speedup["mor_expert"] >= 0.9 * flop_speedup,
        "meets_goal_layer_phase": speedup_layers["mor_expert"] >= 0.9 * flop_speedup,
        "max_batch_beats_batch": speedup["mor_expert_max"] > speedup["mor_expert"],
    }


def loader_speed(seq_len: int, batch: int) -> dict:
    """The synthetic loader's tokens/s, to set next to the models' training tokens/s."""
    from .data import DataConfig, build_loader, measure_loader_throughput, synthetic_tokenizer

    cfg = DataConfig(seq_len=seq_len)
    tok_s = measure_loader_throughput(build_loader(cfg, synthetic_tokenizer(), "train", batch), 50)
    return {"source": "synthetic", "seq_len": seq_len, "batch": batch, "tokens_per_s": tok_s}


def probes(size_name: str, quick: bool, kinds: str = "decode,train,memory") -> list[dict]:
    from hydra import compose, initialize_config_module

    from .bench import run_bench
    from .config import register_configs

    register_configs()
    rows = []
    models = ["vanilla", "recursive", "mor_expert", "mor_token"]
    with initialize_config_module("conf", version_base="1.3"):
        for m in models:
            cfg = compose(
                "config",
                overrides=[
                    f"model={m}",
                    f"size={size_name}",
                    f"bench.probes=[{kinds}]",
                    "bench.weights=random",
                    f"bench.batch_sizes={[4] if quick else [8, 32]}",
                    f"bench.num_requests={8 if quick else 256}",  # 8 waves of 32: steady state
                    f"bench.gen_len_mean={32 if quick else 64}",
                    f"bench.gen_len_std={8 if quick else 16}",
                ],
            )
            for r in run_bench(cfg, None):
                rows.append({"model": m, "size": size_name, **r})
    van = {
        (r["probe"], r.get("batch_size")): r["tokens_per_s"]
        for r in rows
        if r["model"] == "vanilla" and "tokens_per_s" in r
    }
    for r in rows:
        if "tokens_per_s" in r and (r["probe"], r.get("batch_size")) in van:
            r["speed_ratio_vs_vanilla"] = r["tokens_per_s"] / van[(r["probe"], r.get("batch_size"))]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke check)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks (names below)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    env = records.env_info("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES[args.size]
    iters = 3 if args.quick else 10
    benches = {
        "model_speed": lambda: model_speed(size, 8, 256, iters),
        "mor_step_ratio": lambda: mor_step_ratio(size, 8, 256, iters),
        "eval_speed": lambda: eval_speed(size, 40 if args.quick else 200),
        "loader_speed": lambda: loader_speed(256, 8),
        "decode_vs_hf": lambda: decode_vs_hf(size, 32, 32 if args.quick else 128),
        "probes": lambda: probes(args.size, args.quick),
        "decode_ratio": lambda: {
            s: decode_ratio(
                SIZES[s],
                batch=32,
                num_requests=64 if args.quick else PAPER_REQUESTS,
                gen_len=32 if args.quick else 64,
                repeats=1 if args.quick else 3,
            )
            for s in ("small_deep", "small", "medium")
        },
        "train_probes_tiny": lambda: probes("tiny", args.quick, "train"),  # per family, next to `small`
    }
    unknown = sorted(set(args.only or []) - set(benches))
    if unknown:
        ap.error(f"--only {' '.join(unknown)}: unknown; allowed: {', '.join(benches)}")
    for name, fn in benches.items():  # each file is written as soon as its numbers exist
        if args.only and name not in args.only:
            continue
        value = fn()
        size_of = "tiny" if name == "train_probes_tiny" else args.size
        records.write_json(out / f"{name}.json", {"env": env, "size": size_of, "results": value})
        print(f"{name}: {json.dumps(value, default=float)[:400]}")
    print(f"wrote {out}/*.json")


if __name__ == "__main__":
    main()
