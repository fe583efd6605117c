"""Total vs active parameters, counted analytically from a config (no weights allocated).

`count_parameters(config)` takes either one of the course's config dicts (dense GPT, routed MoE,
shared experts, latent MoE) or a Hugging Face `config.json` as a dict (it has a "model_type"), and
returns a dict with
    total            every parameter the model stores
    active           parameters one token uses: embeddings and head included, routed experts
                     counted top-k of E, shared experts and dense layers in full
    components       {component: parameters}, e.g. embedding, attention, routed_experts, ...
    active_components  the same, as used by one token
`parameter_breakdown(model)` counts the same components from an instantiated course model, so the
two can be checked against each other. `weight_bytes`, `kv_cache_bytes` and `recurrent_state_bytes`
turn counts and configs into memory. Hugging Face configs are read by utils/hf_params.py (which
families, which layers keep what while serving); its public names are re-exported here.
"""
import json
import pathlib

import torch.nn as nn

from .config import EXPERT_TYPES, validate_model_config, validate_moe_config
from .gpt import FeedForward, LayerNorm, MultiHeadAttention
from .hf_params import (ALIASES, HF_FAMILIES, MLA_FAMILIES, attention_layer_types, cached_tokens_per_layer,  # noqa: F401
                        count_hf_parameters, kv_cache_values, moe_layer_shape, recurrent_state_values,
                        text_config)
from .moe import MoEFeedForward, is_moe_layer, shared_expert_hidden

COMPONENTS = ("embedding", "attention", "dense_ffn", "routed_experts", "shared_experts", "router",
              "latent_proj", "norms", "lm_head")


def expert_parameters(expert_type, dim, hidden):
    """Parameters of one expert MLP on vectors of size `dim` with `hidden` units."""
    if expert_type == "gelu":
        return 2 * dim * hidden + hidden + dim           # two matrices and their biases
    if expert_type == "swiglu":
        return 3 * dim * hidden                          # gate, up and down projections
    if expert_type == "relu2":
        return 2 * dim * hidden                          # up and down projections
    raise ValueError(f"expert_type must be one of {EXPERT_TYPES}, got {expert_type!r}")


def _result(components, active_components):
    components = {k: v for k, v in components.items() if v}
    active_components = {k: v for k, v in active_components.items() if v}
    return {"total": sum(components.values()), "active": sum(active_components.values()),
            "components": components, "active_components": active_components}


def count_course_parameters(cfg):
    """Analytic count for a course config (GPTModel with dense, MoE, shared-expert or latent layers)."""
    cfg = validate_model_config(cfg)
    V, C, D, L = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"], cfg["n_layers"]
    total = dict.fromkeys(COMPONENTS, 0)
    total["embedding"] = V * D + C * D
    total["lm_head"] = D * V
    total["attention"] = L * (4 * D * D + D + (3 * D if cfg["qkv_bias"] else 0))
    total["norms"] = L * 4 * D + 2 * D
    active = dict(total)
    n_moe = 0
    if cfg["num_experts"] > 0:
        n_moe = sum(is_moe_layer(cfg, layer) for layer in range(L))
        layer = moe_layer_costs(cfg)["param_components"]
        for key, n in layer.items():
            total[key] = active[key] = n_moe * n
        active["routed_experts"] = total["routed_experts"] * cfg["num_experts_per_tok"] // cfg["num_experts"]
    total["dense_ffn"] = active["dense_ffn"] = (L - n_moe) * expert_parameters("gelu", D, cfg["ffn_hidden_dim"])
    return _result(total, active)


def count_parameters(config):
    """Total, active and per-component parameters of a course config or a Hugging Face config dict."""
    if "model_type" in config:
        return count_hf_parameters(config)
    return count_course_parameters(config)


# ----------------------------------------------------------------------------------------------
# Hugging Face configs (counted in utils/hf_params.py), and what publishers count.

