"""Export/import between our vanilla `TransformerLM` and a Hugging Face Llama checkpoint directory.

A checkpoint directory is what `LlamaForCausalLM.save_pretrained` writes and `from_pretrained` reads:
`config.json` plus `model.safetensors` (or shards listed in `model.safetensors.index.json`). Our
parameter names already mirror HF's Llama names (`layers.N.self_attn.q_proj`, `embed_tokens`,
`norm`), RoPE uses HF's rotate-half convention and RMSNorm is Llama's, so the mapping is only the
`model.` prefix. Only the vanilla family maps onto Llama one to one; recursive and MoR models raise.

`transformers` is imported lazily, inside the functions, so `models/` stays importable without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .transformer import TransformerLM

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _hf_key(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def _our_key(name: str) -> str:
    return name.removeprefix("model.")


def export_hf(model: TransformerLM, out_dir: str | Path) -> Path:
    """Write `model` (family vanilla) as a transformers LlamaForCausalLM checkpoint directory.

    Tensors keep the model's dtype. With tied embeddings `lm_head.weight` is omitted, as
    `save_pretrained` does. Returns the directory."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = model.cfg
    if cfg.family != "vanilla":
        raise ConfigError(
            f"model.family={cfg.family!r} cannot be exported to Llama: only family=vanilla maps one to one "
            "onto LlamaForCausalLM (shared blocks and routers have no Llama equivalent)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    if hasattr(hf_cfg, "rope_parameters"):  # transformers >= 5
        hf_cfg.rope_parameters = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    else:  # transformers 4.x
        hf_cfg.rope_theta = float(cfg.rope_theta)
    hf_cfg.architectures = ["LlamaForCausalLM"]
    dtype_name = str(dtype).removeprefix("torch.")
    if hasattr(hf_cfg, "rope_parameters"):
        hf_cfg.dtype = dtype_name
    else:
        hf_cfg.torch_dtype = dtype_name
    tensors = {_hf_key(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # safetensors refuses aliased tensors; state_dict has none with tied embeddings (lm_head is None)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    hf_cfg.save_pretrained(str(out))
    return out


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / WEIGHTS).exists():
        return load_file(str(path / WEIGHTS))
    if (path / INDEX).exists():
        shards = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_file(str(path / shard)))
        return out
    raise FileNotFoundError(f"{path} holds neither {WEIGHTS} nor {INDEX}")


def config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig for a Llama `config.json` dict; raises ConfigError for features we lack."""

    def need(key: str, ok: bool, why: str) -> None:
        if not ok:
            raise ConfigError(f"config.json {key}={hf.get(key)!r} is not supported: {why}")

    need("model_type", hf.get("model_type", "llama") == "llama", "allowed llama")
    need("hidden_act", hf.get("hidden_act", "silu") == "silu", "allowed silu (SwiGLU)")
    need("attention_bias", not hf.get("attention_bias", False), "our projections have no bias")
    need("mlp_bias", not hf.get("mlp_bias", False), "our MLP has no bias")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    need("rope_parameters", rope_type == "default", "only default RoPE (no scaling)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    need("head_dim", head_dim * heads == d, "must equal hidden_size / num_attention_heads")
    return ModelConfig(
        family="vanilla",
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def import_hf(path: str | Path, dtype: torch.dtype | None = None) -> TransformerLM:
    """Load a Llama checkpoint directory (ours or any HF Llama, e.g. SmolLM) as a vanilla TransformerLM.

    Keeps the checkpoint's dtype unless `dtype` is given."""
    path = Path(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    tensors = {_our_key(k): v for k, v in _load_tensors(path).items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some checkpoints store the tied copy anyway
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    with torch.device("meta"):
        model = TransformerLM(cfg)
    missing = set(model.state_dict()) - set(tensors)
    unexpected = set(tensors) - set(model.state_dict())
    if missing or unexpected:
        raise ConfigError(
            f"{path}: checkpoint does not match the config (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    model.load_state_dict(tensors, assign=True)
    # non-persistent RoPE tables were built on meta: rebuild them on the weights' device
    model.rotary = type(model.rotary)(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta).to(
        tensors["embed_tokens.weight"].device
    )
    if dtype is not None:
        model.to(dtype)
    return model
