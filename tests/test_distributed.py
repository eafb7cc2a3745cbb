"""Data parallel on CPU (gloo, world size 2): DDP and FSDP2 through torchrun, DDP through Slurm variables.

Each run is the real entry point (`python -m harness.main stages=[train]`). Two ranks with micro-batch 2
must reproduce a single process with micro-batch 4 (the same global batch of 256 tokens, 2 accumulation
steps): the loader gives rank r rows [2r, 2r+2) of the single process's 4-row batch, gradients are
averaged over ranks, and expert-choice top-k routes within each sequence, so only float reduction order
differs. Losses agree to ~1e-7 relative; weights to ~1e-5 (Adam divides by sqrt(v), which amplifies
rounding on coordinates whose gradients are near zero).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from harness import records
from tests.helpers import MICRO, ROOT

STEPS = 6
PER_BATCH = ("train.micro_batch_size=", "train.val_batches=", "train.calibrate_batches=")
ARGS = [
    "stages=[train]",
    *(a for a in MICRO if not a.startswith(PER_BATCH)),
    "train.budget.kind=steps",
    f"train.budget.value={STEPS}",
    "train.log_every=1",
    "run_name=x",
]
# validation reads train.val_batches batches of micro_batch_size rows (the same on every rank): ask for
# the same 8 held-out rows (and the same 4 calibration rows) with either batch size
SINGLE = ["train.micro_batch_size=4", "train.val_batches=2", "train.calibrate_batches=1"]
PARALLEL = ["train.micro_batch_size=2", "train.val_batches=4", "train.calibrate_batches=2"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    return {**env, "CI": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def _launch(prefix: list[str], args: list[str], **env: str) -> subprocess.Popen:
    """`python [prefix] -m harness.main args` with no launcher variables but `env` (output captured)."""
    return subprocess.Popen(
        [sys.executable, *prefix, "-m", "harness.main", *args],
        cwd=ROOT,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _check(procs: list[subprocess.Popen], timeout: int = 240) -> None:
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    bad = [(p.returncode, o) for p, o in zip(procs, outs) if p.returncode != 0]
    assert not bad, "\n\n".join(f"exit {rc}:\n{o[-4000:]}" for rc, o in bad)


def _torchrun(root, *extra: str) -> None:
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _check([_launch(torchrun, [*ARGS, *PARALLEL, f"results_root={root}", *extra])])


def _free_port(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _slurm(root, *extra: str) -> None:
    """Two tasks with only Slurm's variables, as `srun --ntasks=2` sets them (no torchrun, no MASTER_*)."""
    job_id = next(  # the master port is seeded by the job id (as in submitit): pick one whose port is free
        j for j in map(str, range(random.randrange(10**6), 10**7)) if _free_port(_port_of(j))
    )
    slurm = {
        "SLURM_JOB_ID": job_id,
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NODEID": "0",
    }
    args = [*ARGS, *PARALLEL, f"results_root={root}", *extra]
    _check([_launch([], args, **slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)) for r in range(2)])


def _port_of(job_id: str) -> int:
    return random.Random(job_id).randint(20000, 60000)


def _run(root):
    return root / "default" / "x"


def _final(root) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = records.latest_checkpoint(_run(root))
    return {f: load_file(str(ckpt / f)) for f in (records.MODEL_FILE, "optim.safetensors")}


def _assert_same_training(ref_root, root) -> None:
    ref_rows = records.read_jsonl(_run(ref_root) / "metrics.jsonl")
    rows = records.read_jsonl(_run(root) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in rows]), torch.tensor([r[key] for r in ref_rows]), rtol=1e-5, atol=0
        )
    assert rows[-1]["val/nll"] == pytest.approx(ref_rows[-1]["val/nll"], rel=1e-5)
    ref, got = _final(ref_root), _final(root)
    for f in ref:
        ref_t = {k: v for k, v in ref[f].items() if not k.startswith("rng.")}
        assert sorted(got[f]) == sorted(ref[f])
        for k, v in ref_t.items():
            torch.testing.assert_close(got[f][k], v, rtol=1e-4, atol=5e-5, msg=f"{f}:{k}")
    meta = records.read_json(records.latest_checkpoint(_run(root)) / "trainer.json")
    ref_meta = records.read_json(records.latest_checkpoint(_run(ref_root)) / "trainer.json")
    assert meta["param_groups"] == ref_meta["param_groups"] and meta["world_size"] == 2
    assert meta["loader"] == [ref_meta["loader"][0]] * 2  # one global data position, equal on both ranks
    summary, ref_summary = (records.read_json(_run(r) / "summary.json") for r in (root, ref_root))
    for key in ("params_unique", "steps", "tokens_per_step"):
        assert summary[key] == ref_summary[key]
    assert summary["world_size"] == 2 and summary["grad_accum"] == ref_summary["grad_accum"] == 2


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Single-process references with the same global batch (micro-batch 4), one per model family."""
    roots = {}

    def get(model: str):
        if model not in roots:
            roots[model] = tmp_path_factory.mktemp(f"single_{model}")
            _check([_launch([], [*ARGS, f"model={model}", *SINGLE, f"results_root={roots[model]}"])])
        return roots[model]

    return get


@pytest.mark.parametrize("model", ["vanilla", "mor_expert"])
def test_ddp_torchrun_matches_single_process(tmp_path, single, model):
    _torchrun(tmp_path, f"model={model}")
    _assert_same_training(single(model), tmp_path)
    assert not (_run(tmp_path) / "FAILED").exists()


def test_fsdp_torchrun_matches_single_process_and_resumes(tmp_path, single):
    ref = single("mor_expert")
    _torchrun(tmp_path, "model=mor_expert", "train.parallel=fsdp", "train.ckpt_every=3")
    _assert_same_training(ref, tmp_path)
    # resume from the step-3 checkpoint (full state, re-sharded on load): the same final run
    run = _run(tmp_path)
    shutil.rmtree(records.latest_checkpoint(run))
    assert records.latest_checkpoint(run).name == "step_00000003"
    rows = [{**r, "kept": r["step"] <= 3} for r in records.read_jsonl(run / "metrics.jsonl")]
    records.atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _torchrun(tmp_path, "model=mor_expert", "train.parallel=fsdp", "train.ckpt_every=3")
    _assert_same_training(ref, tmp_path)
    rows = records.read_jsonl(run / "metrics.jsonl")  # steps 1-3 kept from before, 4-6 trained again
    assert [r.get("kept") for r in rows] == [True] * 3 + [None] * 3


def test_slurm_environment_forms_the_group_and_matches(tmp_path, single):
    _slurm(tmp_path, "model=vanilla")
    _assert_same_training(single("vanilla"), tmp_path)


def test_locked_run_stops_every_rank(tmp_path):
    """Rank 0 decides (lock, retries) and tells the others: no rank waits in training for a rank 0
    that is not coming. Here another job holds the run's lock."""
    from harness.main import RunLock

    run = _run(tmp_path)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    with RunLock(run) as locked:
        assert locked
        _check([_launch(torchrun, [*ARGS, *PARALLEL, f"results_root={tmp_path}"])], 120)
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
