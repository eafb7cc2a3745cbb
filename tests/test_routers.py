"""Router variants added through the extension path (one class + one YAML each), their diagnostics,
test-time recursion scaling, the guide's example (docs/adding_a_router.md) and the router ablation
preset, end to end through the Hydra CLI at a micro scale."""

from __future__ import annotations

import csv
import re
import shutil

import pytest
import torch

from harness import records
from models import ModelConfig, RouterConfig, build_model
from tests.helpers import MICRO, ROOT, run_cli

V = 336  # covers the synthetic vocabulary (330 words)
ROUTERS = {
    "mod": RouterConfig(name="mod", params={"capacity": 0.5}),
    "act": RouterConfig(name="act", aux_loss="ponder", aux_coeff=0.01, params={"eps": 0.01}),
    "fixed_depth": RouterConfig(name="fixed_depth", aux_loss="none", params={"depth": 2}),
    "oracle": RouterConfig(
        name="harness.oracle_router.OracleRouter", func="softmax", alpha=1.0, aux_loss="none"
    ),
    "random": RouterConfig(name="random", aux_loss="none"),
    "expert_choice": RouterConfig(),
    "token_choice": RouterConfig(name="token_choice", func="softmax", alpha=1.0, aux_loss="balance"),
}
CLI = [
    *MICRO,
    "train.budget.kind=steps",
    "train.budget.value=6",
    "train.log_every=3",
    "eval.tasks=demo_mc",
    "eval.limit=4",
    "eval.val_batches=2",
    "eval.val_batch_size=4",
    "eval.demo_docs=4",
    "eval.bootstrap_iters=0",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def mor(router: RouterConfig, n_r: int = 3) -> ModelConfig:
    return ModelConfig(
        family="mor",
        vocab_size=V,
        d_model=32,
        n_layers=2 + n_r,
        n_heads=2,
        n_kv_heads=1,
        d_ff=64,
        max_seq_len=64,
        num_recursions=n_r,
        sharing="middle_cycle",
        router=router,
    )


def make(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(mor(ROUTERS[name], **kw))


def synthetic_batch(B: int = 2, T: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, class of the next token) from the synthetic training stream."""
    from harness.data import DataConfig, build_loader, load_tokenizer

    cfg = DataConfig(seq_len=T)
    batch = next(iter(build_loader(cfg, load_tokenizer(cfg), "train", B)))
    return batch["input_ids"], batch["token_class"]


def depths(model, ids) -> torch.Tensor:
    from harness.evaluate import record_depths

    with record_depths(model) as rec, torch.no_grad():
        model(ids)
    return torch.stack(rec["active"], -1)  # [B, T, recursions run]


# -- every variant: trains, evaluates, decodes causally ----------------------------------------------
@pytest.mark.parametrize("name", ["mod", "act", "fixed_depth", "oracle", "random"])
def test_variant_trains_evaluates_and_decodes_causally(name):
    model = make(name).train()
    ids, _ = synthetic_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.detach().clone() for k, v in model.router.named_parameters()}
    for _ in range(3):
        out = model(ids, labels=ids)
        loss = out.loss + sum(out.aux_losses.values(), torch.zeros(()))
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.router.post_step()
    assert any(f"router/load_r{r}" in out.stats for r in range(3))
    moved = [k for k, v in model.router.named_parameters() if not torch.equal(v, before[k])]
    if name != "random":  # random has no trained router weights in the selection or gate path
        assert moved, "the router's weights get gradients"
    model.eval()
    model.calibrate([ids])
    with torch.no_grad():
        full = model(ids).logits
        assert torch.isfinite(full).all()
        if name == "random":  # scores are drawn per call: routing differs between passes
            return
        assert model.causal
        cache = model.make_cache(ids.shape[0], ids.shape[1])
        outs = [model(ids[:, :5], cache=cache).logits]
        outs += [model(ids[:, i : i + 1], cache=cache).logits for i in range(5, ids.shape[1])]
        assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)
        changed = ids.clone()
        changed[:, 12:] = ids.flip(1)[:, 12:]
        assert torch.allclose(model(changed).logits[:, :12], full[:, :12], atol=1e-5)


def test_mod_routes_without_hierarchy_at_a_flat_capacity():
    model = make("mod").train()
    ids, _ = synthetic_batch(2, 24)
    stats = model(ids, labels=ids).stats
    for r in range(3):  # training: top-k at capacity 0.5 among all tokens, at every recursion
        assert float(stats[f"router/load_r{r}"]) == pytest.approx(0.5)
    act = depths(model, ids)
    assert (act[..., 1] & ~act[..., 0]).any(), "a token skipped recursion 1 and ran recursion 2"
    model.eval()  # a recursion that selects nobody does not end the others (single-token decode)
    model.router.threshold.copy_(torch.tensor([1e9, -1e9, 1e9]))
    act = depths(model, ids[:, :1])
    assert act.shape[-1] == 3 and act[..., 1].all() and not act[..., 0].any()


def test_act_halts_on_accumulated_probability_and_pays_a_ponder_cost():
    model = make("act").train()
    ids, _ = synthetic_batch()
    out = model(ids, labels=ids)
    # at init sigmoid(~0) = 0.5 per recursion: H = 0.5 after recursion 1, 1.0 after recursion 2
    assert float(out.stats["router/load_r1"]) == 1.0 and float(out.stats["router/load_r2"]) == 0.0
    ponder = out.aux_losses["act_ponder"]
    assert float(ponder.detach()) == pytest.approx(0.01 * (2 + 0.5), rel=1e-2)  # N = 2, remainder 1 - p_1
    ponder.backward()
    assert model.router.scorers[1].weight.grad.abs().sum() > 0
    model.eval()
    for logit, want in ((10.0, 1), (-10.0, 3)):  # sure to halt at once / never halts: runs them all
        model.router.score = lambda h, r, z=logit: torch.full(h.shape[:2], z)
        assert (depths(model, ids).sum(-1) == want).all()


def test_fixed_depth_runs_exactly_k_recursions_in_training_and_inference():
    model = make("fixed_depth").train()
    ids, _ = synthetic_batch()
    stats = model(ids, labels=ids).stats
    assert [float(stats[f"router/load_r{r}"]) for r in range(2)] == [1.0, 1.0]
    assert model.router.capacities() == [1.0, 1.0, 0.0]
    assert model.router.threshold.tolist() == [float("-inf"), float("-inf"), float("inf")]
    model.eval()
    act = depths(model, ids)
    assert act[..., :2].all() and (act.shape[-1] == 2 or not act[..., 2].any())


def test_oracle_depth_follows_the_class_of_the_next_token():
    from harness.data import SYNTHETIC_VOCAB, TOKEN_CLASSES

    model = make("oracle").eval()
    word = {w: i for i, w in enumerate(SYNTHETIC_VOCAB)}
    # after "is" a recalled value (recall: 3), after "=" a result (arith: 3), after "set" a key
    # (random: 1), after a filler word more filler (2)
    ids = torch.tensor([[word["is"], word["="], word["set"], word["the"], word["k3"]]])
    assert (depths(model, ids).sum(-1) == torch.tensor([[3, 3, 1, 2, 2]])).all()
    ids, cls = synthetic_batch(4, 64)
    d = depths(model, ids).sum(-1)
    want = torch.tensor(
        [{"random": 1, "filler": 2, "structure": 2, "recall": 3, "arith": 3}[c] for c in TOKEN_CLASSES]
    )
    assert (d == want[cls]).float().mean() > 0.85  # the id-only oracle's agreement with the true class
    # the decode engine embeds new tokens itself (no prelude needed here), then asks plan()
    x = model.embed_tokens(ids[:, 0])
    choice, _ = model.router.plan(x.unsqueeze(1), {}, {})
    assert torch.equal(choice.squeeze(1), model.router.choice_of_id[ids[:, 0]])
    assert model.router.capacities()[0] == 1.0 and 0 < model.router.capacities()[2] < 0.1


@pytest.mark.parametrize("name", ["fixed_depth", "oracle"])
@torch.no_grad()
def test_decode_engine_serves_score_threshold_and_plan_routers_exactly(name):
    """fixed_depth keeps its rule in `threshold`, the oracle reads ids in `plan()`: the bench's
    depth-wise batching engine decodes them exactly like the model's own cached `generate`."""
    from harness.engine import Request, make_engine

    model = make(name).eval()
    prompts = [[0], [17], [200]]
    engine = make_engine(model, 2, 16, temperature=0.0)
    got = engine.run([Request(p, 8) for p in prompts])
    want = model.generate(torch.tensor(prompts), 8).tolist()
    assert [r.tokens for r in got] == want and engine.routing_exact


@pytest.mark.parametrize("name", ["mod", "act"])
def test_decode_engine_labels_select_overriding_routers_approximate(name):
    from harness.engine import make_engine

    assert not make_engine(make(name).eval(), 2, 16).routing_exact


def test_bad_router_params_name_the_key():
    from models import ConfigError

    for rc, key in [
        (RouterConfig(name="mod", params={"capcity": 0.5}), "params"),
        (RouterConfig(name="mod", params={"capacity": 1.5}), "params.capacity"),
        (RouterConfig(name="act", aux_loss="ponder", inference="topk"), "inference"),
        (RouterConfig(name="act", aux_loss="ponder", params={"eps": 2}), "params.eps"),
        (RouterConfig(name="fixed_depth", aux_loss="none", params={"depth": 0}), "params.depth"),
        (
            RouterConfig(
                name="harness.oracle_router.OracleRouter",
                func="softmax",
                aux_loss="none",
                params={"depth": {"hard": 3}},
            ),
            "params.depth",
        ),
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"model.router.{key}")):
            build_model(mor(rc))


# -- evaluation diagnostics -------------------------------------------------------------------------
def _val_batches(n: int = 2, B: int = 4, T: int = 32) -> list[dict]:
    from harness.data import DataConfig, build_loader, load_tokenizer

    cfg = DataConfig(seq_len=T)
    loader = iter(build_loader(cfg, load_tokenizer(cfg), "val", B))
    return [next(loader) for _ in range(n)]


def test_eval_diagnostics_rows_are_consistent():
    from harness.evaluate import nll_stats

    batches = _val_batches()
    model = make("mod").eval()
    model.calibrate([b["input_ids"] for b in batches])
    plain = {m for m, *_ in nll_stats(model, batches, "cpu")}
    assert not any(m.startswith(("depth_frac/", "depth_mean/", "load_r")) for m in plain)  # training path
    rows = {m: (v, n) for m, v, _, n in nll_stats(model, batches, "cpu", diagnostics=True)}
    total = rows["nll"][1]
    for group in ("all", "filler", "structure", "random", "pos_0", "pos_8", "pos_16", "pos_24"):
        fr = [rows[f"depth_frac/{group}/r{k}"][0] for k in (1, 2, 3)]
        assert rows[f"depth_mean/{group}"][0] == pytest.approx(sum(fr))
        assert all(0 <= f <= 1 for f in fr)
    assert sum(rows[f"depth_frac/pos_{p}/r1"][1] for p in (0, 8, 16, 24)) == total
    classes = [m for m in rows if re.fullmatch(r"depth_frac/(filler|structure|random|recall|arith)/r1", m)]
    assert sum(rows[m][1] for m in classes) == total
    # the mean depth is what the per-depth NLL counts say
    by_depth = {int(m[9:]): n for m, (_, n) in rows.items() if m.startswith("nll/depth")}
    assert rows["depth_mean/all"][0] == pytest.approx(sum(k * n for k, n in by_depth.items()) / total)
    assert {"load_r0", "load_r2", "dead_token_ratio", "depth_entropy", "depth_maxvio"} <= set(rows)
    assert rows["depth_entropy"][0] >= 0
    vanilla = build_model(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64))
    assert not any(m.startswith("depth") for m, *_ in nll_stats(vanilla, batches, "cpu", diagnostics=True))


