"""Training on local text files (.txt and .jsonl) with a trained BPE tokenizer: a FLOP-budgeted run
finishes, and a run killed with SIGKILL resumes to exactly the same losses (across data epochs)."""

from __future__ import annotations

import json
import subprocess

from harness import records
from harness.config import model_config_from
from harness.data import load_tokenizer, synthetic_documents
from harness.train import plan_budget
from models import build_model
from tests.helpers import MICRO, compose, kill_after_checkpoint, spawn_cli

STEPS = 16


def _spawn(args: list[str]) -> subprocess.Popen:
    return spawn_cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in records.read_jsonl(run_dir / "metrics.jsonl")]


def _corpus(root):
    """28 documents (~3.4k training tokens; 16 steps read 4k, so the run crosses an epoch): .txt, .jsonl."""
    docs = [t for t, _ in synthetic_documents(7, 28, doc_words=48)]
    d = root / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("\n\n".join(docs[:14]) + "\n")
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[14:]))
    return d


def _args(root, corpus, extra=()):
    data = [
        "data.source=text_files",
        f"data.paths={corpus}/*",
        "data.tokenizer=train:300",
        "data.val_docs=4",
        f"data.cache_dir={root.parent / 'cache'}",
    ]
    return [
        *data,
        "model=mor_expert",
        *MICRO,
        "train.log_every=1",
        "train.ckpt_every=5",
        f"results_root={root}",
        "run_name=t",
        *extra,
    ]


def test_text_files_budgeted_run_resumes_exactly_after_sigkill(tmp_path):
    corpus = _corpus(tmp_path)
    cfg = compose(_args(tmp_path / "ref", corpus))
    tok = load_tokenizer(cfg.data)  # train and cache it once: both runs load the same file
    assert tok.vocab_size == 300 and cfg.model.vocab_size >= tok.vocab_size
    fpt = plan_budget(cfg, build_model(model_config_from(cfg.model)), 1).flops_per_token
    budget = [f"train.budget.value={(STEPS + 0.5) * fpt * cfg.train.global_batch_tokens}"]

    ref_root, cut_root = tmp_path / "ref", tmp_path / "cut"
    ref = _spawn(["stages=[train]", *_args(ref_root, corpus, budget)])
    cut = _spawn(["stages=[train]", *_args(cut_root, corpus, budget)])
    ckpt = cut_root / "default" / "t" / "checkpoints" / "step_00000005" / "trainer.json"
    kill_after_checkpoint(cut, ckpt)
    assert len(_losses(cut_root / "default" / "t")) < STEPS, "the run finished before it could be killed"
    assert ref.wait(timeout=240) == 0, ref.stderr.read()
    resumed = _spawn(["stages=[train]", *_args(cut_root, corpus, budget)])
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read()

    ref_dir, cut_dir = ref_root / "default" / "t", cut_root / "default" / "t"
    a, b = _losses(ref_dir), _losses(cut_dir)
    assert len(a) == len(b) == STEPS
    assert a == b  # bitwise: same data position (epoch, document, offset), RNG, optimizer state
    assert a[-1] < a[0]
    summary = records.read_json(cut_dir / "summary.json")
    assert summary["status"] == "trained" and summary["steps"] == STEPS
    assert summary["flops"] <= float(budget[0].split("=")[1])
    rows = records.read_jsonl(cut_dir / "metrics.jsonl")
    assert rows[-1]["val/nll"] > 0 and "val/nll/filler" not in rows[-1]  # real text: no token classes
    final = records.read_json(records.latest_checkpoint(cut_dir) / "trainer.json")
    assert final["loader"][0]["epoch"] >= 1  # the run went past one pass over the training documents
    saved = (cut_dir / "tokenizer.json").read_text()
    assert saved == tok.backend.to_str()
