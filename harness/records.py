"""Run-directory files: atomic writes, JSONL logs, provenance, and loading a trained run.

See docs/run_dir.md for the contract every stage follows.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=float) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def git_info() -> dict:
    root = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    # a copy of the tree on another machine (its .git missing or stale): the SHA it was copied at
    if os.environ.get("MOR_GIT_SHA"):
        return {"git_sha": os.environ["MOR_GIT_SHA"], "git_dirty": None}
    sha = git("rev-parse", "HEAD")
    if not sha:
        return {"git_sha": None, "git_dirty": None}
    # dirty = uncommitted changes to the code; outputs under results/ (tracked benchmark JSON) do not count
    dirty = bool(git("status", "--porcelain", "--", ".", ":(exclude)results"))
    return {"git_sha": sha, "git_dirty": dirty}


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def env_info(device: torch.device | str = "cpu") -> dict:
    versions = {}
    for pkg in ("torch", "lm_eval", "transformers", "datasets", "tokenizers", "hydra-core", "submitit"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        **git_info(),
        "python": platform.python_version(),
        "versions": versions,
        "device": device_name(device),
        "hostname": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# -- checkpoints ------------------------------------------------------------------------------------
def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (they contain trainer.json, written last), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.exists():
        return []
    dirs = [d for d in root.glob("step_*") if (d / "trainer.json").exists()]
    return sorted(dirs, key=lambda d: int(d.name.split("_")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


@dataclass
class LoadedRun:
    model: torch.nn.Module
    tokenizer: Any  # harness.data.Tokenizer
    config: Any  # resolved OmegaConf config of the run
    step: int
    run_dir: Path


def load_run(run_dir: Path | str, step: int | None = None, device: str = "cpu") -> LoadedRun:
    """Rebuild a run's model from config.yaml and load its checkpoint weights (safetensors only)."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_model

    from models import build_model

    from .config import model_config_from

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no config.yaml")
    dirs = checkpoint_dirs(run_dir)
    if step is not None:
        dirs = [d for d in dirs if int(d.name.split("_")[1]) == step]
    if not dirs:
        what = f"step {step}" if step is not None else "any step"
        raise FileNotFoundError(f"{run_dir} has no checkpoint for {what} (looked in {run_dir / CHECKPOINTS})")
    ckpt = dirs[-1]
    cfg = OmegaConf.load(run_dir / "config.yaml")
    model = build_model(model_config_from(cfg.model))
    load_model(model, ckpt / MODEL_FILE, device=device)  # buffers (router thresholds) included
    from .data import Tokenizer

    tok = Tokenizer.from_file(run_dir / "tokenizer.json")
    return LoadedRun(model.to(device).eval(), tok, cfg, int(ckpt.name.split("_")[1]), run_dir)
