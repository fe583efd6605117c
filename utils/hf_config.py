"""What a Hugging Face config.json says, read family by family the way `transformers` reads it.

A config.json names its architecture in "model_type", and each family spells the same idea its own
way (num_local_experts, n_routed_experts, ...) and has its own defaults. Each rule is read here
(its feed-forward layers: utils/hf_moe.py), once, for the modules that need it: utils/hf_params.py (parameter counts), utils/memory.py (what a
server caches), utils/hf_to_course.py (the course's config keys, for the loader of
utils/checkpoints.py) and utils/serving.py.

- families:      HF_FAMILIES, ALIASES, is_hf_config, text_config (the language model's config),
                 field, quantization_config, quant_method
- layer kinds:   num_layers, nemotron_layers, attention_layer_types (full, sliding or chunked
                 attention, linear attention, ...)
- family rules:  attention_heads, attention_biases, qk_norm, sliding_window, attention_chunk_size,
                 ties_word_embeddings, use_bias
- state sizes:   mamba_sizes (Nemotron-H's Mamba-2), deltanet_sizes (Qwen3-Next's Gated DeltaNet)

Functions that take `config` accept a raw config.json dict (text_config is applied); those that
take `cfg` expect one that text_config has already resolved.
"""
from functools import partial


HF_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
               "gpt_oss", "llama4_text", "granitemoe", "minimax_m2", "ernie4_5_moe", "qwen3_next", "nemotron_h")
# config.json model_types that are one of the families above under another name.
ALIASES = {"kimi_k2": "deepseek_v3"}              # Kimi K2 ships DeepSeek-V3's architecture and code
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")     # multi-head latent attention
REQUIRED = object()

# The names one field goes by in different families.
ATTENTION_KINDS = ("full_attention", "sliding_attention", "chunked_attention")
# Layers that keep no keys and values: a linear attention or Mamba-2 layer keeps a fixed-size state,
# Nemotron-H's MoE and MLP layers keep nothing.
STATEFUL_KINDS = ("linear_attention",)
STATELESS_KINDS = ("moe", "mlp")
NEMOTRON_LAYERS = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
# Older names of layer kinds that config.json files still use (transformers renames them on load).
LEGACY_LAYER_KINDS = {"mamba": "linear_attention", "attention": "full_attention"}


def is_hf_config(config):
    """Whether a config dict is a Hugging Face config.json (it names its "model_type") rather than
    one of the course's configs (utils/config.py)."""
    return "model_type" in config


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


def quantization_config(config):
    """config.json's quantization_config (top level, also for Llama 4): None when the weights are
    stored unquantised (no such field, or null), else a dict ({} when it is not one)."""
    quant = config.get("quantization_config")
    return None if quant is None else quant if isinstance(quant, dict) else {}


def quant_method(config):
    """The method quantization_config names ("fp8": DeepSeek-V3 and Kimi K2; "mxfp4": gpt-oss;
    "gptq", "awq", ...), or None when it names none or there is no quantization_config."""
    return (quantization_config(config) or {}).get("quant_method")


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
    mt, f = cfg["model_type"], partial(field, cfg)
    if mt == "gpt_oss":                                        # layers 0, 2, 4, ... slide, the others see all
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
    if mt == "qwen2_moe":                                      # even layers below max_window_layers slide
        on, below = sliding_window(cfg) is not None, f("max_window_layers", 28)
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
        return use_bias(cfg), use_bias(cfg)
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
    """The sliding window in tokens, or None, as the family's transformers config resolves it.
    Qwen2-MoE and Qwen3-MoE slide only when use_sliding_window (default False) switches the window
    on (sliding_window, default 4096); the others whenever sliding_window is set (gpt-oss: default
    128). Which layers slide is attention_layer_types's rule."""
    mt, f = cfg["model_type"], partial(field, cfg)
    if mt in ("qwen2_moe", "qwen3_moe"):
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


def use_bias(cfg):
    """use_bias (default False) of the two families that have one: ERNIE 4.5 (biases on the
    attention projections, dense MLPs, shared experts and output head; never on routed experts) and
    Nemotron-H (on the Mamba-2 mixer's in and out projections). False for the others."""
    return cfg["model_type"] in ("ernie4_5_moe", "nemotron_h") and field(cfg, "use_bias", False)


# ----------------------------------------------------------------------------------------------
# Sizes of the recurrent mixers of the hybrids.

def mamba_sizes(cfg):
    """(heads, inner width, channels convolved, conv kernel) of a Nemotron-H Mamba-2 mixer."""
    f = partial(field, cfg)
    H, inner = f("mamba_num_heads"), f("mamba_num_heads") * f("mamba_head_dim")
    return H, inner, inner + 2 * f("n_groups") * f("ssm_state_size"), f("conv_kernel")


def deltanet_sizes(cfg):
    """(key width, value width, value heads, key head dim, value head dim, conv kernel) of a Gated
    DeltaNet (Qwen3-Next)."""
    f = partial(field, cfg)
    nv, dk, dv = f("linear_num_value_heads"), f("linear_key_head_dim"), f("linear_value_head_dim")
    return f("linear_num_key_heads") * dk, nv * dv, nv, dk, dv, f("linear_conv_kernel_dim")
