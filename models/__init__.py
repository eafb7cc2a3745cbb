"""MoR Bench model library: pure PyTorch, never imports the harness or Hydra."""

from .config import ConfigError, ModelConfig, RouterConfig
from .transformer import ModelOutput, TransformerLM


def build_model(cfg: ModelConfig) -> TransformerLM:
    """Vanilla and recursive families are TransformerLM (their layer schedule differs); MoR adds a router."""
    cfg.validate()
    if cfg.family == "mor":
        from .mor import MoRLM

        return MoRLM(cfg)
    return TransformerLM(cfg)


__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "RouterConfig", "TransformerLM", "build_model"]