# -- test-time recursion scaling --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["expert_choice", "mod", "act", "fixed_depth", "token_choice", "oracle"])
@torch.no_grad()
def test_recursion_scaling_reuses_the_trained_weights(name):
    from harness.evaluate import with_recursions

    ids, _ = synthetic_batch(2, 24)
    model = make(name).eval()
    model.calibrate([ids])
    base = depths(model, ids).sum(-1)
    same = with_recursions(model, 3)
    assert torch.allclose(same(ids).logits, model(ids).logits, atol=1e-6)
    for n in (1, 2, 4, 5):
        m = with_recursions(model, n)
        assert m.cfg.num_recursions == n and len(m.slots_rec) == n
        assert torch.equal(m.layers[1].self_attn.q_proj.weight, model.layers[1].self_attn.q_proj.weight)
        assert torch.isfinite(m(ids).logits).all()
        d = depths(m, ids).sum(-1)
        assert d.max() <= n
        if model.router.kind == "token":  # deepest trained choice runs all n; fewer: capped
            want = torch.where(base == 3, n, base) if n > 3 else base.clamp(max=n)
            assert torch.equal(d, want)
        elif n < 3:
            assert torch.equal(d, base.clamp(max=n)) or name == "mod"
    m4 = with_recursions(model, 4)
    if model.router.kind == "expert":  # recursion 4 reuses recursion 3's router
        assert m4.router.threshold[3] == model.router.threshold[2]
        assert torch.equal(m4.router.scorers[3].weight, model.router.scorers[2].weight)
    if name == "fixed_depth":
        assert torch.equal(depths(m4, ids).sum(-1), base)  # still exactly 2