# What publishers leave out when they quote "active" parameters. The gpt-oss model card counts the
# output head, not the input embedding. DeepSeek-V3 says "37B activated" (README.md), and in
# README_WEIGHTS.md the sentence DEEPSEEK_V3_WEIGHTS_QUOTE, which a direct count does not reproduce:
# counting both 0.9B matrices gives one matrix more than its 36.7B; leaving the input embedding out
# comes within 0.1B of it and rounds to the headline 37B, so that is the convention used for
# DeepSeek-V3 too (tests/test_params_hf.py checks both). NVIDIA's Nemotron 3 Nano card gives active
# "without embeddings" (3.2B) and with them (3.6B): without the input embedding, the head kept, is the
# count that gives 3.2B. The others count both.
PUBLISHED_ACTIVE_EXCLUDES = {"deepseek-v3": ("embedding",), "gpt-oss-20b": ("embedding",), "gpt-oss-120b": ("embedding",),
                             "nemotron-3-nano-30b-a3b": ("embedding",)}
# README_WEIGHTS.md of github.com/deepseek-ai/DeepSeek-V3, "Main Model Weights", word for word (the
# markdown bold around the number removed).
DEEPSEEK_V3_WEIGHTS_QUOTE = ("Activation parameters: 36.7B (including 0.9B for Embedding and 0.9B for "
                             "the output Head).")
MODEL_CONFIGS = pathlib.Path(__file__).with_name("assets") / "model_configs"


def parameter_breakdown(model):
    """The same dict as count_parameters, counted from an instantiated course GPTModel's modules."""
    count = lambda module: sum(p.numel() for p in module.parameters())
    total = dict.fromkeys(COMPONENTS, 0)
    active = dict.fromkeys(COMPONENTS, 0)
    total["embedding"] = count(model.tok_emb) + count(model.pos_emb)
    total["lm_head"] = count(model.out_head)
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            total["attention"] += count(module)
        elif isinstance(module, LayerNorm):
            total["norms"] += count(module)
        elif isinstance(module, FeedForward):
            total["dense_ffn"] += count(module)
        elif isinstance(module, MoEFeedForward):
            per_expert = sum(p[0].numel() for p in module.experts.parameters())
            total["routed_experts"] += count(module.experts)
            active["routed_experts"] += module.top_k * per_expert
            total["router"] += count(module.router)
            for part in (module.shared_expert, module.shared_expert_gate):
                total["shared_experts"] += count(part) if part is not None else 0
            for part in (getattr(module, "down_proj", None), getattr(module, "up_proj", None)):
                total["latent_proj"] += count(part) if isinstance(part, nn.Module) else 0
    for key in COMPONENTS:
        if key != "routed_experts":
            active[key] = total[key]
    return _result(total, active)


# ----------------------------------------------------------------------------------------------
# Cost of one MoE layer, and memory.

BYTES_PER_VALUE = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


def _matrix_weights(expert_type, dim, hidden):
    """Weights of one expert's matrices (what matmul FLOPs are made of; biases excluded)."""
    return (3 if expert_type == "swiglu" else 2) * dim * hidden


def moe_layer_costs(cfg, bytes_per_value=2):
    """Parameters, forward FLOPs per token, and bytes per token sent to and back from the experts,
    for one MoE layer of a course config (with or without latent_dim and shared experts).

    FLOPs count 2 per multiply-add of every matrix a token passes through: the router, the k
    chosen experts, the shared expert, and in a LatentMoE the down and up projections.
    Bytes are what expert parallelism moves: each token's vector goes to each of its k experts
    and the k results come back; a LatentMoE sends latent_dim values instead of emb_dim.
    """
    cfg = validate_moe_config(cfg)
    D, E, k, H = cfg["emb_dim"], cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_hidden_dim"]
    l, kind = cfg["latent_dim"], cfg["expert_type"]
    dim = l or D
    shared_hidden = shared_expert_hidden(cfg)
    gate = D if shared_hidden and cfg["shared_expert_gate"] else 0
    projections = 2 * D * l if l else 0
    params = {"routed_experts": E * expert_parameters(kind, dim, H), "router": D * E,
              "shared_experts": (expert_parameters(kind, D, shared_hidden) if shared_hidden else 0) + gate,
              "latent_proj": projections}
    matmul_weights = (D * E + projections + k * _matrix_weights(kind, dim, H)
                      + _matrix_weights(kind, D, shared_hidden) + gate)
    return {"params": sum(params.values()), "param_components": params,
            "flops_per_token": 2 * matmul_weights,
            "bytes_per_token": 2 * k * dim * bytes_per_value}


