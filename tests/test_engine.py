"""Decode engine (harness/engine.py): continuous batching equals one-request-at-a-time decoding.

Tiny random models in float64 (so batching cannot flip an argmax or a routing threshold by
rounding), more requests than slots, prompts and lengths that differ so rows are refilled while
others run. For MoR the routers are calibrated so that tokens really stop at different depths.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import harness.engine as engine_mod
from harness.engine import DepthWiseEngine, Request, SequenceEngine, make_engine
from models import ConfigError, ModelConfig, RouterConfig, build_model
from tests.helpers import MICRO_MODEL

V = 61
BASE = dict(vocab_size=V, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
TOKEN = RouterConfig(name="token_choice", func="softmax", alpha=1.0, aux_loss="balance")


def mor(router: RouterConfig | None = None, **kw) -> ModelConfig:
    kw = {"family": "mor", "num_recursions": 3, "sharing": "middle_cycle", **kw}
    return ModelConfig(**{**BASE, **kw}, router=router or RouterConfig())


FAMILIES = {
    "vanilla": ModelConfig(**BASE),
    "recursive-middle_cycle": ModelConfig(**BASE, family="recursive", num_recursions=3),
    "recursive-cycle": ModelConfig(
        **{**BASE, "n_layers": 4}, family="recursive", num_recursions=2, sharing="cycle"
    ),
    "recursive-cycle-share": ModelConfig(
        **{**BASE, "n_layers": 4}, family="recursive", num_recursions=2, sharing="cycle", kv="share"
    ),
    "mor-expert-cache": mor(),
    "mor-expert-share": mor(kv="share"),
    "mor-expert-cycle-share": mor(sharing="cycle", kv="share", n_layers=6),
    "mor-expert-aux_router": mor(RouterConfig(aux_loss="aux_router", inference="aux_router")),
    "mor-token-cache": mor(TOKEN),
    "mor-token-share": mor(TOKEN, kv="share"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg).double().eval()
    router = getattr(model, "router", None)
    if router is not None and router.kind == "expert":
        # thresholds -> loads (1, 2/3, 1/3); untrained aux routers split by sign, about half/half
        model.calibrate([torch.randint(0, V, (4, 32), generator=_gen(5))])
    return model


def requests(n: int, seed: int = 1) -> list[Request]:
    g = _gen(seed)
    out = []
    for _ in range(n):
        plen = int(torch.randint(1, 4, (1,), generator=g))
        out.append(
            Request(
                torch.randint(0, V, (plen,), generator=g).tolist(),
                int(torch.randint(3, 13, (1,), generator=g)),
            )
        )
    return out


def reference(model, req: Request) -> list[int]:
    """Batch-1 cached decoding (the model's own KV cache and forward)."""
    return model.generate(torch.tensor([req.prompt_ids]), req.max_new_tokens)[0].tolist()


def _check(model, reqs, results) -> None:
    """Engine tokens = batch-1 cached decoding; engine logits = a full forward over the prefix."""
    for req, res in zip(reqs, results, strict=True):
        assert res.tokens == reference(model, req), req
        seq = torch.tensor([req.prompt_ids + res.tokens[:-1]])
        full = model(seq).logits[0, len(req.prompt_ids) - 1 :]
        assert res.tokens == full.argmax(-1).tolist()
        # the logits themselves, not just their argmax (tiny random models repeat tokens a lot)
        assert torch.allclose(res.logits, full, rtol=0, atol=1e-10), (res.logits - full).abs().max()


@pytest.mark.parametrize("name", list(FAMILIES))
@torch.no_grad()
def test_greedy_engine_equals_cached_and_full_forward_decoding(name):
    model = build(FAMILIES[name])
    reqs = requests(9)
    mor_family = hasattr(model, "router")
    kw = dict(seq_slots=4, flush_at=2) if mor_family else {}
    eng = make_engine(model, 3, max(len(r.prompt_ids) + r.max_new_tokens for r in reqs), **kw)
    assert isinstance(eng, DepthWiseEngine if mor_family else SequenceEngine)
    results = eng.run(reqs, keep_logits=True)
    _check(model, reqs, results)
    st = eng.stats
    assert st["tokens_generated"] == sum(r.max_new_tokens for r in reqs)
    assert st["tokens_fed"] == sum(len(r.prompt_ids) + r.max_new_tokens - 1 for r in reqs)
    # rows were refilled while others ran: later requests start when earlier ones finish
    finished = {res.stats["finished_step"] for res in results}
    assert all(res.stats["admitted_step"] in finished for res in results[3 if not mor_family else 4 :])
    assert max(res.stats["admitted_step"] for res in results) < st["steps"]
    # measured KV bytes = analytic bytes at the depths the tokens actually reached
    fractions = None
    if mor_family:
        counts = st["depth_counts"]
        assert sum(counts) == st["tokens_fed"]
        # routing is live: tokens stop early and go deep, at least two depths hold >= 10% each
        assert counts[-1] > 0 and sum(counts[:-1]) >= 0.2 * sum(counts), counts
        assert sum(c >= 0.1 * sum(counts) for c in counts) >= 2, counts
        fractions = [sum(counts[r + 1 :]) / sum(counts) for r in range(3)]
        if model.router.kind == "expert":
            assert st["block_items"] > st["block_steps"]  # depths were batched together
    assert st["kv_bytes_per_token"] == pytest.approx(model.kv_bytes_per_token(8, fractions))


@pytest.mark.parametrize("name", list(FAMILIES))
@torch.no_grad()
def test_cuda_graphs_padded_steps_decode_the_same(name):
    """cuda_graphs (here on CPU: the same padded, bucketed steps, uncaptured): every vanilla step
    and every MoR block pass runs at the full batch, its keys padded to a multiple of GRAPH_KEYS,
    the padding writing to the extra cache row; tokens and logits stay those of cached decoding."""
    model = build(FAMILIES[name])
    reqs = requests(9)
    mor_family = hasattr(model, "router")
    kw = dict(seq_slots=4, flush_at=2) if mor_family else {}
    eng = make_engine(model, 3, 16, cuda_graphs=True, **kw)
    keys = []
    orig = engine_mod._Graphs.__call__

    def spy(self, *inputs):  # (items, keys, gathered?)
        keys.append((inputs[0].shape[0], inputs[4].shape[-1], len(inputs) == 6))
        return orig(self, *inputs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_mod._Graphs, "__call__", spy)
        eng.capture_graphs()  # every key count's graph up front (16 columns: one), for each read kind
        L = engine_mod.GRAPH_KEYS
        assert keys == ([(3, L, True)] if mor_family else [(3, L, True), (3, L, False)])
        # NaN in the padding's row: a real item reading it would turn its logits NaN
        pads = [*(eng.block_buf if mor_family else eng.buffers), *([(eng.X, eng.H1)] if mor_family else [])]
        with torch.inference_mode():  # the engine's state is made of inference tensors
            for t in (t for pair in pads for t in pair):
                t[eng.pad_row] = float("nan")
        results = eng.run(reqs, keep_logits=True)
    _check(model, reqs, results)
    st = eng.stats
    steps, items = (st["block_steps"], st["block_items"]) if mor_family else (st["steps"], st["tokens_fed"])
    assert items < 3 * steps  # some passes were padded
    keys = keys[1 if mor_family else 2 :]
    assert len(keys) == steps and {k[:2] for k in keys} == {(3, L)}  # every stage at the batch
    # vanilla-like: a full batch reads its rows in place, a padded one gathers; MoR always gathers
    assert {k[2] for k in keys} == ({True} if mor_family else {True, False})
    # one long request decoding alone in the first row, the padding beside it
    lopsided = [Request([1, 2], 12), Request([3], 2), Request([4], 2)]
    _check(model, lopsided, eng.run(lopsided, keep_logits=True))
    assert not eng.capture
    with pytest.raises(ConfigError, match="choose one"):
        make_engine(model, 3, 16, cuda_graphs=True, compile=True)


@torch.no_grad()
def test_mor_depth_zero_exits_and_every_read_mode():
    """A finite recursion-0 threshold (decisions come back through the sync before a token enters
    the block), more sequences than block slots, identity / range / slab / gather cache reads (row
    ranges and slabs that start past row 0), and reads of the deeper recursions' regions."""
    model = build(mor(kv="cache"))
    kinds, deep, offset = [], [], []
    orig = engine_mod._seg

    def spy(*a, **k):
        seg = orig(*a, **k)
        kinds.append(seg._i[0])
        deep.append(seg.c0 > 0)  # a read of a recursion >= 1 region
        if seg.r0 > 0:  # an in-place read of rows that do not start at row 0
            offset.append(seg._i[0])
        return seg

    engine_mod._seg = spy
    try:
        # everyone takes recursion 0 (calibrated threshold -inf): a full synchronous batch -> identity
        reqs = requests(12, seed=3)
        eng = make_engine(model, 8, 16, seq_slots=8, flush_at=8)
        _check(model, reqs, eng.run(reqs, keep_logits=True))
        # then a recursion-0 threshold at the median of first-recursion scores: depth-0 exits
        ids = torch.randint(0, V, (4, 32), generator=_gen(9))
        h = model.layers[0](model.embed_tokens(ids), model.rotary(torch.arange(32).expand(4, 32)))
        model.router.threshold[0] = model.router.score(h, 0).median()
        eng = make_engine(model, 4, 16, seq_slots=6, flush_at=3)
        _check(model, reqs, eng.run(reqs, keep_logits=True))
        assert eng.stats["depth_counts"][0] > 0
    finally:
        engine_mod._seg = orig
    assert {"identity", "range", "slab", "gather"} <= set(kinds), set(kinds)
    assert any(deep) and {"range", "slab"} <= set(offset), set(offset)


@pytest.mark.parametrize("name", ["vanilla", "mor-expert-cache"])
@torch.no_grad()
def test_attention_biases_are_aligned_for_cuda_kernels(name, monkeypatch):
    """Every bias and index the engine uploads to a GPU (one packed copy; forced here on CPU, which
    otherwise shares the host arrays) starts on a 16-byte boundary, and a bias row is a multiple of
    8 columns long (bf16: CUDA's efficient attention faulted on a misaligned bias under
    torch.compile on an H100); the view the attention sees holds exactly the 0 / -inf mask."""
    model = build(FAMILIES[name]).to(torch.bfloat16)
    seen = []
    orig = engine_mod._Seg.resolve

    def spy(self, parts, pack):
        orig(self, parts, pack)
        for t in [*parts, *pack.floats]:
            assert t.data_ptr() % 16 == 0
        if self.mask is not None:
            m = self.mask
            assert m.stride(0) % engine_mod.ALIGN == 0 and m.shape[-1] == self.L
            assert torch.isin(m.float(), torch.tensor([0.0, float("-inf")])).all()
            assert (m[..., 0] == 0).all()  # every item sees at least its first key
            seen.append(self.L)

    monkeypatch.setattr(engine_mod._Seg, "resolve", spy)
    monkeypatch.setattr(engine_mod._Pack, "in_place", staticmethod(lambda device: False))
    reqs = requests(7, seed=5)
    make_engine(model, 3, 16).run(reqs)
    assert any(L % engine_mod.ALIGN for L in seen)  # biases whose length needed padding were checked


@torch.no_grad()
def test_strided_attention_output_as_cuda_returns_it(monkeypatch):
    """CUDA's SDPA kernels return [m, heads, q, hd] in a [m, q, heads, hd] memory layout (view()
    failed there); the engine must decode the same tokens from such an output."""
    sdpa = F.scaled_dot_product_attention

    def strided(*a, **k):
        o = sdpa(*a, **k)
        return o.transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(F, "scaled_dot_product_attention", strided)
    model = build(FAMILIES["mor-expert-cache"])
    reqs = requests(5, seed=6)
    _check(model, reqs, make_engine(model, 2, 16).run(reqs, keep_logits=True))


@pytest.mark.parametrize("kv", ["cache", "share"])
@torch.no_grad()
def test_recursion_regions_sized_by_capacity_and_grown_on_overflow(kv):
    """Recursion r's cache region holds capacity_r x max_len x (1 + kv_slack) entries per slot, so
    the allocation shows the saving; a sequence going deeper than that widens the region (copied)
    and decoding stays exact."""
    model = build(mor(kv=kv))
    eng = make_engine(model, 4, 40, seq_slots=4)
    per_entry = eng.entry_bytes * 4  # x seq_slots
    if kv == "cache":
        assert eng.W == [40, 34, 17]  # ceil(40 x (2/3, 1/3) x 1.25)
    else:
        assert eng.W == [40]  # later recursions read recursion 0's keys
    n_pp = len(eng.pre) + len(eng.post)
    assert eng.kv_bytes_allocated() == per_entry * (40 * n_pp + sum(eng.W) * len(eng.block))
    # every token takes every recursion: regions 1 and 2 overflow at kv_slack=0
    model.router.threshold.fill_(float("-inf"))
    eng = make_engine(model, 4, 40, seq_slots=4, kv_slack=0.0)
    state = eng._state

    def nan_state(*shape, dtype=None, fill=torch.zeros):  # a widened cache's unset memory: NaN
        nan = functools.partial(torch.full, fill_value=float("nan"))
        return state(*shape, dtype=dtype, fill=nan if fill is torch.empty else fill)

    eng._state = nan_state
    # a short first request: its slot's next one is behind the others when the regions widen, and
    # reads (masked) columns that no token wrote
    reqs = [Request([1], 6)] + [Request([1, 2, 3], 36) for _ in range(4)] + requests(4)
    _check(model, reqs, eng.run(reqs, keep_logits=True))
    if kv == "cache":
        assert eng.stats["kv_grows"] >= 2 and eng.W[1] >= 38 and eng.W[2] >= 38
    else:
        assert "kv_grows" not in eng.stats


@torch.no_grad()
def test_one_gather_for_items_of_several_depths():
    """Many more sequences than block slots, of different prompt and generation lengths (so the
    items of a pass are scattered over the slots, not a near-contiguous row range that a slab
    reads): each depth's items are few, so one gather reads every item's keys from its own
    recursion region, windows running past the narrow deep regions."""
    model = build(mor(kv="cache"))
    past_end = []  # merged gathers (a start column per item) whose longest window leaves the buffer
    orig = engine_mod._seg

    def spy(*a, **k):
        seg = orig(*a, **k)
        if len(a) > 8 and isinstance(a[8], np.ndarray):
            past_end.append(int(a[8].max()) + seg.L > a[6])
        return seg

    engine_mod._seg = spy
    try:
        lengths = np.random.default_rng(3).integers(5, 30, 16)
        reqs = [Request([1 + j % 5 for j in range(1 + i % 4)], int(n)) for i, n in enumerate(lengths)]
        eng = make_engine(model, 4, 32, seq_slots=16, flush_at=4)
        _check(model, reqs, eng.run(reqs, keep_logits=True))
    finally:
        engine_mod._seg = orig
    assert any(past_end), past_end


@pytest.mark.parametrize("name", ["vanilla", "mor-expert-cache", "mor-token-share"])
@torch.no_grad()
def test_fused_and_unfused_weights_agree(name):
    model = build(FAMILIES[name])
    reqs = requests(5, seed=4)
    _check(model, reqs, make_engine(model, 2, 16).run(reqs, keep_logits=True))
    _check(model, reqs, make_engine(model, 2, 16, fuse=False).run(reqs, keep_logits=True))


@pytest.mark.parametrize("name", ["vanilla", "mor-expert-cache", "mor-token-cache"])
@torch.no_grad()
def test_sampling_is_seeded(name):
    model = build(FAMILIES[name])
    reqs = [Request([0], 12) for _ in range(6)]
    run = lambda seed: [r.tokens for r in make_engine(model, 3, 12, temperature=1.0, seed=seed).run(reqs)]
    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c
    assert len({tuple(t) for t in a}) > 1  # requests differ although their prompts are equal
    assert all(0 <= t < V for toks in a for t in toks)
    # the same engine object, run twice, repeats itself too (the generator is reseeded per run)
    eng = make_engine(model, 3, 12, temperature=1.0, seed=7)
    assert [r.tokens for r in eng.run(reqs)] == [r.tokens for r in eng.run(reqs)]


@torch.no_grad()
def test_engine_errors_name_the_problem():
    model = build(FAMILIES["vanilla"])
    with pytest.raises(ConfigError, match="max_len"):
        make_engine(model, 2, 8).run([Request([1, 2], 8)])
    with pytest.raises(ConfigError, match="max_seq_len"):
        make_engine(model, 2, 1000)
    topk = build(mor(RouterConfig(inference="topk")))
    with pytest.raises(ConfigError, match="non-causal"):
        make_engine(topk, 2, 8)


# -- the decode probe (harness/bench.py) ---------------------------------------------------------------

PROBE = [
    *MICRO_MODEL,
    "bench.weights=random",
    "bench.num_requests=6",
    "bench.gen_len_mean=8",
    "bench.gen_len_std=2",
    "bench.batch_sizes=[2]",
    "bench.warmup=2",
]


@pytest.mark.parametrize("model", ["vanilla", "mor_expert"])
def test_decode_probe_rows(tmp_path, model):
    from harness import records
    from harness.bench import run_bench
    from tests.helpers import compose

    cfg = compose([*PROBE, f"model={model}", "bench.max_batch=true", "bench.max_batch_rule=relative"])
    rows = run_bench(cfg, tmp_path)
    assert rows == records.read_jsonl(tmp_path / "bench.jsonl")
    fixed, top = rows
    assert (fixed["batch_kind"], fixed["batch_size"], top["batch_kind"]) == ("fixed", 2, "max")
    # the relative max batch (B0 x fit ratio) is clipped to the 6 requests, and recorded unclipped
    assert top["batch_size"] == min(6, top["max_batch_computed"]) and top["max_batch_computed"] >= 2
    for r in rows:
        assert r["probe"] == "decode" and r["tokens_per_s"] > 0 and r["ms_per_step"] > 0
        assert r["generated_tokens"] == sum(gen_lengths_of(cfg)) and r["peak_mem_bytes"] > 0
        # traceable from the row alone: versions, and the configs of the model and the probe
        assert r["versions"]["torch"] == torch.__version__ and r["git_sha"] and r["python"]
        assert r["model_config"]["family"] == ("vanilla" if model == "vanilla" else "mor")
        assert r["model_config"]["d_model"] == cfg.model.d_model
        assert r["bench_config"]["num_requests"] == cfg.bench.num_requests
        assert r["kv_bytes_per_token"] == pytest.approx(r["kv_bytes_per_token_analytic_at_depths"])
        # CPU: the time inside layer calls is measured, a part of the run, the rest is the engine's own
        calls = sum(r["layer_calls_by_tokens"].values())
        assert 0 < r["layer_share"] < 1
        assert r["ms_per_layer_call"] * calls == pytest.approx(1000 * r["layer_share"] * r["elapsed_s"])
    if model == "vanilla":
        assert top["batch_size"] == 2  # relative rule: vanilla keeps its batch, measured once
        assert top["measured_as"] == "fixed" and top["elapsed_s"] == fixed["elapsed_s"]
        assert fixed["flop_ratio_vs_vanilla"] == pytest.approx(1.0) and "depth_hist" not in fixed
        assert fixed["kv_bytes_per_token"] == fixed["kv_bytes_per_token_analytic"]
    else:
        assert top["batch_size"] == 3  # 2 x fit(MoR)/fit(vanilla): smaller KV per token
        assert "measured_as" not in top
        assert sum(fixed["depth_hist"]) == pytest.approx(1.0) and len(fixed["depth_hist"]) == 4
        assert fixed["depth_fractions"][0] == 1.0 and 0 < fixed["depth_fractions"][2] < 1
        assert fixed["flop_ratio_vs_vanilla"] < 1 and fixed["flop_ratio_vs_vanilla_design"] < 1


def gen_lengths_of(cfg) -> list[int]:
    from harness.bench import gen_lengths

    return gen_lengths(cfg.bench, cfg.seed, cfg.model.max_seq_len)


def test_decode_probe_rejects_a_batch_that_cannot_fit():
    from harness.bench import run_bench
    from tests.helpers import compose

    cfg = compose([*PROBE, "model=vanilla", "bench.memory_budget_gb=0.0001", "bench.batch_sizes=[1000]"])
    with pytest.raises(ConfigError, match="bench.batch_sizes.*bench.memory_budget_gb"):
        run_bench(cfg, None)
    cfg = compose([*PROBE, "model=vanilla", "bench.max_batch=true", "bench.max_batch_rule=most"])
    with pytest.raises(ConfigError, match="max_batch_rule"):
        run_bench(cfg, None)


def test_mor_batches_hold_their_sequences_in_flight_within_the_budget():
    """MoR's batch is the block's slots, refilled from seq_slots_factor x as many sequences: the
    memory check and the `fit` max batch count those sequences' KV, not the slots'."""
    from harness.bench import check_batches, max_batch_size, memory_fit, sequences_in_flight
    from tests.helpers import compose

    def bench(*over):
        return compose([*PROBE, "model=mor_expert", "bench.seq_slots_factor=2.0", *over]).bench

    core = build(FAMILIES["mor-expert-cache"])
    mem = memory_fit(core, bench(), 4, 16)
    # a budget for exactly 7 sequences: batch 3 (6 sequences) fits, batch 4 (8) does not
    mem = {**mem, "budget": mem["param_bytes"] + 7 * mem["kv_bytes_per_seq"], "fit": 7}
    assert sequences_in_flight(bench(), core, 3) == 6
    check_batches(bench("bench.batch_sizes=[3]"), mem, core)
    with pytest.raises(ConfigError, match=r"batch 4 \(8 sequences in flight\).*memory_budget_gb"):
        check_batches(bench("bench.batch_sizes=[4]"), mem, core)
    assert max_batch_size(bench("bench.max_batch_rule=fit"), mem, core) == 3
    assert sequences_in_flight(bench(), build(FAMILIES["vanilla"]), 4) == 4  # one sequence per row


def test_decode_ratio_benchmark_reports_consistent_fields():
    from harness.benchmarks import decode_ratio

    size = dict(vocab_size=V, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    out = decode_ratio(size, batch=4, num_requests=8, gen_len=8, repeats=2)
    tok = out["all_tok_s"]
    assert all(len(v) == 2 for v in tok.values())

    def paired(k):  # each round's MoR run over the same round's vanilla run
        return np.median([m / v for m, v in zip(tok[k], tok["vanilla"])])

    assert out["speedup"] == pytest.approx(paired("mor_expert"))
    # the layer phase: vanilla's time inside layer calls over MoR's, paired within a round
    rows_s = out["all_layer_s"]
    assert all(len(v) == 2 and min(v) > 0 for v in rows_s.values())
    layer_phase = np.median([v / m for m, v in zip(rows_s["mor_expert"], rows_s["vanilla"])])
    assert out["speedup_layer_phase"]["mor_expert"] == pytest.approx(layer_phase)
    assert out["fraction_of_flop_speedup_layer_phase"] == pytest.approx(layer_phase / out["flop_speedup"])
    assert out["meets_goal_layer_phase"] == (layer_phase >= 0.9 * out["flop_speedup"])
    assert out["flop_speedup"] > 1  # MoR skips recursions for some tokens
    assert out["fraction_of_flop_speedup"] == pytest.approx(out["speedup"] / out["flop_speedup"])
    assert out["meets_goal"] == (out["fraction_of_flop_speedup"] >= 0.9)
    assert out["max_batch_beats_batch"] == (out["speedup_max_batch"] > out["speedup"])
    assert out["batch_max_mor"] > 4  # less KV per sequence: a larger relative maximum batch
    assert out["speedup_max_batch"] == pytest.approx(paired("mor_expert_max"))
    assert out["speedup_batch_seqs"] == pytest.approx(paired("mor_expert_batch_seqs"))
    assert out["vanilla_tok_s"] in tok["vanilla"]  # a median run
    # MoR's block batch is refilled from twice the sequences; the side run has vanilla's rows only
    assert out["seq_slots"] == {
        "vanilla": 4,
        "mor_expert": 8,
        "mor_expert_max": 2 * out["batch_max_mor"],
        "mor_expert_batch_seqs": 4,
    }
    assert out["kv_bytes_allocated"]["mor_expert"] > out["kv_bytes_allocated"]["mor_expert_batch_seqs"]
    assert all(0 < n <= 4 for k, n in out["mean_block_items"].items() if k != "mor_expert_max")
    assert out["depth_fractions"][0] == 1.0 and out["depth_fractions"][2] < 1
    # the layer-time ceiling prices every layer call at its measured per-call cost
    cost = out["layer_ms_by_tokens"]
    assert min(cost) == 1 and all(t > 0 for t in cost.values())
    assert set(out["layer_time_ceiling"]) == {"mor_expert", "mor_expert_max", "mor_expert_batch_seqs"}
    assert out["fraction_of_ceiling"]["mor_expert"] == pytest.approx(
        out["speedup"] / out["layer_time_ceiling"]["mor_expert"]
    )


@pytest.mark.parametrize("name", ["vanilla", "mor-expert-cache", "mor-token-share"])
@torch.no_grad()
def test_layer_calls_by_tokens_account_for_every_token(name):
    """stats["layer_calls_by_tokens"] (the decode probe's per-call histogram) adds up to every
    token's visit of every layer: fed tokens x layers (sequence-wise), or entries x first layers +
    exits x last layers + block items x block layers (depth-wise)."""
    model = build(FAMILIES[name])
    eng = make_engine(model, 3, 16)
    eng.run(requests(7, seed=2))
    st = eng.stats
    visits = sum(n * c for n, c in st["layer_calls_by_tokens"].items())
    if "block_items" in st:
        want = st["edge_entries"] * len(eng.pre) + st["edge_exits"] * len(eng.post)
        want += st["block_items"] * len(eng.block)
    else:
        want = st["tokens_fed"] * len(eng.slots)
    assert visits == want > 0


@pytest.mark.parametrize("model", ["vanilla", "mor_expert"])
def test_train_and_memory_probe_rows(tmp_path, model):
    from harness.bench import run_bench
    from tests.helpers import compose

    cfg = compose(
        [*PROBE, f"model={model}", "bench.probes=[train,memory]", "bench.train_steps=2", "data.seq_len=16"]
    )
    train, memory = run_bench(cfg, tmp_path)
    assert train["probe"] == "train" and train["tokens_per_s"] > 0 and train["peak_mem_bytes"] > 0
    assert train["tokens_per_s"] == pytest.approx(train["batch_size"] * 16 / (train["ms_per_step"] / 1000))
    assert train["achieved_flops"] == pytest.approx(train["tokens_per_s"] * train["flops_per_token_train"])
    assert train["peak_flops"] is None and train["mfu"] is None  # a CPU has no entry in the peak table
    assert memory["probe"] == "memory" and memory["param_bytes"] > 0 and memory["kv_bytes_per_seq"] > 0


def test_peak_flops_table():
    from harness.bench import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert peak_flops("cpu (x86_64, 2 cores)", "fp32") is None


@pytest.mark.parametrize("name", ["vanilla", "mor-expert-cache"])
@torch.no_grad()
def test_equal_length_batch_reads_unmasked(name):
    """Requests of one length fill every row to the same count: attention runs with no mask."""
    model = build(FAMILIES[name])
    segs = []
    orig = engine_mod._seg

    def spy(*a, **k):
        segs.append(orig(*a, **k))
        return segs[-1]

    engine_mod._seg = spy
    try:
        reqs = [Request([3, 1], 10) for _ in range(4)]
        _check(model, reqs, make_engine(model, 4, 12).run(reqs, keep_logits=True))
    finally:
        engine_mod._seg = orig
    # an in-place read of every row with no bias
    assert any(s.mask is None and s.gather is None and s.sidx is None for s in segs)


def test_bench_of_a_trained_run_refuses_another_architecture(tmp_path):
    """`mor-bench run_dir=X model.kv=share` (or a size=/model= preset unlike the run's) on a trained
    run: one clear error, no traceback, instead of silently benchmarking the trained model. A
    finished run (DONE) is still probed when asked; a run_dir that does not exist is an error."""
    from harness import records
    from tests.helpers import MICRO, ROOT, run_cli

    train = [*MICRO, "model=mor_expert", "train.budget.kind=steps", "train.budget.value=2"]
    run_cli([*train, "stages=[train]", f"results_root={tmp_path}", "run_name=r"], cwd=ROOT)
    run = tmp_path / "default" / "r"
    (run / "DONE").touch()  # a finished run: mor-bench probes it anyway
    bench = [*PROBE, "stages=[bench]", f"run_dir={run}", "bench.weights=run"]
    proc = run_cli([*bench, "model=mor_expert", "model.kv=share"], cwd=ROOT, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "model.kv=share was requested" in proc.stdout + proc.stderr and "model.kv=cache" in proc.stderr
    proc = run_cli([*bench, "model=mor_expert", "size=small"], cwd=ROOT, check=False)
    assert proc.returncode != 0 and "size= on the command line" in proc.stderr
    assert "model.max_seq_len=1024 (trained: 512)" in proc.stderr
    missing = [*PROBE, "stages=[bench]", f"run_dir={tmp_path / 'typo'}"]
    proc = run_cli(missing, cwd=ROOT, check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and not (tmp_path / "typo").exists()
    ok = run_cli([*bench, "model=mor_expert"], cwd=ROOT)  # no architecture override: benchmarks it
    rows = records.read_jsonl(run / "bench.jsonl")
    assert ok.returncode == 0 and [r["weights"] for r in rows] == ["trained"]


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "bench.probes=[decode,nosuch]",
            "bench.probes=['decode', 'nosuch']: allowed a list of decode",
        ),
        ("bench.dtype=fp16", "bench.dtype='fp16' is invalid: allowed auto, bf16, fp32"),
        ("bench.weights=foo", "bench.weights='foo' is invalid: allowed run, random"),
        ("bench.batch_sizes=[]", "bench.batch_sizes=[] must be a non-empty list"),
        ("bench.batch_sizes=[0]", "bench.batch_sizes=[0] must be a non-empty list of ints >= 1"),
        ("bench.temperature=-1", "bench.temperature=-1.0 must be >= 0"),
        ("bench.flush_frac=0", "bench.flush_frac=0.0 must be in (0, 1]"),
        (
            "bench.compile=true bench.cuda_graphs=true",
            "bench.compile=true and bench.cuda_graphs=true: choose one",
        ),
        (
            "bench.gen_len_mean=600",
            "bench.gen_len_mean=600 exceeds the model's context model.max_seq_len=512",
        ),
    ],
)
def test_bad_bench_values_fail_before_any_work(tmp_path, override, message):
    """Each bad bench.* value names its key and the allowed values, before a model is built (and,
    in a full pipeline, before training: run() validates bench.* first)."""
    from harness import bench as bench_mod
    from harness.main import run
    from tests.helpers import compose

    cfg = compose([*PROBE, *override.split(), "stages=[train,eval,bench]", f"results_root={tmp_path}"])
    built = []
    orig = bench_mod.build_model
    bench_mod.build_model = lambda *a, **k: built.append(1) or orig(*a, **k)
    try:
        with pytest.raises(ConfigError) as e:
            run(cfg) if "gen_len" not in override else bench_mod.run_bench(cfg, None)
    finally:
        bench_mod.build_model = orig
    assert message in str(e.value)
    assert not list(tmp_path.rglob("checkpoint*")) and (not built or "gen_len" in override)


@pytest.mark.parametrize("preset, probe", [("train", "train"), ("memory", "memory")])
def test_bench_presets_run_their_probe(tmp_path, preset, probe):
    """`bench=train` and `bench=memory` are presets of the one entry point (as is bench=decode)."""
    from harness.bench import run_bench
    from tests.helpers import MICRO, compose

    rows = run_bench(
        compose([*MICRO, f"bench={preset}", "bench.weights=random", "bench.train_steps=1"]), tmp_path
    )
    assert [r["probe"] for r in rows] == [probe]
    if probe == "memory":
        assert isinstance(rows[0]["kv_bytes_per_seq"], int) and rows[0]["param_bytes"] > 0
    else:
        assert rows[0]["tokens_per_s"] > 0 and rows[0]["mfu"] is None  # no peak for a CPU


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vanilla", "mor_expert"])
def test_paper_decode_preset_compiles_before_timing(tmp_path, model):
    """bench=paper (bf16, torch.compile) on CPU: the ragged warm-up builds every graph the timed run
    needs, so compilation never lands inside the measurement."""
    from harness.bench import run_bench
    from tests.helpers import compose

    probe = [a for a in PROBE if not a.startswith(("bench.batch_sizes", "bench.warmup"))]
    cfg = compose([*probe, f"model={model}", "bench=paper", "bench.num_requests=12", "bench.warmup=8"])
    rows = run_bench(cfg, tmp_path)
    assert [r["batch_kind"] for r in rows] == ["fixed", "max"]
    for r in rows:
        assert r["dtype"] == "bf16" and r["compile"] is True and r["compiled_while_timed"] == 0
        assert r["generated_tokens"] == sum(gen_lengths_of(cfg)) and r["tokens_per_s"] > 0


@pytest.mark.slow
@torch.no_grad()
def test_compiled_engine_matches_cached_decoding_in_few_graphs():
    """torch.compile on CPU: the engine's tokens equal the model's cached decoding, for a vanilla
    and a MoR model, and the layer compiles to a few graphs (duck sizing made it 6+: dims equal at
    the first call, like items and a bias's row stride, were assumed equal and recompiled)."""
    from harness.bench import _compiled_graphs

    torch._dynamo.reset()
    g0 = _compiled_graphs()
    for name in ("vanilla", "mor-expert-cache"):
        model = build(FAMILIES[name])
        reqs = requests(6, seed=4)
        want = [model.generate(torch.tensor([r.prompt_ids]), r.max_new_tokens)[0].tolist() for r in reqs]
        eng = make_engine(model, 2, 16, compile=True)
        assert [r.tokens for r in eng.run(reqs)] == want
    assert _compiled_graphs() - g0 <= 4


@pytest.mark.parametrize("name", ["vanilla", "mor-expert-cache", "mor-token-share"])
@torch.no_grad()
def test_host_waits_for_the_device_only_where_it_must(name, monkeypatch):
    """The engine's deliberate device-to-host reads (`_to_host`): vanilla's one, the tokens at the
    end of `run()`; MoR's at most one per step (its routing decisions) plus that one."""
    calls = []
    orig = engine_mod._to_host
    monkeypatch.setattr(engine_mod, "_to_host", lambda t: calls.append(1) or orig(t))
    model = build(FAMILIES[name])
    eng = make_engine(model, 3, 16)
    eng.run(requests(7, seed=8))
    if name == "vanilla":
        assert len(calls) == 1
    else:
        assert 1 < len(calls) <= eng.stats["steps"] + 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["vanilla", "mor-expert-cache", "mor-token-share"])
