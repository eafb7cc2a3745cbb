"""Where a decode step's time goes: wall time per step against the device's busy time, and the ops
that cost the most host and device time (torch.profiler), for one model and engine setting.

    python scripts/profile_decode.py --size 360m --model vanilla --compile
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from hydra import compose, initialize_config_module
from torch.utils._python_dispatch import TorchDispatchMode

from harness.bench import BOS, load_bench_model
from harness.config import register_configs
from harness.engine import Request, make_engine


class OpCount(TorchDispatchMode):
    """aten ops run (views excluded): on a GPU, roughly the kernel launches."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--model", default="vanilla")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fused weights (default: CPU only)",
    )
    ap.add_argument("--rows", type=int, default=18, help="ops shown per table")
    a = ap.parse_args()
    register_configs()
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", [f"model={a.model}", f"size={a.size}", "bench.weights=random"])
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_bench_model(cfg, None, dev)
    if dev.type == "cuda":
        model = model.to(torch.bfloat16)
    eng = make_engine(model, a.batch, a.tokens + 1, temperature=1.0, compile=a.compile, fuse=a.fuse)
    reqs = [Request([BOS], a.tokens - (i % 7)) for i in range(2 * a.batch)]
    eng.run(reqs)  # warm-up (and compilation)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    eng.run(reqs)
    sync()
    wall = time.perf_counter() - t0
    steps = eng.stats["steps"]
    n_tok = sum(r.max_new_tokens for r in reqs)
    if not a.compile:  # compiled code launches its own kernels, unseen at this level
        with OpCount() as oc:
            eng.run(reqs)
        ops = sum(oc.ops.values())
        print(f"aten ops (views excluded): {ops / n_tok:.1f} per generated token, {ops / steps:.0f} per step")
        print("  per token:", ", ".join(f"{k} {v / n_tok:.2f}" for k, v in oc.ops.most_common(12)))
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else []
    )
    with torch.profiler.profile(activities=acts) as prof:
        eng.run(reqs)
        sync()
    ka = prof.key_averages()
    dev_us = sum(e.self_device_time_total for e in ka) if dev.type == "cuda" else 0.0
    print(
        f"{a.model} {a.size} batch {a.batch} compile={a.compile} fuse={eng.fuse}: {steps} steps, "
        f"{1000 * wall / steps:.2f} ms/step wall, {dev_us / 1000 / steps:.2f} ms/step device busy, "
        f"{n_tok / wall:.0f} tok/s"
    )
    print(ka.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=50))
    if dev.type == "cuda":
        print(ka.table(sort_by="self_device_time_total", row_limit=a.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