# -- the guide and the ablation preset, through the Hydra CLI -----------------------------------------
def _guide() -> tuple[dict[str, str], list[str]]:
    """The files the guide's code blocks name (first line `# <path>`) and its `mor-train` lines."""
    text = (ROOT / "docs" / "adding_a_router.md").read_text()
    files, commands = {}, []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", text, re.S):
        m = re.fullmatch(r"#\s*((?:models|conf)/\S+\.(?:py|yaml))", body.splitlines()[0].strip())
        if m:
            files[m.group(1)] = body
        if lang == "bash":
            commands += [line.split("#")[0].split() for line in body.splitlines() if line.startswith("mor-")]
    return files, commands


def test_guide_example_trains_and_evaluates_through_the_cli(tmp_path):
    files, commands = _guide()
    assert set(files) == {"models/routers/cosine.py", "conf/model/router/cosine.yaml"}
    repo = tmp_path / "repo"  # a copy of the project plus exactly the two files the guide adds
    for d in ("models", "harness", "conf"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, body in files.items():
        assert not (repo / rel).exists()
        (repo / rel).write_text(body)
    train = [c for c in commands if c[0] == "mor-train"]
    assert train and all("model/router=cosine" in c for c in train)
    root = tmp_path / "runs"
    for args in train:  # the guide's commands, at a micro scale, with evaluation
        run_cli(["stages=[train,eval]", *args[1:], *CLI, f"results_root={root}"], cwd=repo)
    runs = sorted((root / "default").iterdir())
    assert len(runs) == len(train)
    for run in runs:
        cfg = (run / "config.yaml").read_text()
        assert "name: cosine" in cfg
        metrics = records.read_jsonl(run / "metrics.jsonl")
        assert "router/sampling_acc_r1" in metrics[-1] and "aux/router_bce_r1" in metrics[-1]
        evals = {r["metric"] for r in records.read_jsonl(run / "eval.jsonl") if r["task"] == "val"}
        assert {"nll", "depth_frac/all/r2", "depth_mean/filler"} <= evals
    spread = [r for r in runs if "spread: 0.1" in (r / "config.yaml").read_text()]
    assert spread and "aux/cosine_spread_r1" in records.read_jsonl(spread[0] / "metrics.jsonl")[-1]


def test_router_ablation_preset_end_to_end(tmp_path):
    from omegaconf import OmegaConf

    from analysis.cli import main as tables_main

    root = tmp_path / "runs"
    run_cli(
        ["--multirun", "experiment=routers", *CLI, "eval.recursions=[2,4]", f"results_root={root}"], cwd=ROOT
    )
    runs = sorted((root / "routers").iterdir())
    names = {OmegaConf.load(r / "config.yaml").model.router.name for r in runs}
    oracle = "harness.oracle_router.OracleRouter"
    assert names == {"expert_choice", "token_choice", "mod", "act", "fixed_depth", "random", oracle}
    for run in runs:
        assert (run / "DONE").exists(), run.name
        evals = {r["metric"]: r for r in records.read_jsonl(run / "eval.jsonl") if r["task"] == "val"}
        assert {"recursions/2/nll", "recursions/4/nll", "depth_frac/recall/r1", "depth_frac/pos_0/r3"} <= set(
            evals
        )
        assert all(r["causal"] for r in evals.values())
    out = tmp_path / "out"
    args = [str(root / "routers"), "--out", str(out), "--tables", "routers", "--plots", "router_depth", "-q"]
    assert tables_main(args) == 0
    rows = list(csv.DictReader((out / "tables" / "routers.csv").open()))
    assert {r["Model"] for r in rows} == {
        "MoR-E",
        "MoR-T",
        "MoR-mod",
        "MoR-act",
        "MoR-fixed_depth",
        "MoR-random",
        "MoR-oracle",
    }
    assert all(r["NLL"] and r["depth recall"] and r["NLL @4 rec"] for r in rows)
    assert {p.name for p in (out / "plots").iterdir()} >= {
        "router_depth_class.png",
        "router_depth_position.png",
    }
