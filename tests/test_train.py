"""Training: compute-matched budgets, schedules, exact resume after SIGKILL, bad input, NaN stop."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from omegaconf import open_dict

from harness import records
from harness.config import run_dir_of
from harness.main import run
from harness.train import NonFiniteLoss, lr_at, plan_budget, train
from models import ConfigError, build_model
from tests.helpers import MICRO, compose, kill_after_checkpoint, spawn_cli


def _model(cfg):
    from harness.config import model_config_from

    return build_model(model_config_from(cfg.model))


def test_flop_budget_matches_compute_across_families():
    budget = 5e12
    plans = {}
    for m in ("vanilla", "recursive", "mor_expert", "mor_token"):
        cfg = compose([f"model={m}", *MICRO, f"train.budget.value={budget}"])
        plans[m] = plan_budget(cfg, _model(cfg), 1)
    for m, p in plans.items():
        spent = p.steps * p.tokens_per_step * p.flops_per_token
        assert spent <= budget < spent + p.tokens_per_step * p.flops_per_token, m
    # routed models are cheaper per token, so the same budget buys more steps
    assert plans["mor_expert"].steps > plans["recursive"].steps
    assert plans["mor_expert"].flops_per_token < plans["vanilla"].flops_per_token


def test_token_and_step_budgets_and_accumulation():
    cfg = compose(["model=vanilla", *MICRO, "train.budget.kind=tokens", "train.budget.value=2560"])
    p = plan_budget(cfg, _model(cfg), 1)
    assert (p.steps, p.accum) == (10, 2)  # 256 tokens/step = 2 micro-batches of 4 x 32
    cfg = compose(["model=vanilla", *MICRO, "train.budget.kind=steps", "train.budget.value=7"])
    assert plan_budget(cfg, _model(cfg), 2).steps == 7


def test_wsd_and_cosine_schedules():
    cfg = compose(["train.lr=1.0", "train.warmup_frac=0.1", "train.decay_frac=0.2"])
    lrs = [lr_at(s, 100, cfg.train) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in lrs[10:80])
    assert lrs[80] == pytest.approx(1.0) and lrs[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))
    with open_dict(cfg):
        cfg.train.schedule = "cosine"
    cos = [lr_at(s, 100, cfg.train) for s in range(100)]
    assert cos[10] == pytest.approx(1.0) and cos[99] < 0.01
    with open_dict(cfg):
        cfg.train.warmup_ref_steps = 20  # paper: warmup is 5% of the smallest budget's steps
    assert lr_at(1, 100, cfg.train) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.global_batch_tokens=300", "train.global_batch_tokens"),
        ("train.budget.value=10", "train.budget"),
        ("data.seq_len=4096", "data.seq_len"),
        ("model.vocab_size=16", "model.vocab_size"),
        ("train.budget.kind=hours", "train.budget.kind"),
        ("train.wandb=true", "train.wandb"),  # the optional mirror is not installed in the test venv
    ],
)
def test_bad_input_fails_before_training(tmp_path, override, key):
    cfg = compose(["model=vanilla", *MICRO, override, f"results_root={tmp_path}", "run_name=bad"])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(cfg, tmp_path / "bad")
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def _losses(run_dir):
    return [r["loss"] for r in records.read_jsonl(run_dir / "metrics.jsonl")]


def _cli_args(root, extra=()):
    return [
        "stages=[train]",
        "model=mor_expert",
        *MICRO,
        "train.budget.kind=steps",
        "train.budget.value=30",
        "train.log_every=1",
        "train.ckpt_every=5",
        f"results_root={root}",
        "run_name=r",
        *extra,
    ]


def _spawn(args: list[str]) -> subprocess.Popen:
    return spawn_cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_resume_after_sigkill_is_exact(tmp_path):
    ref_root, cut_root = tmp_path / "ref", tmp_path / "cut"
    ref = _spawn(_cli_args(ref_root))
    cut = _spawn(_cli_args(cut_root))
    ckpt = cut_root / "default" / "r" / "checkpoints" / "step_00000005" / "trainer.json"
    kill_after_checkpoint(cut, ckpt)
    partial = _losses(cut_root / "default" / "r")
    assert len(partial) < 30, "the run finished before it could be killed"
    assert ref.wait(timeout=240) == 0, ref.stderr.read()
    resumed = _spawn(_cli_args(cut_root))
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read()
    a, b = _losses(ref_root / "default" / "r"), _losses(cut_root / "default" / "r")
    assert len(a) == len(b) == 30
    assert a == b  # bitwise: same data position, RNG, optimizer state


def test_sigterm_checkpoints_and_resume_matches(tmp_path):
    cfg = compose([*_cli_args(tmp_path)[1:], "train.ckpt_every=1000"])
    run_dir = run_dir_of(cfg)
    proc = _spawn(_cli_args(tmp_path, ["train.ckpt_every=1000"]))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode != 0  # preempted, not finished
    ckpts = records.checkpoint_dirs(run_dir)
    assert ckpts, proc.stderr.read()
    assert not (run_dir / "FAILED").exists()  # preemption is not a failure
    resumed = _spawn(_cli_args(tmp_path, ["train.ckpt_every=1000"]))
    assert resumed.wait(timeout=240) == 0, resumed.stderr.read()
    assert len(_losses(run_dir)) == 30


def test_resume_with_different_config_is_refused(tmp_path):
    cfg = compose(_cli_args(tmp_path, ["train.budget.value=2"])[1:])
    train(cfg, run_dir_of(cfg))
    (run_dir_of(cfg) / "checkpoints" / "step_00000002" / "trainer.json").write_text(
        json.dumps(
            {
                **records.read_json(run_dir_of(cfg) / "checkpoints/step_00000002/trainer.json"),
                "finished": False,
            }
        )
    )
    changed = compose(_cli_args(tmp_path, ["train.budget.value=2", "train.lr=0.1"])[1:])
    with pytest.raises(ConfigError, match="resume_force"):
        train(changed, run_dir_of(changed))


def test_nan_loss_stops_with_failed_marker(tmp_path):
    cfg = compose(_cli_args(tmp_path, ["train.lr=1e30", "train.warmup_frac=0", "train.grad_clip=1e30"])[1:])
    with pytest.raises(NonFiniteLoss, match="loss is"):
        run(cfg)
    assert "NonFiniteLoss" in (run_dir_of(cfg) / "FAILED").read_text()
