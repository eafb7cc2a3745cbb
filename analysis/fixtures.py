"""A fake but realistic results tree (docs/run_dir.md), for tests and for trying the analysis.

`make_fake_results(root)` writes run directories with config.yaml, env.json, summary.json,
metrics.jsonl, eval.jsonl, bench.jsonl and DONE/FAILED markers, and returns a manifest of what it
wrote (`FakeTree.runs[run_id]` holds the exact rows), so tests compute expected table values from
the manifest instead of hard-coding numbers. Values follow a Chinchilla-like loss law so isoFLOP
curves have an interior optimum; nothing here is a real measurement.

Experiments written:
- `demo`: tiny models, every family (vanilla, recursive cycle/middle-cycle, MoR expert/token,
  KV sharing), several seeds for two setups, demo tasks, and (with `statuses=True`) one failed,
  one partial and one pending run.
- `isoflop`: 3 sizes x 2 FLOP budgets x {vanilla, recursive-3, MoR-E-3}.
- `table3`: the paper's 360M Table 3 setups at 16.5e18 FLOPs (names and budgets only).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PAPER_TASKS = {  # task -> (metrics written, chance level)
    "lambada_openai": (("acc",), 0.0),
    "hellaswag": (("acc", "acc_norm"), 0.25),
    "piqa": (("acc", "acc_norm"), 0.5),
    "winogrande": (("acc",), 0.5),
    "arc_easy": (("acc", "acc_norm"), 0.25),
    "arc_challenge": (("acc", "acc_norm"), 0.25),
    "mmlu_continuation": (("acc",), 0.25),
}
DEMO_TASKS = {"demo_mc": (("acc",), 0.25), "demo_lastword": (("acc",), 0.0)}
TOKEN_CLASSES = ("content", "function", "punct", "number")
POSITION_BINS = (0, 64, 128, 192)
DEPTH_TOKENS = (1000, 600, 300, 100, 50)  # validation tokens ending at depth 1, 2, ... (MoR evals)

SIZES = {  # name -> (d_model, n_layers, n_heads, n_kv_heads, d_ff, vocab)
    "tiny": (64, 6, 4, 2, 172, 2048),
    "small": (128, 8, 4, 2, 344, 2048),
    "base": (256, 8, 8, 4, 688, 2048),
    "360M": (960, 32, 15, 5, 2560, 49152),
}


@dataclass
class FakeRun:
    run_id: str
    experiment: str
    status: str
    config: dict
    summary: dict
    env: dict
    metrics: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    bench: list[dict] = field(default_factory=list)


@dataclass
class FakeTree:
    root: Path
    runs: dict[str, FakeRun] = field(default_factory=dict)

    def by(self, **where: Any) -> list[FakeRun]:
        """Runs whose config (dotted keys) or status/experiment match all of `where`."""

        def get(r: FakeRun, key: str) -> Any:
            if key in ("status", "experiment", "run_id"):
                return getattr(r, key)
            obj: Any = r.config
            for part in key.split("."):
                obj = obj.get(part) if isinstance(obj, dict) else None
            return obj

        return [
            r for r in self.runs.values() if all(get(r, k.replace("__", ".")) == v for k, v in where.items())
        ]


def eval_value(r: FakeRun, task: str, metric: str, causal: bool = True) -> float:
    """The latest-step value a table should pick for (task, metric) of a fake run."""
    rows = [
        e for e in r.evals if e["task"] == task and e["metric"] == metric and e.get("causal", True) == causal
    ]
    if not rows:
        return math.nan
    return max(rows, key=lambda e: e["step"])["value"]


def bench_value(r: FakeRun, probe: str, fld: str, batch_size: int | str | None = None) -> float:
    rows = [b for b in r.bench if b["probe"] == probe]
    if batch_size == "max":
        rows = [max(rows, key=lambda b: b["batch_size"])] if rows else []
    elif batch_size is not None:
        rows = [b for b in rows if b["batch_size"] == batch_size]
    return rows[-1][fld] if rows else math.nan


# -- the synthetic world -------------------------------------------------------------------------------
def _layout(family: str, n_layers: int, n_r: int, sharing: str) -> tuple[int, int, float]:
    """(unique layers, applied layers at full depth, mean applied layers per token)."""
    if family == "vanilla":
        return n_layers, n_layers, float(n_layers)
    edge = 2 if sharing.startswith("middle") else 0
    block = math.ceil((n_layers - edge) / n_r)
    unique = edge + block
    full = edge + block * n_r
    if family == "mor":  # expert-choice capacities (N_r - r + 1) / N_r -> mean depth (N_r + 1) / 2
        return unique, full, edge + block * (n_r + 1) / 2
    return unique, full, float(full)


def _noise(*keys: Any, scale: float = 0.01) -> float:
    """Deterministic pseudo-noise in [-scale, scale] from the keys."""
    h = int(hashlib.md5("|".join(map(str, keys)).encode()).hexdigest()[:8], 16)
    return scale * (2.0 * h / 0xFFFFFFFF - 1.0)


def _make_run(
    root: Path,
    experiment: str,
    size: str,
    family: str,
    n_r: int = 1,
    router: str = "expert_choice",
    sharing: str = "middle_cycle",
    kv: str = "cache",
    budget: tuple[str, float] = ("flops", 1e15),
    seed: int = 0,
    status: str = "done",
    tasks: dict = PAPER_TASKS,
    git_sha: str = "a1b2c3d4e5f6a7b8c9d0a1b2c3d4e5f6a7b8c9d0",
    tokenizer: str = "HuggingFaceTB/SmolLM-135M",
    seq_len: int = 256,
    name: str | None = None,
) -> FakeRun:
    d, n_layers, heads, kv_heads, d_ff, vocab = SIZES[size]
    if family == "vanilla":
        n_r = 1
    model_key = {"vanilla": "vanilla", "recursive": "recursive", "mor": f"mor_{router.split('_')[0]}"}[family]
    parts = [model_key]
    if family != "vanilla":
        parts += [f"r{n_r}", sharing]
        if kv != "cache":
            parts.append(f"kv{kv}")
    parts += [size, f"{budget[0]}{budget[1]:.3g}", f"s{seed}"]
    run_name = name or "-".join(parts)
    run_dir = root / experiment / run_name
    run_dir.mkdir(parents=True, exist_ok=True)

    unique, full, mean_depth = _layout(family, n_layers, n_r, sharing)
    per_layer = 2 * d * d * (1 + 2 * kv_heads / heads) + 3 * d * d_ff  # attention (GQA) + SwiGLU
    params_nonemb = int(unique * per_layer)
    flops_per_token = 6.0 * per_layer * mean_depth + 6.0 * d * vocab
    if budget[0] == "flops":
        tokens = budget[1] / flops_per_token
    elif budget[0] == "tokens":
        tokens = budget[1]
    else:
        tokens = budget[1] * 8192
    batch_tokens = 8192 if size != "360M" else 2_097_152
    steps = max(int(tokens // batch_tokens), 10)
    tokens = steps * batch_tokens
    flops = tokens * flops_per_token

    # Loss law: capacity grows with applied depth, data term with tokens; small family penalties.
    n_eff = params_nonemb * (mean_depth / unique) ** 0.5
    offset = {"vanilla": 0.0, "recursive": 0.06, "mor": 0.02}[family] + (0.03 if kv == "share" else 0.0)
    offset += 0.05 if router == "token_choice" and family == "mor" else 0.0
    offset += {"middle_cycle": 0.0, "cycle": 0.01, "sequence": 0.04, "middle_sequence": 0.03}[sharing] * (
        family != "vanilla"
    )
    nll = 1.9 + 160.0 / n_eff**0.45 + 45.0 / tokens**0.26 + offset + _noise(run_name, scale=0.01)
    if status == "partial":
        nll += 0.3

    router_cfg = {
        "name": router,
        "arch": "linear",
        "func": "sigmoid" if router == "expert_choice" else "softmax",
        "alpha": 0.1 if router == "expert_choice" else 1.0,
        "temperature": 1.0,
        "capacity": None,
        "capacity_warmup_steps": 0,
        "aux_loss": "bce" if router == "expert_choice" else "balance",
        "aux_coeff": 0.001 if router == "expert_choice" else 0.1,
        "z_coeff": 0.0 if router == "expert_choice" else 1e-5,
        "bias_update_rate": 0.001,
        "inference": "threshold",
        "params": {},
    }
    config = {
        "experiment": experiment,
        "run_name": run_name,
        "seed": seed,
        "size": size,
        "model": {
            "_target_": "models.build_model",
            "family": family,
            "vocab_size": vocab,
            "d_model": d,
            "n_layers": n_layers,
            "n_heads": heads,
            "n_kv_heads": kv_heads,
            "d_ff": d_ff,
            "max_seq_len": seq_len,
            "rope_theta": 10000.0,
            "norm_eps": 1e-5,
            "init_std": 0.02,
            "tie_embeddings": True,
            "num_recursions": n_r,
            "sharing": sharing,
            "block_layers": None,
            "kv": kv,
            "router": router_cfg,
        },
        "data": {
            "source": "fineweb_edu_sample",
            "tokenizer": tokenizer,
            "seq_len": seq_len,
            "val_tokens": 65536,
            "num_workers": 0,
        },
        "train": {
            "budget": {"kind": budget[0], "value": budget[1]},
            "global_batch_tokens": batch_tokens,
            "micro_batch": 16,
            "lr": 3e-3,
            "warmup_frac": 0.05,
            "schedule": "wsd",
            "log_every": 10,
            "eval_every": 100,
            "ckpt_every": 500,
        },
        "eval": {"tasks": sorted(tasks), "limit": None, "batch_size": 32},
        "bench": {"batch_sizes": [1, 8, 32, "max"], "decode_tokens": 256, "compile": False},
    }
    env = {
        "git_sha": git_sha,
        "git_dirty": False,
        "python": "3.11.9",
        "versions": {"torch": "2.13.0", "lm_eval": "0.4.13", "transformers": "5.0.0"},
        "device": "cpu (x86_64, 2 cores)",
        "hostname": "fake-host",
        "time": "2025-11-25T00:00:00+0000",
    }
    summary = {
        "family": family,
        "params_unique": params_nonemb + d * vocab,
        "params_unique_nonemb": params_nonemb,
        "params_applied": int(full * per_layer) + d * vocab,
        "flops_per_token_paper": flops_per_token,
        "flops_per_token_exact_train": flops_per_token * 1.07,
        "budget": {"kind": budget[0], "value": budget[1]},
        "steps": steps,
        "tokens_per_step": batch_tokens,
        "tokens": tokens,
        "flops": flops,
        "final_loss": nll - 0.02,
        "wall_s": 12.5 * steps / 100,
        "status": status,
    }
    run = FakeRun(f"{experiment}/{run_name}", experiment, status, config, summary, env)

    # metrics.jsonl: a decaying loss; val/nll every 4th log; router stats for MoR
    n_logs = 12 if status != "partial" else 6
    for i in range(1, n_logs + 1):
        frac = i / 12
        step = max(int(steps * frac), i)
        row: dict[str, Any] = {
            "step": step,
            "tokens": step * batch_tokens,
            "flops": step * batch_tokens * flops_per_token,
            "loss": nll - 0.02 + 1.5 * (1 - frac) ** 2 + _noise(run_name, i, scale=0.02),
            "lr": 3e-3 * min(1.0, 4 * frac),
            "tok_per_s": 5000.0 + 10 * i,
            "peak_mem_bytes": 2**28 + d * 1000,
        }
        if family == "mor":
            row["aux/router"] = 0.01 / i
            row["router/entropy"] = 0.9 + 0.01 * i
            row["router/maxvio"] = 0.5 / i
            row["router/dead_token_ratio"] = 0.02 / i
            for r in range(n_r):
                row[f"router/load_r{r}"] = (n_r - r) / n_r
                if router == "expert_choice":
                    row[f"router/sampling_acc_r{r}"] = 0.95 + 0.001 * i - 0.01 * r
        if i % 4 == 0:
            row["val/nll"] = nll + 0.01 + 0.2 * (1 - frac)
            for c in TOKEN_CLASSES:
                row[f"val/nll_class/{c}"] = nll + _noise(c, scale=0.3)
        run.metrics.append(row)

    if status == "done":
        final = steps
        rows: list[dict] = []
        routing_modes = [("threshold", True)] + ([("topk", False)] if family == "mor" else [])
        if family != "mor":
            routing_modes = [(None, True)]
        for routing, causal in routing_modes:
            bonus = 0.0 if causal else 0.01
            base = {"stderr": 0.0, "n": 4096, "shots": 0, "routing": routing, "causal": causal}
            # an earlier evaluation that a table must not pick
            rows.append({**base, "task": "val", "metric": "nll", "value": nll + 0.25, "step": final // 2})
            rows.append({**base, "task": "val", "metric": "nll", "value": nll - bonus, "step": final})
            for c in TOKEN_CLASSES:
                rows.append(
                    {
                        **base,
                        "task": "val",
                        "metric": f"nll/{c}",
                        "value": nll + _noise(c, scale=0.3),
                        "step": final,
                    }
                )
            if family == "mor":  # tokens by final depth, as harness.evaluate writes them
                for k in range(1, n_r + 1):
                    rows.append(
                        {
                            **base,
                            "task": "val",
                            "metric": f"nll/depth{k}",
                            "value": nll + 0.1 * k,
                            "n": DEPTH_TOKENS[k - 1] if k < n_r else sum(DEPTH_TOKENS[k - 1 :]),
                            "step": final,
                        }
                    )
            if family == "mor" and router == "expert_choice":  # the contract's depth fractions
                for c in (*TOKEN_CLASSES, *(f"pos_{p}" for p in POSITION_BINS)):
                    # fraction of the class's tokens reaching recursion k (k=1 is all of them)
                    keep = 0.55 + _noise(c, run_name, scale=0.3)
                    for k in range(1, n_r + 1):
                        rows.append(
                            {
                                **base,
                                "task": "val",
                                "metric": f"depth_frac/{c}/r{k}",
                                "value": keep ** (k - 1),
                                "step": final,
                            }
                        )
            for task, (metrics, chance) in tasks.items():
                skill = 1 / (1 + math.exp(2.5 * (nll - 3.2)))
                for m in metrics:
                    ceiling = 0.9 if task != "mmlu_continuation" else 0.45
                    v = chance + (ceiling - chance) * skill + _noise(task, m, run_name, scale=0.02) + bonus
                    v = min(max(v, 0.0), 1.0)
                    rows.append(
                        {
                            **base,
                            "task": task,
                            "metric": m,
                            "value": v,
                            "stderr": math.sqrt(max(v * (1 - v), 1e-6) / 1000),
                            "step": final,
                        }
                    )
        run.evals = rows

        kv_layers = {"vanilla": n_layers}.get(family, full)
        if family == "mor":
            kv_layers = (
                2 + (full - 2) * (n_r + 1) / (2 * n_r)
                if sharing.startswith("middle")
                else full * (n_r + 1) / (2 * n_r)
            )
        if kv == "share":
            kv_layers = unique
        kv_bytes = 2 * kv_layers * kv_heads * (d // heads) * 2  # K and V, bf16
        vanilla_kv = 2 * n_layers * kv_heads * (d // heads) * 2
        max_b = max(32, int(32 * vanilla_kv / kv_bytes))
        speed = {"vanilla": 1.0, "recursive": 1.05, "mor": 1.0 + 0.1 * n_r}[family]
        for b in (1, 8, 32, max_b):
            if run.bench and run.bench[-1]["batch_size"] == b:
                continue
            run.bench.append(
                {
                    "probe": "decode",
                    "batch_size": b,
                    "tokens_per_s": 400.0 * speed * b**0.85,
                    "kv_bytes_per_token_analytic": kv_bytes,  # as harness.bench writes it
                    "ms_per_step": 1000.0 * b / (400.0 * speed * b**0.85),
                    "peak_mem_bytes": 2**27 + b * kv_bytes * 512,
                    "device": "cpu",
                    "dtype": "float32",
                    "compile": False,
                    "decode_tokens": 256,
                }
            )
        run.bench.append(
            {
                "probe": "train",
                "batch_size": 16,
                "tokens_per_s": 3000.0 / speed,
                "ms_per_step": 50.0 * speed,
                "peak_mem_bytes": 2**29,
                "device": "cpu",
                "dtype": "float32",
                "compile": False,
            }
        )
        run.bench.append(
            {
                "probe": "memory",
                "batch_size": 1,
                "kv_bytes_per_token": kv_bytes * 1.02,  # measured (docs/run_dir.md)
                "param_bytes": 4 * params_nonemb,
                "kv_bytes_per_seq": kv_bytes * seq_len,
                "peak_mem_bytes": 2**27,
                "device": "cpu",
                "dtype": "float32",
                "compile": False,
            }
        )

    # write files
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if status != "pending":
        (run_dir / "env.json").write_text(json.dumps(env, indent=2))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.metrics))
    else:
        run.metrics = []
    if run.evals:
        (run_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.evals))
    if run.bench:
        (run_dir / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.bench))
    if status == "done":
        (run_dir / "DONE").write_text("")
    if status == "failed":
        (run_dir / "FAILED").write_text("RuntimeError: CUDA out of memory (fake)\n")
    if status == "partial":  # a torn last line, as a killed writer leaves it
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write('{"step": 99999, "loss": 1.')
    # Hydra's own copy must not be taken for a run
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run


def make_fake_results(
    root: str | Path,
    *,
    demo: bool = True,
    seeds: tuple[int, ...] = (0, 1, 2),
    statuses: bool = True,
    isoflop: bool = True,
    paper_like: bool = True,
    odd_sha: bool = False,
    mixed_tokenizer: bool = False,
) -> FakeTree:
    """Write a fake results tree under `root` and return its manifest (see module docstring).

    `odd_sha`: one demo run comes from another git SHA. `mixed_tokenizer`: one demo run uses
    another tokenizer (tables over it must refuse unless mixing is allowed).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tree = FakeTree(root)

    def add(run: FakeRun) -> None:
        tree.runs[run.run_id] = run

    if demo:
        demo_tasks = {**PAPER_TASKS, **DEMO_TASKS}
        kw = {"tasks": demo_tasks, "budget": ("flops", 2e14)}
        for s in seeds:
            add(_make_run(root, "demo", "tiny", "vanilla", seed=s, **kw))
            add(_make_run(root, "demo", "tiny", "mor", 3, "expert_choice", seed=s, **kw))
        add(_make_run(root, "demo", "tiny", "recursive", 2, sharing="middle_cycle", **kw))
        add(_make_run(root, "demo", "tiny", "recursive", 2, sharing="cycle", **kw))
        add(_make_run(root, "demo", "tiny", "recursive", 3, sharing="middle_cycle", **kw))
        add(_make_run(root, "demo", "tiny", "mor", 2, "expert_choice", **kw))
        add(
            _make_run(
                root,
                "demo",
                "tiny",
                "mor",
                3,
                "token_choice",
                git_sha="f" * 40 if odd_sha else "a1b2c3d4e5f6a7b8c9d0a1b2c3d4e5f6a7b8c9d0",
                **kw,
            )
        )
        add(_make_run(root, "demo", "tiny", "mor", 3, "expert_choice", kv="share", **kw))
        if statuses:
            add(_make_run(root, "demo", "tiny", "mor", 4, "expert_choice", status="failed", **kw))
            add(_make_run(root, "demo", "tiny", "recursive", 4, status="partial", **kw))
            add(_make_run(root, "demo", "tiny", "mor", 2, "token_choice", status="pending", **kw))
        if mixed_tokenizer:
            add(_make_run(root, "demo", "tiny", "vanilla", seed=7, tokenizer="gpt2", **kw))
    if isoflop:
        for size in ("tiny", "small", "base"):
            for budget in (1e14, 1e15):
                add(_make_run(root, "isoflop", size, "vanilla", budget=("flops", budget)))
                add(_make_run(root, "isoflop", size, "recursive", 3, budget=("flops", budget)))
                add(_make_run(root, "isoflop", size, "mor", 3, "expert_choice", budget=("flops", budget)))
    if paper_like:
        kw = {"budget": ("flops", 16.5e18), "seq_len": 2048}
        add(_make_run(root, "table3", "360M", "vanilla", **kw))
        add(_make_run(root, "table3", "360M", "recursive", 2, **kw))
        for n_r in (2, 3, 4):
            add(_make_run(root, "table3", "360M", "mor", n_r, "expert_choice", **kw))
        add(_make_run(root, "table3", "360M", "mor", 3, "token_choice", **kw))
        add(_make_run(root, "table3", "360M", "mor", 3, "expert_choice", kv="share", **kw))
        add(
            _make_run(
                root, "table3", "360M", "mor", 2, "expert_choice", budget=("tokens", 20e9), seq_len=2048
            )
        )
    return tree
