"""What a Hugging Face config.json says, read family by family the way `transformers` reads it.

A config.json names its architecture in "model_type", and each family spells the same idea its own
way (num_local_experts, n_routed_experts, ...) and has its own defaults. Each rule is read here,
once, for the modules that need it: utils/hf_params.py (parameter counts), utils/memory.py (what a
server caches), utils/hf_to_course.py (the course's config keys, for the loader of
utils/checkpoints.py) and utils/serving.py.

- families:      HF_FAMILIES, ALIASES, text_config (the language model's config), field
- layer kinds:   num_layers, nemotron_layers, attention_layer_types (full, sliding or chunked
                 attention, linear attention, ...)
- family rules:  attention_heads, attention_biases, qk_norm, sliding_window, attention_chunk_size,
                 ties_word_embeddings, router_aux_loss_coef, dense_mlp_width
- MoE layers:    moe_layer_indices (the layers that route), qwen_moe_layout, expert_hidden,
                 moe_layer_shape
- state sizes:   mamba_sizes (Nemotron-H's Mamba-2), deltanet_sizes (Qwen3-Next's Gated DeltaNet)

Functions that take `config` accept a raw config.json dict (text_config is applied); those that
take `cfg` expect one that text_config has already resolved.
"""
from .config import is_moe_block

HF_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
               "gpt_oss", "llama4_text", "granitemoe", "minimax_m2", "ernie4_5_moe", "qwen3_next", "nemotron_h")
# config.json model_types that are one of the families above under another name.
ALIASES = {"kimi_k2": "deepseek_v3"}              # Kimi K2 ships DeepSeek-V3's architecture and code
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")     # multi-head latent attention
REQUIRED = object()

# The names one field goes by in different families.
NUM_EXPERTS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
TOP_K = ("num_experts_per_tok", "moe_k")
# Families whose routed experts are intermediate_size wide (the others: moe_intermediate_size).
FULL_WIDTH_EXPERTS = ("mixtral", "olmoe", "granitemoe", "minimax_m2", "llama4_text", "gpt_oss")

ATTENTION_KINDS = ("full_attention", "sliding_attention", "chunked_attention")
# Layers that keep no keys and values: a linear attention or Mamba-2 layer keeps a fixed-size state,
# Nemotron-H's MoE and MLP layers keep nothing.
STATEFUL_KINDS = ("linear_attention",)
STATELESS_KINDS = ("moe", "mlp")
NEMOTRON_LAYERS = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
# Older names of layer kinds that config.json files still use (transformers renames them on load).
LEGACY_LAYER_KINDS = {"mamba": "linear_attention", "attention": "full_attention"}


def field(cfg, key, default=REQUIRED):
    """cfg[key]; `key` may be a tuple of names the same field goes by (config.json files and
    transformers' to_dict() do not always agree), the first present one wins. Without a default,
    a missing field is a ValueError that names it."""
    names = key if isinstance(key, tuple) else (key,)
    for name in names:
        if name in cfg:
            return cfg[name]
    if default is REQUIRED:
        missing = f"no {key!r}" if len(names) == 1 else f"none of the fields {names}"
        raise ValueError(f"config.json of a {cfg['model_type']} model has {missing}")
    return default


def text_config(config):
    """The language model's config: Llama 4's config.json nests it under text_config, and Kimi K2
    names DeepSeek-V3's architecture "kimi_k2". Raises a ValueError for an unsupported model_type."""
    if config.get("model_type") == "llama4" and "text_config" in config:   # transformers' Llama4ForCausalLM
        config = {"model_type": "llama4_text", **config["text_config"]}       # reads only the text_config
    mt = ALIASES.get(config.get("model_type"), config.get("model_type"))
    if mt not in HF_FAMILIES:
        raise ValueError(f"model_type {config.get('model_type')!r} is not supported; supported: "
                         f"{HF_FAMILIES + tuple(ALIASES)} (and llama4 with a text_config)")
    return {**config, "model_type": mt}


# ----------------------------------------------------------------------------------------------
# Layer kinds.

def nemotron_layers(cfg, key="layers_block_type", pattern_key="hybrid_override_pattern"):
    """Nemotron-H's layer kinds (a list of NEMOTRON_LAYERS values), from the list config.json or
    transformers writes under `key`, or else from the one-letter pattern under `pattern_key`."""
    if key in cfg:
        kinds = [LEGACY_LAYER_KINDS.get(kind, kind) for kind in cfg[key]]
        unknown = sorted(set(kinds) - set(NEMOTRON_LAYERS.values()))
        if unknown:
            raise ValueError(f"{key} holds {unknown}; allowed: {tuple(NEMOTRON_LAYERS.values())}")
        return kinds
    pattern = field(cfg, pattern_key)
    unknown = sorted(set(pattern) - set(NEMOTRON_LAYERS))
    if unknown:
        raise ValueError(f"{pattern_key} holds {unknown}; allowed: {tuple(NEMOTRON_LAYERS)}")
    return [NEMOTRON_LAYERS[c] for c in pattern]