def weight_bytes(num_params, dtype="bfloat16"):
    """Memory for num_params weights stored as dtype."""
    if dtype not in BYTES_PER_VALUE:
        raise ValueError(f"dtype must be one of {tuple(BYTES_PER_VALUE)}, got {dtype!r}")
    return num_params * BYTES_PER_VALUE[dtype]


def kv_cache_bytes(config, context_length, batch_size=1, dtype="bfloat16"):
    """Memory of the attention cache (keys and values) for batch_size sequences of context_length
    tokens: for a course config, every layer caches K and V of emb_dim values per token; for a
    Hugging Face config, see hf_params.kv_cache_values (GQA, sliding windows, chunks, MLA, and no
    keys or values in the Mamba-2 and linear-attention layers of hybrids)."""
    per_value = weight_bytes(1, dtype)
    if "model_type" not in config:                             # a course config: full multi-head attention
        cfg = validate_model_config(config)
        return batch_size * context_length * cfg["n_layers"] * 2 * cfg["emb_dim"] * per_value
    return kv_cache_values(config, context_length, batch_size) * per_value


def recurrent_state_bytes(config, batch_size=1, dtype="float32"):
    """Memory of the fixed-size state that the Mamba-2 and Gated DeltaNet layers of a hybrid keep
    per sequence (0 for other models). It does not grow with the context, unlike the KV cache.
    float32 by default: transformers and vLLM keep Mamba's state in float32 for stability."""
    return recurrent_state_values(config, batch_size) * weight_bytes(1, dtype)


def serving_cache_bytes(config, context_length, batch_size=1, dtype="bfloat16", state_dtype="float32"):
    """Everything a server keeps per batch of sequences besides the weights: KV cache plus recurrent state."""
    return (kv_cache_bytes(config, context_length, batch_size, dtype)
            + recurrent_state_bytes(config, batch_size, state_dtype))


def load_model_config(name):
    """A real model's config.json fields shipped in utils/assets/model_configs (e.g. "deepseek-v3")."""
    path = MODEL_CONFIGS / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_CONFIGS.glob("*.json") if p.stem != "published")
        raise ValueError(f"no model config {name!r}; available: {known}")
    return json.loads(path.read_text())


def published_unit(published):
    """The value of the last digit a publisher writes: "3.3B" -> 0.1B, "37B" -> 1B, "1T" -> 1T
    (trailing zeros are read as rounding: "80B" -> 10B, looser than 1% only where 1% holds anyway)."""
    digits = str(int(published)).rstrip("0")
    return 10 ** (len(str(int(published))) - len(digits))


def within_published_precision(ours, published, rel=0.01, units=1.0):
    """True when `ours` is within 1% of a published figure, or, when the publisher rounds more
    coarsely than 1% ("3.3B", "37B", "1T"), within `units` of the last digit it publishes."""
    return abs(ours - published) <= max(rel * published, units * published_unit(published))


def published_comparison(name):
    """(our total, published total, our active under the publisher's convention, published active)."""
    c = count_parameters(load_model_config(name))
    pub = load_model_config("published")[name]
    active = c["active"] - sum(c["active_components"].get(k, 0) for k in PUBLISHED_ACTIVE_EXCLUDES.get(name, ()))
    return c["total"], pub["published_total"], active, pub["published_active"]