@torch.no_grad()
def test_cuda_engine_syncs_only_where_it_must(name, monkeypatch):
    """`pytest -m gpu`: under torch.cuda's sync debug mode "error", any sync but the engine's
    deliberate `_to_host` reads fails the run (a blocking or pageable upload syncs the stream),
    greedy and sampled, eager and as CUDA graphs (each warmed up first: capturing syncs; compiled
    runs are left to the test below, compiling takes most of a GPU session's minutes)."""
    orig = engine_mod._to_host

    def allowed(t):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return orig(t)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(engine_mod, "_to_host", allowed)
    model = build(FAMILIES[name]).cuda()
    reqs = requests(6, seed=4)
    for mode in ({}, {"cuda_graphs": True}):
        for temperature in (0.0, 1.0):
            eng = make_engine(model, 2, 16, temperature=temperature, **mode)
            want = [r.tokens for r in eng.run(reqs)]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                got = [r.tokens for r in eng.run(reqs)]
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert got == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["vanilla", "mor-expert-cache", "mor-token-share"])
@torch.no_grad()
def test_cuda_engine_matches_cached_decoding(name):
    """`pytest -m gpu` on a CUDA machine: the GPU defaults (unfused weights)
    and the compiled path give the tokens of the model's own cached decoding."""
    model = build(FAMILIES[name]).cuda()
    reqs = requests(6, seed=4)
    want = [
        model.generate(torch.tensor([r.prompt_ids], device="cuda"), r.max_new_tokens)[0].tolist()
        for r in reqs
    ]
    for mode in ({}, {"compile": True}, {"cuda_graphs": True}):
        eng = make_engine(model, 2, 16, **mode)
        assert not eng.fuse
        assert [r.tokens for r in eng.run(reqs)] == want


