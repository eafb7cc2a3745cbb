"""The Hydra tree: every preset composes and instantiates; typos and unknown choices fail at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from harness.config import model_config_from, run_name_from_overrides
from models import build_model
from tests.helpers import ROOT, compose, run_cli

CONF = ROOT / "conf"


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("size", _names("size"))
@pytest.mark.parametrize("model", _names("model"))
def test_every_model_and_size_builds(model, size):
    cfg = compose([f"model={model}", f"size={size}"])
    assert cfg.size == size
    with torch.device("meta"):  # paper sizes build instantly, no memory
        m = build_model(model_config_from(cfg.model))
    assert m.num_params() > 0
    assert m.flops_per_token(cfg.data.seq_len, "exact").train > 0


@pytest.mark.parametrize("router", _names("model/router"))
def test_every_router_config_builds(router):
    base = "mor_token" if "token" in router else "mor_expert"
    cfg = compose([f"model={base}", f"model/router={router}"])
    m = build_model(model_config_from(cfg.model))
    out = m(torch.randint(0, 100, (2, 16)), labels=torch.randint(0, 100, (2, 16)))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("experiment", _names("experiment"))
def test_every_experiment_composes(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.experiment


def test_misspelled_key_is_an_error():
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError), match="lrr"):
        compose(["train.lrr=0.1"])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose(["train.lr=fast"])


def test_unknown_choice_lists_the_options(tmp_path):
    proc = run_cli(["model=mor_exprt", f"results_root={tmp_path}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "mor_expert" in proc.stderr and "Available options" in proc.stderr
    assert not any(Path(tmp_path).rglob("config.yaml"))


def test_run_names_are_deterministic_and_ignore_where_to_run():
    a = run_name_from_overrides(["model=mor_expert", "size=tiny", "eval=paper", "results_root=/x"])
    b = run_name_from_overrides(["size=tiny", "model=mor_expert", "bench.batch_sizes=[4]"])
    assert a == b == "model=mor_expert,size=tiny"
    assert run_name_from_overrides([]) == "default"
    long = run_name_from_overrides([f"model.router.params.k{i}={i}" for i in range(40)])
    assert len(long) <= 120
