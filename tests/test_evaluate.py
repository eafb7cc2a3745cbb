"""Fast tests of evaluation: the lm-eval `mor` adapter (exactness across batching, shared prefixes,
truncation, rolling windows, generation), parity with lm-eval's `hf` backend, local task overrides,
and `evaluate_run` on a hand-made run directory. Tiny random models; no training, no network.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from lm_eval.api.instance import Instance
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers, trainers
from tokenizers import models as tk_models

from harness.data import Tokenizer
from harness.evaluate import EvalConfig, evaluate_run, record_depths, task_manager, write_local_task_overrides
from harness.lm_eval_adapter import MoRLM, bench_requests_per_s
from models import ConfigError, ModelConfig, RouterConfig, build_model

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "all that glitters is not gold",
    "question: what is two plus two? answer: four",
    "the cat sat on the mat and the dog sat on the log",
] * 4
BASE = dict(
    vocab_size=336, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, init_std=0.1
)
EXPERT = RouterConfig(name="expert_choice", inference="threshold")
TOKEN = RouterConfig(name="token_choice", func="softmax", alpha=1.0, aux_loss="balance")
FAMILIES = {
    "vanilla": ModelConfig(family="vanilla", **BASE),
    "recursive": ModelConfig(family="recursive", num_recursions=3, **BASE),
    "token_choice": ModelConfig(family="mor", num_recursions=3, router=TOKEN, **BASE),
    "expert_choice": ModelConfig(family="mor", num_recursions=3, router=EXPERT, **BASE),
    "expert_choice_kvshare": ModelConfig(family="mor", num_recursions=3, kv="share", router=EXPERT, **BASE),
}
QUESTIONS = ["the quick brown", "a stitch in", "question: what is two plus two? answer:", "all"]
CHOICES = [" fox", " time saves nine", " gold is not all that glitters", " dog"]
REQUESTS = [(q, c) for q in QUESTIONS for c in CHOICES] + [
    ("the cat sat on the mat and", " the dog sat"),  # a context of its own
    ("", "hello world"),  # empty context: scored after the EOS prefix token
    ("x", " y z"),
    ("all", " dog"),  # an exact duplicate
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_tok() -> HFTokenizer:
    tk = HFTokenizer(tk_models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS, trainer)
    return tk


@pytest.fixture(scope="module")
def tok(hf_tok) -> Tokenizer:
    return Tokenizer(hf_tok, "test-bpe", "<eos>")


def make(name: str, seed: int = 1):
    torch.manual_seed(seed)
    return build_model(FAMILIES[name]).eval()


def instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@torch.no_grad()
def alone(model, lm: MoRLM, ctx: str, cont: str) -> float:
    """The reference: one request, one row, no padding, no cache."""
    if ctx == "":
        c, k = [lm.prefix_token_id], lm.tok_encode(cont)
    else:
        c, k = lm._encode_pair(ctx, cont)
    logp = torch.log_softmax(model(torch.tensor([(c + k)[:-1]])).logits.float(), -1)[0, len(c) - 1 :]
    return float(logp.gather(1, torch.tensor(k)[:, None]).double().sum())


# -- exactness of batching and shared prefixes ----------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loglikelihood_is_independent_of_batching_and_prefix_sharing(tok, family):
    model = make(family)
    ref = [alone(model, MoRLM.from_model(model, tok), c, k) for c, k in REQUESTS]
    if family.startswith("expert"):  # the threshold rule must route tokens to different depths
        with record_depths(model) as rec, torch.no_grad():
            model(torch.tensor([tok.encode(" ".join(CORPUS[:5]))[:64]]))
        assert len(set(rec["depth"].flatten().tolist())) > 1
    for bs in (1, 4, 32):
        for shared in (True, False):
            lm = MoRLM.from_model(model, tok, batch_size=bs, shared_prefix=shared)
            assert lm.causal
            out = lm.loglikelihood(instances("loglikelihood", REQUESTS), disable_tqdm=True)
            got = [lp for lp, _ in out]
            assert got == pytest.approx(ref, abs=1e-5), (bs, shared)
            assert all(isinstance(g, bool) for _, g in out)


def test_shared_prefix_runs_each_context_once(tok):
    model = make("vanilla")
    seen = []
    handle = model.embed_tokens.register_forward_hook(lambda m, a, o: seen.append(a[0].numel()))
    try:
        mc = [(q, c) for q in QUESTIONS for c in CHOICES]
        for shared in (True, False):
            seen.clear()
            MoRLM.from_model(model, tok, shared_prefix=shared).loglikelihood(
                instances("loglikelihood", mc), disable_tqdm=True
            )
            tokens = sum(seen)
            if shared:
                shared_tokens = tokens
    finally:
        handle.remove()
    assert shared_tokens < tokens
    lm = MoRLM.from_model(model, tok, batch_size=8)
    assert bench_requests_per_s(lm, instances("loglikelihood", mc)) > 0


def test_topk_routing_is_labelled_non_causal_and_runs_requests_alone(tok):
    model = make("expert_choice")
    lm = MoRLM.from_model(model, tok, batch_size=8, routing="topk")
    assert not lm.causal and lm.routing_rule == "topk"
    out = lm.loglikelihood(instances("loglikelihood", REQUESTS[:6]), disable_tqdm=True)
    model.router.rule = "topk"
    try:
        ref = [alone(model, lm, c, k) for c, k in REQUESTS[:6]]
    finally:
        model.router.rule = None
    assert [lp for lp, _ in out] == pytest.approx(ref, abs=1e-5)
    assert model.router.rule is None  # the override is scoped to the adapter's calls
    with pytest.raises(ConfigError, match="routing"):
        MoRLM.from_model(make("vanilla"), tok, routing="threshold")
    with pytest.raises(ConfigError, match="allowed"):
        MoRLM.from_model(model, tok, routing="sometimes")


def test_left_truncation_is_counted_and_matches_hflm_rule(tok):
    model = make("vanilla")
    lm = MoRLM.from_model(model, tok, max_length=16)
    long_ctx = " ".join(CORPUS[:3])
    ctx, cont = lm._encode_pair(long_ctx, " gold")
    assert len(ctx) + len(cont) > 17
    out = lm.loglikelihood(
        instances("loglikelihood", [(long_ctx, " gold"), ("all", " dog")]), disable_tqdm=True
    )
    assert lm.truncated_requests == 1 and lm.get_model_info()["mor_truncated_requests"] == 1
    window = (ctx + cont)[-17:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([window[:-1]])).logits.float(), -1)[0, -len(cont) :]
    assert out[0][0] == pytest.approx(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()), abs=1e-5)


def test_loglikelihood_rolling_equals_direct_sums(tok):
    model = make("expert_choice")
    lm = MoRLM.from_model(model, tok, max_length=16)
    short, long = "a stitch in time", " ".join(CORPUS[:4])
    out = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(short,), (long,)]), disable_tqdm=True)

    def direct(inp: list[int], targets: list[int]) -> float:  # score the last len(targets) positions
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inp])).logits.float(), -1)[0, -len(targets) :]
        return float(logp.gather(1, torch.tensor(targets)[:, None]).double().sum())

    toks = tok.encode(short)
    assert len(toks) < 16
    assert out[0] == pytest.approx(direct([tok.eos_id] + toks[:-1], toks), abs=1e-5)
    toks = tok.encode(long)
    assert len(toks) > 32
    L, expect = 16, direct([tok.eos_id] + toks[: 16 - 1], toks[:16])
    done = L
    while done < len(toks):  # each later window predicts up to L new tokens with a full context
        end = min(done + L, len(toks))
        expect += direct(toks[end - L - 1 : end - 1], toks[done:end])
        done = end
    assert out[1] == pytest.approx(expect, abs=1e-4)
    assert lm.truncated_requests == 0


@pytest.mark.parametrize("family", ["vanilla", "expert_choice"])
def test_generate_until_is_cached_greedy_with_stop_sequences(tok, family):
    model = make(family)
    prompts = ["the quick brown", "question: what is two plus two? answer:", "a"]
    ref = []
    for p in prompts:  # reference: the model's own cached greedy decoding, one prompt at a time
        ids = model.generate(torch.tensor([tok.encode(p)]), max_new_tokens=12)[0].tolist()
        cut = ids.index(tok.eos_id) if tok.eos_id in ids else len(ids)
        ref.append(tok.decode(ids[:cut]))
    lm = MoRLM.from_model(model, tok, batch_size=4)
    out = lm.generate_until(
        instances("generate_until", [(p, {"until": [], "max_gen_toks": 12}) for p in prompts]),
        disable_tqdm=True,
    )
    assert out == ref
    stop = ref[0][len(ref[0]) // 2 : len(ref[0]) // 2 + 2]  # a string that occurs mid-generation
    out = lm.generate_until(
        instances("generate_until", [(prompts[0], {"until": [stop], "max_gen_toks": 12})])
    )
    assert out == [ref[0].split(stop)[0]]
    lm = MoRLM.from_model(model, tok, max_length=20)  # context left-truncated to 20 - 12 tokens
    lm.generate_until(
        instances("generate_until", [(" ".join(CORPUS[:2]), {"until": ["\n"], "max_gen_toks": 12})])
    )
    assert lm.truncated_requests == 1


# -- parity with lm-eval's hf backend ---------------------------------------------------------------


def _write_mc_task(root, n_docs: int = 6) -> str:
    docs = [
        {"q": QUESTIONS[i % len(QUESTIONS)] + " " * (i % 2), "choices": CHOICES[: 2 + i % 3], "label": i % 2}
        for i in range(n_docs)
    ]
    (root / "tiny_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'tiny_mc.jsonl'}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "Q: {{q}}\\nA:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return str(root)


def test_parity_with_lm_eval_hf_backend(tmp_path, hf_tok, tok):
    hf_io = pytest.importorskip("models.hf_io")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast

    model = make("vanilla")
    hf_io.export_hf(model, tmp_path / "hf")
    PreTrainedTokenizerFast(tokenizer_object=hf_tok, eos_token="<eos>").save_pretrained(tmp_path / "hf")
    hflm = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=4, dtype="float32")
    ours = MoRLM.from_model(model, tok, batch_size=4)
    reqs = instances("loglikelihood", REQUESTS)
    theirs = hflm.loglikelihood(reqs, disable_tqdm=True)
    mine = ours.loglikelihood(reqs, disable_tqdm=True)
    assert [a for a, _ in mine] == pytest.approx([a for a, _ in theirs], abs=1e-4)
    assert [g for _, g in mine] == [g for _, g in theirs]

    tm = task_manager(["tiny_mc"], [_write_mc_task(tmp_path)])
    scores = []
    for lm in (hflm, ours):
        res = simple_evaluate(
            model=lm, tasks=["tiny_mc"], task_manager=tm, bootstrap_iters=0, log_samples=False
        )
        scores.append({k: v for k, v in res["results"]["tiny_mc"].items() if k.startswith("acc")})
    assert scores[0] == pytest.approx(scores[1])


# -- task resolution and local paper tasks -------------------------------------------------------------


@pytest.fixture(scope="module")
def full_tm():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def test_unknown_task_names_close_matches(monkeypatch, full_tm):
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda *a, **k: full_tm)
    with pytest.raises(ConfigError, match=r"piqaa.*did you mean.*piqa"):
        task_manager(["piqaa"])


def test_standard_piqa_task_runs_offline_from_local_files(tmp_path, tok, full_tm):
    from lm_eval import simple_evaluate

    data = tmp_path / "data" / "piqa"
    data.mkdir(parents=True)
    docs = [
        {"goal": f"To {g},", "sol1": " use the dog.", "sol2": " use the fox.", "label": i % 2}
        for i, g in enumerate(["open a jar", "cut paper", "boil water", "dry hair", "fix a chair"])
    ]
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = write_local_task_overrides(["piqa"], tmp_path / "data", tmp_path / "tasks", tm=full_tm)
    spec = (out / "piqa.yaml").read_text()
    assert "include:" in spec and "dataset_path: json" in spec
    tm = task_manager(["piqa"], [str(out)])
    assert "hellaswag" not in tm.all_tasks  # the overrides alone define the task: no 15k-file index
    lm = MoRLM.from_model(make("expert_choice"), tok, batch_size=8)
    res = simple_evaluate(model=lm, tasks=["piqa"], task_manager=tm, num_fewshot=1, bootstrap_iters=0)
    assert res["n-samples"]["piqa"]["effective"] == len(docs)
    assert 0.0 <= res["results"]["piqa"]["acc_norm,none"] <= 1.0
    assert res["config"]["mor_routing"] == "threshold"
    with pytest.raises(FileNotFoundError, match="evaluates on split 'test'"):
        write_local_task_overrides(["arc_easy"], tmp_path / "data", tmp_path / "t2", tm=full_tm)


# -- evaluate_run -----------------------------------------------------------------------------------------


def _make_run(root, family: str = "expert_choice"):
    from dataclasses import asdict

    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    from harness.data import DataConfig, synthetic_tokenizer

    tok = synthetic_tokenizer()
    mcfg = FAMILIES[family]
    data = DataConfig(seq_len=32, val_docs=8, syn_doc_words=64)
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml({"model": asdict(mcfg), "data": asdict(data)}))
    tok.save(root / "tokenizer.json")
    model = make(family)
    ckpt = root / "checkpoints" / "step_7"
    ckpt.mkdir(parents=True)
    save_model(model, str(ckpt / "model.safetensors"))
    (ckpt / "trainer.json").write_text("{}")
    return root


def test_evaluate_run_writes_rows_for_val_nll_and_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")  # lm-eval's perplexity bootstrap: no process pool
    run = _make_run(tmp_path / "run")
    cfg = EvalConfig(
        tasks="demo_mc,demo_lastword,tiny_mc",  # the generated demo tasks + one from include_path
        include_path=_write_mc_task(tmp_path),
        val_batches=2,
        val_batch_size=2,
        limit=4,
        demo_docs=6,
        bootstrap_iters=50,
        device="cpu",
    )
    rows = evaluate_run(run, cfg)
    by = {(r["task"], r["metric"]): r for r in rows}
    assert {"nll", "nll/filler"} <= {m for t, m in by if t == "val"}
    depths = [m for t, m in by if t == "val" and m.startswith("nll/depth")]
    assert depths, "MoR runs report NLL per recursion depth"
    assert sum(by["val", m]["n"] for m in depths) == by["val", "nll"]["n"]
    assert by["tiny_mc", "acc"]["n"] == 4 and by["tiny_mc", "acc"]["shots"] == 0
    assert {("demo_mc", "acc_norm"), ("demo_lastword", "acc"), ("demo_lastword", "perplexity")} <= set(by)
    assert (run / "tasks" / "demo_mc.yaml").exists()
    for r in rows:
        assert set(r) == {"task", "metric", "value", "stderr", "n", "shots", "routing", "causal", "step"}
        assert r["routing"] == "threshold" and r["causal"] is True and r["step"] == 7
    assert list((run / "lm_eval").glob("*.json"))
    # the registered `mor` model, built the way lm-eval's CLI builds it from --model_args
    from lm_eval.api.registry import get_model

    lm = get_model("mor").create_from_arg_string(
        f"pretrained={run},routing=topk,shared_prefix=false", {"batch_size": "4", "max_batch_size": None}
    )
    assert (lm.step, lm.routing_rule, lm.causal) == (7, "topk", False)
    assert (lm.shared_prefix, lm.batch_size) == (False, 4)
    evaluate_run(run, cfg)  # idempotent: rows are replaced, not duplicated
    lines = (run / "eval.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)


def test_evaluate_run_clear_errors(tmp_path):
    run = _make_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="tokenizer"):
        evaluate_run(run, EvalConfig(tasks="tiny_mc", tokenizer="hf:gpt2", val_batches=0))
    with pytest.raises(FileNotFoundError, match="no checkpoint for eval.step=3"):
        evaluate_run(run, EvalConfig(step=3))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text("model: {}\n")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate_run(tmp_path / "empty", EvalConfig())
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate_run(run, EvalConfig(batch_size=0))


def test_eval_presets_match_the_schema():
    from pathlib import Path

    from omegaconf import OmegaConf

    from harness.evaluate import TASK_SETS

    presets = sorted((Path(__file__).resolve().parents[1] / "conf" / "eval").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"demo", "paper"}
    for p in presets:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(p)))
        assert cfg.tasks in TASK_SETS