def test_benchmarks_only_runs_the_named_ones(tmp_path, monkeypatch, capsys):
    """`python -m harness.benchmarks --only NAME`: just those files; an unknown name is an error
    that lists the allowed ones, before anything runs."""
    import sys

    from harness import benchmarks

    monkeypatch.setattr(sys, "argv", ["benchmarks", "--out", str(tmp_path), "--only", "loader_speed"])
    benchmarks.main()
    assert [p.name for p in tmp_path.iterdir()] == ["loader_speed.json"]
    monkeypatch.setattr(sys, "argv", ["benchmarks", "--out", str(tmp_path), "--only", "decode_rate"])
    with pytest.raises(SystemExit):
        benchmarks.main()
    assert "--only decode_rate: unknown; allowed: model_speed" in capsys.readouterr().err


def test_generation_lengths_clipped_at_the_context_say_so(caplog):
    """A length drawn past the context is clipped to it, with a warning naming the keys."""
    from harness.bench import gen_lengths
    from harness.config import BenchConfig

    bcfg = BenchConfig(gen_len_mean=500, gen_len_std=40, num_requests=32)
    with caplog.at_level("WARNING", logger="mor.bench"):
        lens = gen_lengths(bcfg, 0, 512)
    assert max(lens) == 511 and min(lens) < 511
    assert "clipped" in caplog.text and "bench.gen_len_std=40" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mor.bench"):
        gen_lengths(BenchConfig(gen_len_mean=64, gen_len_std=8, num_requests=32), 0, 512)
    assert "clipped" not in caplog.text