def num_layers(cfg):
    """Number of decoder layers (Nemotron-H: the length of its layer pattern)."""
    if cfg["model_type"] == "nemotron_h":
        return len(nemotron_layers(cfg))
    return field(cfg, "num_hidden_layers")


def _default_layer_types(cfg, L):
    """The layer_types a family's transformers config fills in when config.json has none."""
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: field(cfg, key, default)
    if mt == "gpt_oss":                                        # layers 0, 2, 4, ... slide, the others see all
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
    if mt == "qwen2_moe":                                      # even layers below max_window_layers slide
        on, below = f("use_sliding_window", False), f("max_window_layers", 28)
        return ["sliding_attention" if on and i % 2 == 0 and i < below else "full_attention" for i in range(L)]
    if mt == "qwen3_next":                                     # every full_attention_interval-th layer attends
        interval = f("full_attention_interval", 4)
        return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(L)]
    if mt == "nemotron_h":
        return nemotron_layers(cfg)
    if mt == "llama4_text":
        # no_rope_layers[i] == 1 means layer i DOES use RoPE (transformers' name); those layers attend
        # within chunks of attention_chunk_size tokens, the NoPE layers (every 4th by default) see all.
        interval = f("no_rope_layer_interval", 4)
        uses_rope = f("no_rope_layers", None) or [int((i + 1) % interval != 0) for i in range(L)]
        chunked = attention_chunk_size(cfg) is not None
        return ["chunked_attention" if rope and chunked else "full_attention" for rope in uses_rope]
    if mt in ("mixtral", "qwen3_moe") and sliding_window(cfg) is not None:    # Mistral-style: all slide
        return ["sliding_attention"] * L
    return ["full_attention"] * L


def attention_layer_types(config):
    """Kind of each layer of a Hugging Face config dict, as transformers names it: a list of
    num_hidden_layers names from ATTENTION_KINDS, and for the hybrids "linear_attention" (Mamba-2,
    Gated DeltaNet) and, in Nemotron-H, "moe" and "mlp" (layers without a token mixer).
    config.json's layer_types when it has them, otherwise what the family's config class fills in."""
    cfg = text_config(config)
    L = num_layers(cfg)
    types = field(cfg, "layer_types", None) or _default_layer_types(cfg, L)
    types = [LEGACY_LAYER_KINDS.get(kind, kind) for kind in types]
    if len(types) != L:
        raise ValueError(f"layer_types has {len(types)} entries but num_hidden_layers is {L}")
    allowed = ATTENTION_KINDS + {"qwen3_next": STATEFUL_KINDS,
                                 "nemotron_h": STATEFUL_KINDS + STATELESS_KINDS}.get(cfg["model_type"], ())
    unknown = sorted(set(types) - set(allowed))
    if unknown:
        raise ValueError(f"layer_types holds {unknown}; supported for {cfg['model_type']}: {allowed}")
    return list(types)


# ----------------------------------------------------------------------------------------------
# Family rules: attention, embeddings, the balancing loss, dense MLPs.

def attention_heads(cfg):
    """(query heads, key/value heads, head_dim) of a family's attention. num_key_value_heads
    defaults to num_attention_heads (no grouped-query attention), head_dim to hidden_size // heads."""
    nh = field(cfg, "num_attention_heads")
    nkv = field(cfg, "num_key_value_heads", None) or nh
    hd = field(cfg, "head_dim", None) or field(cfg, "hidden_size") // nh
    return nh, nkv, hd


def attention_biases(cfg):
    """(biases on the q, k, v projections, bias on the output projection) of a family's attention,
    each the config's value (True/False) as transformers builds the layers."""
    mt = cfg["model_type"]
    if mt == "qwen2_moe":                       # q, k, v biased unless qkv_bias says otherwise; o never
        return field(cfg, "qkv_bias", True), False
    if mt == "glm4_moe":                        # attention_bias reaches q, k and v only
        return field(cfg, "attention_bias", False), False
    if mt == "ernie4_5_moe":
        bias = field(cfg, "use_bias", False)
        return bias, bias
    if mt in ("nemotron_h", "minimax_m2"):      # built without biases
        return False, False
    bias = field(cfg, "attention_bias", False)
    return bias, bias


def qk_norm(cfg):
    """How a family normalises queries and keys before attention, in the course's qk_norm values:
    None; "head" (one RMSNorm of head_dim weights, applied to every head: Qwen3, GLM-4.5 with
    use_qk_norm); "full" (one RMSNorm over all heads' values at once: OLMoE, MiniMax-M2)."""
    mt = cfg["model_type"]
    if mt in ("qwen3_moe", "qwen3_next") or (mt == "glm4_moe" and field(cfg, "use_qk_norm", False)):
        return "head"
    if mt in ("olmoe", "minimax_m2"):
        return "full"
    return None


def sliding_window(cfg):
    """The sliding window in tokens, or None, as the family's transformers config resolves it."""
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: field(cfg, key, default)
    if mt in ("qwen2_moe", "qwen3_moe"):                       # the window applies only when switched on
        return f("sliding_window", 4096) if f("use_sliding_window", False) else None
    return f("sliding_window", 128 if mt == "gpt_oss" else None)


