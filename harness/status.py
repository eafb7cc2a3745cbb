"""Where every run of a results tree stands, and how to resubmit the failed ones.

    mor-status results/runs                          # every experiment
    mor-status results/runs --experiment isoflop     # one experiment
    mor-status results/runs --experiment isoflop --sweep    # + runs of the preset not started yet
    mor-status results/runs --resubmit-failed        # reset their retry count, print mor-run commands
    mor-status results/runs --resubmit-failed --launch --launcher slurm   # ... and run them

States (first match wins):

| state | meaning |
|---|---|
| `done` | `DONE`: every stage finished |
| `running` | a job holds `<run>/.lock` |
| `failed` | `FAILED` (last attempt's error); the next launch retries it while `train.max_retries` allows |
| `trained` | training finished (final checkpoint) but not every stage ran (e.g. `stages=[train]`) |
| `preempted` | a checkpoint and no lock: stopped (preempted, timed out, killed); the next launch resumes it |
| `pending` | nothing trained yet |

Progress is in the budget's unit (FLOPs, tokens or steps) from `summary.json` and the last row of
`metrics.jsonl`; the Slurm job id comes from `slurm.json`, and the overrides that recreate the run (the
same run directory) from `overrides.yaml`, both written by `harness.main` when a job starts.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUN_FILES = (
    "config.yaml",
    "overrides.yaml",
    "summary.json",
    "metrics.jsonl",
    "checkpoints",
    "slurm.json",
    "DONE",
    "FAILED",
)
STATES = ("pending", "running", "preempted", "trained", "failed", "done")


@dataclass
class RunState:
    path: str
    state: str
    experiment: str = ""
    run: str = ""
    attempts: int = 0  # failed attempts so far
    retries_left: int | None = None  # failed attempts still allowed (train.max_retries - attempts)
    kind: str | None = None  # budget kind: flops | tokens | steps
    done_units: float | None = None  # progress in the budget's unit
    budget_units: float | None = None
    step: int | None = None
    steps: int | None = None
    last_loss: float | None = None
    slurm_job: str | None = None
    error: str | None = None  # first line of FAILED
    overrides: list[str] = field(default_factory=list)

    @property
    def progress(self) -> float | None:
        if self.step is not None and self.steps:
            return min(1.0, self.step / self.steps)
        return None


def lock_held(run_dir: Path) -> bool:
    """True if a job holds the run's lock (a non-blocking shared-lock probe on `.lock`)."""
    path = Path(run_dir) / ".lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_jsonl_row(path: Path, tail_bytes: int = 1 << 16) -> dict | None:
    """The last complete JSON row of a (possibly long, possibly being appended) JSONL file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "trainer.json").exists())


def _max_retries(run_dir: Path, given: int | None, overrides: list[str]) -> int:
    """train.max_retries of the run: given, else its config.yaml, else its overrides, else the default."""
    if given is not None:
        return given
    try:
        from omegaconf import OmegaConf

        return int(OmegaConf.load(run_dir / "config.yaml").train.max_retries)
    except Exception:
        pass
    for o in overrides:
        if o.lstrip("+~").startswith("train.max_retries="):
            return int(o.split("=", 1)[1])
    from .config import TrainConfig

    return TrainConfig().max_retries


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / "overrides.yaml"
    if not path.exists():
        return []
    from omegaconf import OmegaConf

    return list(OmegaConf.to_container(OmegaConf.load(path)).get("overrides") or [])


def run_state(run_dir: Path | str, max_retries: int | None = None) -> RunState:
    """State and progress of one run directory (which need not exist yet: `pending`)."""
    run_dir = Path(run_dir)
    st = RunState(path=str(run_dir), state="pending", experiment=run_dir.parent.name, run=run_dir.name)
    if not run_dir.exists():
        return st
    attempts = _read_json(run_dir / "attempts.json") or {}
    st.attempts = int(attempts.get("failed", 0))
    slurm = _read_json(run_dir / "slurm.json") or {}
    st.slurm_job = (slurm.get("current") or {}).get("job")
    st.overrides = _overrides(run_dir)
    st.retries_left = max(0, _max_retries(run_dir, max_retries, st.overrides) - st.attempts)
    summary = _read_json(run_dir / "summary.json") or {}
    st.steps = summary.get("steps")
    budget = summary.get("budget") or {}
    st.kind, st.budget_units = budget.get("kind"), budget.get("value")
    row = last_jsonl_row(run_dir / "metrics.jsonl")
    if row:
        st.step, st.last_loss = row.get("step"), row.get("loss")
        unit = {"flops": "flops", "tokens": "tokens", "steps": "step"}.get(st.kind or "")
        st.done_units = row.get(unit) if unit else None
    ckpts = _checkpoints(run_dir)
    finished = bool(ckpts and (_read_json(ckpts[-1] / "trainer.json") or {}).get("finished"))
    if (run_dir / "DONE").exists():
        st.state = "done"
    elif lock_held(run_dir):
        st.state = "running"
    elif (run_dir / "FAILED").exists():
        st.state = "failed"
        text = (run_dir / "FAILED").read_text(errors="replace").strip()
        st.error = text.splitlines()[0][:200] if text else ""
    elif finished:
        st.state = "trained"
    elif ckpts:
        st.state = "preempted"
    return st


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def find_runs(root: Path, experiment: str | None = None) -> list[Path]:
    """Run directories under a results root (`<root>/<experiment>/<run>`) or one experiment's directory."""
    root = Path(root)
    if not root.is_dir():
        return []
    if experiment:
        root = root / experiment
        return sorted(p for p in root.iterdir() if is_run_dir(p)) if root.is_dir() else []
    children = [p for p in root.iterdir() if not p.name.startswith(".")]
    if any(is_run_dir(p) for p in children):  # root is itself an experiment directory
        return sorted(p for p in children if is_run_dir(p))
    return sorted(r for e in children if e.is_dir() for r in e.iterdir() if is_run_dir(r))


