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
two can be checked against each other. `weight_bytes` and `kv_cache_bytes` turn counts and configs
into memory; `attention_layer_types` and `cached_tokens_per_layer` say which layers of a Hugging
Face config attend to everything, to a sliding window, or to a chunk (and keep that many tokens).
"""
import json
import pathlib

import torch.nn as nn

from .gpt import FeedForward, LayerNorm, MultiHeadAttention, validate_gpt_config
from .moe import EXPERT_TYPES, MOE_OPTIONAL_KEYS, MoEFeedForward, shared_expert_hidden, validate_moe_config

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
    cfg = validate_gpt_config(cfg, extra_optional=MOE_OPTIONAL_KEYS)
    V, C, D, L = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"], cfg["n_layers"]
    total = dict.fromkeys(COMPONENTS, 0)
    total["embedding"] = V * D + C * D
    total["lm_head"] = D * V
    total["attention"] = L * (4 * D * D + D + (3 * D if cfg["qkv_bias"] else 0))
    total["norms"] = L * 4 * D + 2 * D
    active = dict(total)
    n_moe = 0
    if cfg["num_experts"] > 0:
        cfg = validate_moe_config(cfg)
        n_moe = L // cfg["moe_every_n_layers"]
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
# Hugging Face configs. What each family builds, as in `transformers` (the tests compare with its
# models instantiated on the meta device). Buffers are not parameters: DeepSeek-V3's and GLM-4.5's
# per-expert selection biases (E numbers per layer) are not counted, as in `transformers`.

# What publishers leave out when they quote "active" parameters. The gpt-oss model card counts the
# output head, not the input embedding. DeepSeek-V3 says "37B activated" (README.md), and in
# README_WEIGHTS.md the sentence DEEPSEEK_V3_WEIGHTS_QUOTE, which a direct count does not reproduce:
# counting both 0.9B matrices gives one matrix more than its 36.7B; leaving the input embedding out
# comes within 0.1B of it and rounds to the headline 37B, so that is the convention used for
# DeepSeek-V3 too (tests/test_params_hf.py checks both). The others count both.
PUBLISHED_ACTIVE_EXCLUDES = {"deepseek-v3": ("embedding",), "gpt-oss-20b": ("embedding",)}
# README_WEIGHTS.md of github.com/deepseek-ai/DeepSeek-V3, "Main Model Weights", word for word (the
# markdown bold around the number removed).
DEEPSEEK_V3_WEIGHTS_QUOTE = ("Activation parameters: 36.7B (including 0.9B for Embedding and 0.9B for "
                             "the output Head).")
MODEL_CONFIGS = pathlib.Path(__file__).with_name("assets") / "model_configs"

HF_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
               "gpt_oss", "llama4_text")
REQUIRED = object()


def _field(cfg, key, default=REQUIRED):
    """cfg[key]; `key` may be a tuple of names the same field goes by (config.json files and
    transformers' to_dict() do not always agree), the first present one wins."""
    for name in (key if isinstance(key, tuple) else (key,)):
        if name in cfg:
            return cfg[name]
    if default is REQUIRED:
        raise ValueError(f"{cfg['model_type']} config is missing the field {key!r}")
    return default


NUM_EXPERTS = ("num_experts", "n_routed_experts", "num_local_experts")


def _hf_attention(cfg, D, nh, nkv, hd):
    """(attention weights, attention-internal norm weights) of one layer."""
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: _field(cfg, key, default)
    if mt in ("deepseek_v2", "deepseek_v3"):                 # multi-head latent attention (MLA)
        nope, rope, v, kv_rank = f("qk_nope_head_dim"), f("qk_rope_head_dim"), f("v_head_dim"), f("kv_lora_rank")
        q_rank, bias = f("q_lora_rank", None), f("attention_bias", False)
        q = D * nh * (nope + rope) if q_rank is None else D * q_rank + bias * q_rank + q_rank * nh * (nope + rope)
        kv = D * (kv_rank + rope) + bias * (kv_rank + rope) + kv_rank * nh * (nope + v)
        return q + kv + nh * v * D + bias * D, kv_rank + (q_rank or 0)
    q, kv, o = D * nh * hd, 2 * D * nkv * hd, nh * hd * D
    if mt == "qwen2_moe":
        biases = f("qkv_bias", True) * (nh + 2 * nkv) * hd
    elif mt == "glm4_moe":
        biases = f("attention_bias", False) * (nh + 2 * nkv) * hd
    else:
        biases = f("attention_bias", False) * ((nh + 2 * nkv) * hd + D)
    sinks = nh if mt == "gpt_oss" else 0                      # one learned attention sink per head
    qk_norms = {"qwen3_moe": 2 * hd, "olmoe": (nh + nkv) * hd,
                "glm4_moe": 2 * hd * bool(f("use_qk_norm", False))}.get(mt, 0)
    return q + kv + o + biases + sinks, qk_norms


def _hf_moe_layers(cfg, L):
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: _field(cfg, key, default)
    if mt in ("qwen2_moe", "qwen3_moe"):
        step, dense_only = f("decoder_sparse_step", 1), set(f("mlp_only_layers", []) or [])
        return [i for i in range(L) if i not in dense_only and f(NUM_EXPERTS) > 0 and (i + 1) % step == 0]
    if mt in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        return list(range(f("first_k_dense_replace"), L))
    if mt == "llama4_text":
        explicit = f("moe_layers", None)
        step = f("interleave_moe_layer_step", 1)
        return list(explicit) if explicit is not None else list(range(step - 1, L, step))
    return list(range(L))                                      # mixtral, olmoe, gpt_oss: every layer


def _hf_experts(cfg, D):
    """(E, k, parameters of one routed expert, shared-expert parameters, router parameters, dense MLP width)."""
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: _field(cfg, key, default)
    k = f("num_experts_per_tok")
    swiglu = lambda hidden: 3 * D * hidden
    if mt == "mixtral":
        E, I = f(NUM_EXPERTS), f("intermediate_size")
        return E, k, swiglu(I), 0, D * E, None
    if mt == "olmoe":
        E, I = f(NUM_EXPERTS), f("intermediate_size")
        return E, k, swiglu(I), 0, D * E, None
    if mt == "gpt_oss":                                        # experts and router have biases
        E, I = f(NUM_EXPERTS), f("intermediate_size")
        return E, k, swiglu(I) + 2 * I + D, 0, D * E + E, None
    if mt == "qwen2_moe":                                      # the shared expert's gate, Linear(D, 1), is
        E, Is = f(NUM_EXPERTS), f("shared_expert_intermediate_size")   # built even when its width Is is 0
        return E, k, swiglu(f("moe_intermediate_size")), swiglu(Is) + D, D * E, f("intermediate_size")
    if mt == "qwen3_moe":
        E = f(NUM_EXPERTS)
        return E, k, swiglu(f("moe_intermediate_size")), 0, D * E, f("intermediate_size")
    if mt == "llama4_text":
        E, I = f(NUM_EXPERTS), f("intermediate_size")
        return E, k, swiglu(I), swiglu(I), D * E, f("intermediate_size_mlp")
    E, I = f(NUM_EXPERTS), f("moe_intermediate_size")          # deepseek_v2, deepseek_v3, glm4_moe
    return E, k, swiglu(I), swiglu(I * f("n_shared_experts", 0)), D * E, f("intermediate_size")


def count_hf_parameters(cfg):
    """Analytic count for a Hugging Face config.json dict of one of HF_FAMILIES."""
    mt = cfg.get("model_type")
    if mt not in HF_FAMILIES:
        raise ValueError(f"model_type {mt!r} is not supported; supported: {HF_FAMILIES}")
    f = lambda key, default=REQUIRED: _field(cfg, key, default)
    V, D, L, nh = f("vocab_size"), f("hidden_size"), f("num_hidden_layers"), f("num_attention_heads")
    nkv = f("num_key_value_heads", None) or nh
    hd = f("head_dim", None) or D // nh
    tied = f("tie_word_embeddings")
    attention, attention_norms = _hf_attention(cfg, D, nh, nkv, hd)
    moe = _hf_moe_layers(cfg, L)
    E, k, per_expert, shared, router, dense_width = _hf_experts(cfg, D)
    n_dense = L - len(moe)
    if n_dense and dense_width is None:
        raise ValueError(f"{mt}: dense layers need an intermediate size")
    total = dict.fromkeys(COMPONENTS, 0)
    total.update(embedding=V * D, lm_head=0 if tied else D * V, attention=L * attention,
                 norms=L * (2 * D + attention_norms) + D, dense_ffn=n_dense * 3 * D * (dense_width or 0),
                 routed_experts=len(moe) * E * per_expert, shared_experts=len(moe) * shared,
                 router=len(moe) * router)
    active = {**total, "routed_experts": len(moe) * k * per_expert}
    return _result(total, active)


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


# ----------------------------------------------------------------------------------------------
# Which tokens each attention layer of a Hugging Face config keeps, as transformers decides it.

ATTENTION_KINDS = ("full_attention", "sliding_attention", "chunked_attention")
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")


def _sliding_window(cfg):
    """The sliding window in tokens, or None, as the family's transformers config resolves it."""
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: _field(cfg, key, default)
    if mt in ("qwen2_moe", "qwen3_moe"):                     # the window applies only when switched on
        return f("sliding_window", 4096) if f("use_sliding_window", False) else None
    return f("sliding_window", 128 if mt == "gpt_oss" else None)


def _chunk_size(cfg):
    """Llama 4's attention_chunk_size in tokens (transformers' default 8192), or None."""
    return _field(cfg, "attention_chunk_size", 8192 if cfg["model_type"] == "llama4_text" else None)


def _default_layer_types(cfg, L):
    """The layer_types a family's transformers config fills in when config.json has none."""
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: _field(cfg, key, default)
    if mt == "gpt_oss":                                        # layers 0, 2, 4, ... slide, the others see all
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
    if mt == "qwen2_moe":                                      # even layers below max_window_layers slide
        on, below = f("use_sliding_window", False), f("max_window_layers", 28)
        return ["sliding_attention" if on and i % 2 == 0 and i < below else "full_attention" for i in range(L)]
    if mt == "llama4_text":
        # no_rope_layers[i] == 1 means layer i DOES use RoPE (transformers' name); those layers attend
        # within chunks of attention_chunk_size tokens, the NoPE layers (every 4th by default) see all.
        interval = f("no_rope_layer_interval", 4)
        uses_rope = f("no_rope_layers", None) or [int((i + 1) % interval != 0) for i in range(L)]
        chunked = _chunk_size(cfg) is not None
        return ["chunked_attention" if rope and chunked else "full_attention" for rope in uses_rope]
    if mt in ("mixtral", "qwen3_moe") and _sliding_window(cfg) is not None:   # Mistral-style: all slide
        return ["sliding_attention"] * L
    return ["full_attention"] * L


def attention_layer_types(config):
    """Kind of attention of each layer of a Hugging Face config dict: a list of num_hidden_layers
    names from ATTENTION_KINDS. config.json's layer_types when it has them, otherwise what the
    family's transformers config class fills in."""
    L = _field(config, "num_hidden_layers")
    types = _field(config, "layer_types", None) or _default_layer_types(config, L)
    if len(types) != L:
        raise ValueError(f"layer_types has {len(types)} entries but num_hidden_layers is {L}")
    unknown = sorted(set(types) - set(ATTENTION_KINDS))
    if unknown:
        raise ValueError(f"layer_types holds {unknown}; supported: {ATTENTION_KINDS}")
    return list(types)


def cached_tokens_per_layer(config, context_length):
    """Tokens whose keys and values each layer keeps after reading context_length tokens: a list
    of num_hidden_layers ints.

    full_attention keeps every token. A sliding_attention layer with window W lets a token see
    itself and the W - 1 tokens before it, so it keeps the last W - 1. A chunked_attention layer
    (Llama 4) lets a token see only the earlier tokens of its own chunk of attention_chunk_size = C
    tokens, at most C - 1; it keeps the last C - 1, like a window of C. This is what transformers'
    DynamicCache holds after a prefill; a preallocated ring buffer (transformers' StaticCache,
    serving engines) reserves one more slot per layer, for the incoming token.
    """
    spans = {"sliding_attention": ("sliding_window", _sliding_window(config)),
             "chunked_attention": ("attention_chunk_size", _chunk_size(config))}
    tokens = []
    for kind in attention_layer_types(config):
        if kind == "full_attention":
            tokens.append(context_length)
            continue
        name, span = spans[kind]
        if not isinstance(span, int) or span < 2:
            raise ValueError(f"{config['model_type']} has {kind} layers, so {name} must be an int >= 2, got {span!r}")
        tokens.append(min(context_length, span - 1))
    return tokens


def kv_cache_bytes(config, context_length, batch_size=1, dtype="bfloat16"):
    """Memory of the attention cache for batch_size sequences of context_length tokens.

    Standard attention caches K and V: 2 * n_kv_heads * head_dim values per token and layer, for
    the tokens cached_tokens_per_layer gives (fewer in sliding-window and chunked layers).
    DeepSeek's multi-head latent attention (MLA) caches one compressed latent and the shared rotary
    key instead: kv_lora_rank + qk_rope_head_dim values per token and layer. That is what serving
    engines (vLLM, SGLang) store, and what recent transformers caches; transformers 5.0 cached the
    keys and values expanded per head, n_heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim)
    values. MoE layers change none of this.
    """
    per_value = weight_bytes(1, dtype)
    if "model_type" not in config:                             # a course config: full multi-head attention
        cfg = validate_gpt_config(config, extra_optional=MOE_OPTIONAL_KEYS)
        return batch_size * context_length * cfg["n_layers"] * 2 * cfg["emb_dim"] * per_value
    f = lambda key, default=REQUIRED: _field(config, key, default)
    if config["model_type"] in MLA_FAMILIES:
        per_token_layer = f("kv_lora_rank") + f("qk_rope_head_dim")
        return batch_size * context_length * f("num_hidden_layers") * per_token_layer * per_value
    nh = f("num_attention_heads")
    nkv = f("num_key_value_heads", None) or nh
    hd = f("head_dim", None) or f("hidden_size") // nh
    return batch_size * sum(cached_tokens_per_layer(config, context_length)) * 2 * nkv * hd * per_value


def load_model_config(name):
    """A real model's config.json fields shipped in utils/assets/model_configs (e.g. "deepseek-v3")."""
    path = MODEL_CONFIGS / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_CONFIGS.glob("*.json") if p.stem != "published")
        raise ValueError(f"no model config {name!r}; available: {known}")
    return json.loads(path.read_text())


def published_comparison(name):
    """(our total, published total, our active under the publisher's convention, published active)."""
    c = count_parameters(load_model_config(name))
    pub = load_model_config("published")[name]
    active = c["active"] - sum(c["active_components"].get(k, 0) for k in PUBLISHED_ACTIVE_EXCLUDES.get(name, ()))
    return c["total"], pub["published_total"], active, pub["published_active"]