def attention_chunk_size(cfg):
    """Llama 4's attention_chunk_size in tokens (transformers' default 8192), or None."""
    return field(cfg, "attention_chunk_size", 8192 if cfg["model_type"] == "llama4_text" else None)


def ties_word_embeddings(config):
    """Whether transformers' model of a config.json dict uses the input embedding matrix as the
    output head's weight (tie_word_embeddings, with the family's default). The head may still hold
    parameters of its own: ERNIE 4.5 with use_bias keeps a bias of vocab_size values in lm_head."""
    cfg = text_config(config)
    mt = cfg["model_type"]
    # transformers' Nemotron-H never ties its output head to the embedding, whatever the config says.
    return bool(field(cfg, "tie_word_embeddings", mt == "ernie4_5_moe")) and mt != "nemotron_h"


def router_aux_loss_coef(cfg):
    """The coefficient of the load-balancing loss a config declares: router_aux_loss_coef, or
    DeepSeek's aux_loss_alpha; None when it has neither."""
    return cfg.get("router_aux_loss_coef", cfg.get("aux_loss_alpha"))


def dense_mlp_width(cfg, default=REQUIRED):
    """Hidden width of the dense MLP of the layers that do not route (Llama 4: intermediate_size_mlp;
    the others: intermediate_size)."""
    return field(cfg, "intermediate_size_mlp" if cfg["model_type"] == "llama4_text" else "intermediate_size", default)


# ----------------------------------------------------------------------------------------------
# MoE layers.

def qwen_moe_layout(cfg):
    """Which layers of a Qwen-MoE family (Qwen2-MoE, Qwen3-MoE, Qwen3-Next) route, in the course's
    config keys: every decoder_sparse_step-th layer (moe_every_n_layers) that is not one of
    mlp_only_layers (dense_layers); utils.config.is_moe_block reads them."""
    return {"moe_every_n_layers": field(cfg, "decoder_sparse_step", 1),
            "dense_layers": tuple(field(cfg, "mlp_only_layers", []) or ())}


def moe_layer_indices(config):
    """Indices of the layers whose feed-forward is an MoE, as transformers builds the model."""
    cfg = text_config(config)
    mt, f, L = cfg["model_type"], lambda key, default=REQUIRED: field(cfg, key, default), num_layers(cfg)
    if mt in ("qwen2_moe", "qwen3_moe", "qwen3_next"):
        keys = {"num_experts": f(NUM_EXPERTS), **qwen_moe_layout(cfg)}
        return [i for i in range(L) if is_moe_block(keys, i)]
    if mt in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        return list(range(f("first_k_dense_replace"), L))
    if mt == "llama4_text":
        explicit = f("moe_layers", None)
        step = f("interleave_moe_layer_step", 1)
        return list(explicit) if explicit is not None else list(range(step - 1, L, step))
    if mt == "ernie4_5_moe":
        start, end, step = f("moe_layer_start_index", 1), f("moe_layer_end_index", -1), f("moe_layer_interval", 1)
        end = L - 1 if end == -1 else end
        return [i for i in range(L) if (i + 1) % step == 0 and start <= i <= end]
    if mt == "nemotron_h":
        return [i for i, kind in enumerate(nemotron_layers(cfg)) if kind == "moe"]
    return list(range(L))                                       # every layer


def expert_hidden(cfg):
    """Hidden width of one routed expert."""
    return field(cfg, "intermediate_size" if cfg["model_type"] in FULL_WIDTH_EXPERTS else "moe_intermediate_size")


def moe_layer_shape(config):
    """The MoE layers of a Hugging Face config at a glance: hidden_size, num_experts, top_k,
    expert_hidden (each routed expert's width), dispatch_width (the width of the vector a token
    sends to each chosen expert: moe_latent_size in a latent MoE, hidden_size otherwise) and
    moe_layers (how many layers are MoE)."""
    cfg = text_config(config)
    D = field(cfg, "hidden_size")
    return {"hidden_size": D, "num_experts": field(cfg, NUM_EXPERTS), "top_k": field(cfg, TOP_K),
            "expert_hidden": expert_hidden(cfg), "dispatch_width": field(cfg, "moe_latent_size", None) or D,
            "moe_layers": len(moe_layer_indices(cfg))}


# ----------------------------------------------------------------------------------------------
# Sizes of the recurrent mixers of the hybrids.

def mamba_sizes(cfg):
    """(heads, inner width, channels convolved, conv kernel) of a Nemotron-H Mamba-2 mixer."""
    f = lambda key: field(cfg, key)
    H, inner = f("mamba_num_heads"), f("mamba_num_heads") * f("mamba_head_dim")
    return H, inner, inner + 2 * f("n_groups") * f("ssm_state_size"), f("conv_kernel")


def deltanet_sizes(cfg):
    """(key width, value width, value heads, key head dim, value head dim, conv kernel) of a Gated
    DeltaNet (Qwen3-Next)."""
    f = lambda key: field(cfg, key)
    nv, dk, dv = f("linear_num_value_heads"), f("linear_key_head_dim"), f("linear_value_head_dim")
    return f("linear_num_key_heads") * dk, nv * dv, nv, dk, dv, f("linear_conv_kernel_dim")