def sweep_states(root: Path, experiment: str, extra: list[str] | None = None) -> list[RunState]:
    """Every run the experiment preset would launch (with results_root=root), started or not."""
    from .plan import expand

    states = []
    for job in expand([f"experiment={experiment}", f"results_root={root}", *(extra or [])]):
        st = run_state(job.run_dir, job.cfg.train.max_retries)
        if not st.overrides:
            st.overrides = list(job.overrides)
        states.append(st)
    return states


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) >= 1e4 or (x and abs(x) < 1e-2) else f"{x:g}"


def format_table(states: list[RunState]) -> str:
    header = [
        "state",
        "experiment/run",
        "progress",
        "done / budget",
        "loss",
        "slurm job",
        "retries left",
        "error",
    ]
    rows = []
    for s in states:
        prog = "-" if s.progress is None else f"{100 * s.progress:.0f}% ({s.step}/{s.steps})"
        amount = "-" if s.budget_units is None else f"{_fmt(s.done_units)} / {_fmt(s.budget_units)} {s.kind}"
        loss = "-" if s.last_loss is None else f"{s.last_loss:.4f}"
        left = "-" if s.retries_left is None else str(s.retries_left)
        error = (s.error or "")[:60] if s.state == "failed" else ""
        rows.append([s.state, f"{s.experiment}/{s.run}", prog, amount, loss, s.slurm_job or "-", left, error])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    counts = {k: sum(s.state == k for s in states) for k in STATES}
    lines.append(f"{len(states)} runs: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n))
    return "\n".join(lines)


def resubmit_command(st: RunState, launcher: str | None = None) -> list[str]:
    """`mor-run` with the run's own overrides: it recreates the same run directory."""
    if not st.overrides:
        raise ValueError(f"{st.path} has no overrides.yaml: cannot rebuild its command")
    cmd = ["mor-run"]
    if launcher:
        cmd += ["--multirun", f"hydra/launcher={launcher}"]
    return cmd + list(st.overrides)


def reset_retries(st: RunState) -> None:
    """Give a failed run a fresh retry budget (the history stays in attempts.json)."""
    from . import records

    path = Path(st.path) / "attempts.json"
    attempts = _read_json(path) or {"failed": 0}
    attempts.setdefault("resets", []).append(attempts.get("failed", 0))
    attempts["failed"] = 0
    records.write_json(path, attempts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mor-status", description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="results root (e.g. results/runs) or one experiment's directory")
    ap.add_argument("--experiment", "-e", help="only this experiment (directory under the root)")
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="with --experiment: also list the preset's runs that have no directory yet (composes the sweep)",
    )
    ap.add_argument("--state", action="append", choices=STATES, help="only runs in this state (repeatable)")
    ap.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    ap.add_argument(
        "--resubmit-failed",
        action="store_true",
        help="reset the retry count of failed runs and print the mor-run command of each",
    )
    ap.add_argument("--launch", action="store_true", help="with --resubmit-failed: also run the commands")
    ap.add_argument("--launcher", help="hydra/launcher preset for the commands (e.g. slurm); default: local")
    args = ap.parse_args(argv)

    root = Path(args.root)
    if args.sweep:
        if not args.experiment:
            ap.error("--sweep needs --experiment")
        states = sweep_states(root, args.experiment)
    else:
        states = [run_state(p) for p in find_runs(root, args.experiment)]
    if args.state:
        states = [s for s in states if s.state in args.state]
    if args.json:
        for s in states:
            print(json.dumps({**asdict(s), "progress": s.progress}))
    else:
        print(format_table(states))
    if not args.resubmit_failed:
        return 0
    failed = [s for s in states if s.state == "failed"]
    status = 0
    for s in failed:
        try:
            cmd = resubmit_command(s, args.launcher)
        except ValueError as e:
            print(f"# {e}", file=sys.stderr)
            status = 1
            continue
        reset_retries(s)
        print(shlex.join(cmd))
        if args.launch:
            proc = subprocess.run(cmd)
            status = status or proc.returncode
    if not failed:
        print("# no failed runs", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
