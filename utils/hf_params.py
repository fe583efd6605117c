"""Real models from their Hugging Face config.json: parameters, and what a server caches per sequence.

`count_hf_parameters(config)` counts, analytically, every parameter `transformers` builds for a
config.json dict (the tests compare it with transformers' models instantiated on the meta device).
It returns the same dict as `utils.params.count_parameters`, and, under "mtp", the parameters of
multi-token-prediction layers that a config describes but transformers does not build (publishers
leave them out of their totals too).

The families fall into three kinds of layer stacks:
- every layer has attention and a feed-forward (MoE or dense): Mixtral, Qwen2/3-MoE, OLMoE,
  DeepSeek-V2/V3 (and Kimi K2, a DeepSeek-V3 config), GLM-4.5, gpt-oss, Llama 4, Granite MoE,
  MiniMax-M2, ERNIE 4.5;
- Qwen3-Next: the same, but three layers in four replace attention with Gated DeltaNet, a linear
  attention whose memory is a fixed-size state;
- Nemotron-H (Nemotron 3 Nano and Super): each layer is ONE of Mamba-2 mixer (M), attention (*),
  MoE (E) or dense MLP (-), in the order hybrid_override_pattern gives; Super's experts work in a
  latent space (LatentMoE) and use relu^2 instead of a gated MLP.

`attention_layer_types`, `cached_tokens_per_layer`, `kv_cache_values` and `recurrent_state_values`
say what each layer keeps while serving: keys and values for attention layers (fewer in sliding-window
and chunked layers), a fixed-size state for Mamba-2 and Gated DeltaNet layers.
"""
HF_COMPONENTS = ("embedding", "attention", "recurrent", "dense_ffn", "routed_experts", "shared_experts",
                 "router", "latent_proj", "norms", "lm_head")
HF_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
               "gpt_oss", "llama4_text", "granitemoe", "minimax_m2", "ernie4_5_moe", "qwen3_next", "nemotron_h")
# config.json model_types that are one of the families above under another name.
ALIASES = {"kimi_k2": "deepseek_v3"}              # Kimi K2 ships DeepSeek-V3's architecture and code
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")
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


NUM_EXPERTS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
TOP_K = ("num_experts_per_tok", "moe_k")
NEMOTRON_LAYERS = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
# Older names of layer kinds that config.json files still use (transformers renames them on load).
LEGACY_LAYER_KINDS = {"mamba": "linear_attention", "attention": "full_attention"}


def _nemotron_layers(cfg, key="layers_block_type", pattern_key="hybrid_override_pattern"):
    """Nemotron-H's layer kinds, from the list config.json or transformers writes, or the pattern."""
    if key in cfg:
        kinds = [LEGACY_LAYER_KINDS.get(kind, kind) for kind in cfg[key]]
        unknown = sorted(set(kinds) - set(NEMOTRON_LAYERS.values()))
        if unknown:
            raise ValueError(f"{key} holds {unknown}; allowed: {tuple(NEMOTRON_LAYERS.values())}")
        return kinds
    pattern = _field(cfg, pattern_key)
    unknown = sorted(set(pattern) - set(NEMOTRON_LAYERS))
    if unknown:
        raise ValueError(f"{pattern_key} holds {unknown}; allowed: {tuple(NEMOTRON_LAYERS)}")
    return [NEMOTRON_LAYERS[c] for c in pattern]


def _num_layers(cfg):
    if cfg["model_type"] == "nemotron_h":
        return len(_nemotron_layers(cfg))
    return _field(cfg, "num_hidden_layers")


# ----------------------------------------------------------------------------------------------
# What one layer of each kind holds.

def _attention(cfg):
    """(attention weights, attention-internal norm weights) of one attention layer."""
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: _field(cfg, key, default)
    D, nh = f("hidden_size"), f("num_attention_heads")
    nkv = f("num_key_value_heads", None) or nh
    hd = f("head_dim", None) or D // nh
    if mt in MLA_FAMILIES:                                     # multi-head latent attention (MLA)
        nope, rope, v, kv_rank = f("qk_nope_head_dim"), f("qk_rope_head_dim"), f("v_head_dim"), f("kv_lora_rank")
        q_rank, bias = f("q_lora_rank", None), f("attention_bias", False)
        q = D * nh * (nope + rope) if q_rank is None else D * q_rank + bias * q_rank + q_rank * nh * (nope + rope)
        kv = D * (kv_rank + rope) + bias * (kv_rank + rope) + kv_rank * nh * (nope + v)
        return q + kv + nh * v * D + bias * D, kv_rank + (q_rank or 0)
    q_heads = 2 * nh if mt == "qwen3_next" else nh              # Qwen3-Next's query also yields an output gate
    weights = D * q_heads * hd + 2 * D * nkv * hd + nh * hd * D
    if mt == "qwen2_moe":
        biases = f("qkv_bias", True) * (nh + 2 * nkv) * hd
    elif mt == "glm4_moe":
        biases = f("attention_bias", False) * (nh + 2 * nkv) * hd
    elif mt == "ernie4_5_moe":
        biases = f("use_bias", False) * ((nh + 2 * nkv) * hd + D)
    elif mt in ("nemotron_h", "minimax_m2"):                    # built without biases
        biases = 0
    else:
        biases = f("attention_bias", False) * ((q_heads + 2 * nkv) * hd + D)
    sinks = nh if mt == "gpt_oss" else 0                        # one learned attention sink per head
    qk_norms = {"qwen3_moe": 2 * hd, "qwen3_next": 2 * hd, "olmoe": (nh + nkv) * hd,
                "minimax_m2": (nh + nkv) * hd, "glm4_moe": 2 * hd * bool(f("use_qk_norm", False))}.get(mt, 0)
    return weights + biases + sinks, qk_norms


def _recurrent(cfg):
    """(mixer weights, its gated-norm weights) of one Mamba-2 (Nemotron-H) or Gated DeltaNet
    (Qwen3-Next) layer."""
    f = lambda key, default=REQUIRED: _field(cfg, key, default)
    D = f("hidden_size")
    if cfg["model_type"] == "nemotron_h":                       # Mamba-2
        H, inner, conv_dim, K = _mamba_sizes(cfg)
        projection = inner + conv_dim + H                       # z (gate), x B C (convolved), dt per head
        bias = f("use_bias", False)
        weights = (D * projection + bias * projection + conv_dim * K + f("use_conv_bias", True) * conv_dim
                   + 3 * H + inner * D + bias * D)              # dt_bias, A_log, D per head; out_proj
        return weights, inner
    key_dim, value_dim, nv, _, dv, K = _deltanet_sizes(cfg)     # Gated DeltaNet
    conv_dim = 2 * key_dim + value_dim
    weights = D * (2 * key_dim + 2 * value_dim) + D * 2 * nv + conv_dim * K + 2 * nv + value_dim * D
    return weights, dv


def _mamba_sizes(cfg):
    """(heads, inner width, channels convolved, conv kernel) of a Nemotron-H Mamba-2 mixer."""
    f = lambda key: _field(cfg, key)
    H, inner = f("mamba_num_heads"), f("mamba_num_heads") * f("mamba_head_dim")
    return H, inner, inner + 2 * f("n_groups") * f("ssm_state_size"), f("conv_kernel")


def _deltanet_sizes(cfg):
    """(key width, value width, value heads, key head dim, value head dim, conv kernel) of a Gated
    DeltaNet (Qwen3-Next)."""
    f = lambda key: _field(cfg, key)
    nv, dk, dv = f("linear_num_value_heads"), f("linear_key_head_dim"), f("linear_value_head_dim")
    return f("linear_num_key_heads") * dk, nv * dv, nv, dk, dv, f("linear_conv_kernel_dim")


def _mlp(cfg, width, dim=None):
    """Parameters of one MLP (a dense layer or a shared expert) of `width` hidden units."""
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: _field(cfg, key, default)
    D = dim or f("hidden_size")
    if mt == "nemotron_h":                                      # relu^2: up and down, no gate
        return 2 * D * width + f("mlp_bias", False) * (width + D)
    bias = f("use_bias", False) if mt == "ernie4_5_moe" else False
    return 3 * D * width + bias * (2 * width + D)


def _experts(cfg):
    """(E, k, parameters of one routed expert, shared-expert parameters, router parameters,
    latent projections) of one MoE layer."""
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: _field(cfg, key, default)
    D, E, k = f("hidden_size"), f(NUM_EXPERTS), f(TOP_K)
    router = D * E
    if mt in ("mixtral", "olmoe", "granitemoe", "minimax_m2", "llama4_text", "gpt_oss"):
        I = f("intermediate_size")
        expert = _mlp(cfg, I)
        shared = _mlp(cfg, I) if mt == "llama4_text" else 0
        if mt == "gpt_oss":                                     # experts and router have biases
            expert, router = expert + 2 * I + D, router + E
        return E, k, expert, shared, router, 0
    if mt in ("qwen2_moe", "qwen3_next"):                       # a gated shared expert: its gate, Linear(D, 1),
        shared = _mlp(cfg, f("shared_expert_intermediate_size")) + D   # is built even for width 0
        return E, k, _mlp(cfg, f("moe_intermediate_size")), shared, router, 0
    if mt == "qwen3_moe":
        return E, k, _mlp(cfg, f("moe_intermediate_size")), 0, router, 0
    if mt == "ernie4_5_moe":                                    # the selection bias is a (frozen) parameter here
        n_shared = f("moe_num_shared_experts", 0)
        shared = _mlp(cfg, f("moe_intermediate_size") * n_shared) if n_shared else 0
        return E, k, 3 * D * f("moe_intermediate_size"), shared, router + E, 0
    if mt == "nemotron_h":                                      # relu^2 experts, in a latent space when
        latent = f("moe_latent_size", None)                     # moe_latent_size is set (LatentMoE)
        expert = 2 * (latent or D) * f("moe_intermediate_size")
        projections = 2 * D * latent + f("mlp_bias", False) * (latent + D) if latent else 0
        return E, k, expert, _mlp(cfg, f("moe_shared_expert_intermediate_size")), router, projections
    shared = f("n_shared_experts", 0) * f("moe_intermediate_size")   # deepseek_v2, deepseek_v3, glm4_moe
    return E, k, _mlp(cfg, f("moe_intermediate_size")), _mlp(cfg, shared), router, 0


def _moe_layers(cfg, L):
    """Indices of the layers whose feed-forward is an MoE."""
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: _field(cfg, key, default)
    if mt in ("qwen2_moe", "qwen3_moe", "qwen3_next"):
        step, dense_only = f("decoder_sparse_step", 1), set(f("mlp_only_layers", []) or [])
        return [i for i in range(L) if i not in dense_only and f(NUM_EXPERTS) > 0 and (i + 1) % step == 0]
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
        return [i for i, kind in enumerate(_nemotron_layers(cfg)) if kind == "moe"]
    return list(range(L))                                       # every layer


def _dense_width(cfg):
    return _field(cfg, "intermediate_size_mlp" if cfg["model_type"] == "llama4_text" else "intermediate_size")


def moe_layer_shape(config):
    """The MoE layers of a Hugging Face config at a glance: hidden_size, num_experts, top_k,
    expert_hidden (each routed expert's width), dispatch_width (the width of the vector a token
    sends to each chosen expert: moe_latent_size in a latent MoE, hidden_size otherwise) and
    moe_layers (how many layers are MoE)."""
    cfg = text_config(config)
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: _field(cfg, key, default)
    full_width = ("mixtral", "olmoe", "granitemoe", "minimax_m2", "llama4_text", "gpt_oss")
    D = f("hidden_size")
    return {"hidden_size": D, "num_experts": f(NUM_EXPERTS), "top_k": f(TOP_K),
            "expert_hidden": f("intermediate_size" if mt in full_width else "moe_intermediate_size"),
            "dispatch_width": f("moe_latent_size", None) or D, "moe_layers": len(_moe_layers(cfg, _num_layers(cfg)))}


# ----------------------------------------------------------------------------------------------
# The whole model.

def _summary(components, active_components):
    components = {k: v for k, v in components.items() if v}
    active_components = {k: v for k, v in active_components.items() if v}
    return {"total": sum(components.values()), "active": sum(active_components.values()),
            "components": components, "active_components": active_components}


def _nemotron_mtp(cfg, moe_layer, attention, D):
    """Parameters of Nemotron-H's multi-token-prediction layers (num_nextn_predict_layers of them,
    each a short stack in mtp_hybrid_override_pattern order). As vLLM and TensorRT-LLM build them:
    the first layer of a stack normalises the token embedding and the main model's hidden state
    and projects the two, concatenated, back to D (eh_proj); each layer has its norm and mixer;
    the last a final norm. The embedding and output head are the main model's."""
    n = _field(cfg, "num_nextn_predict_layers", 0)
    if not n:
        return 0
    kinds = _nemotron_layers(cfg, "mtp_layers_block_type", "mtp_hybrid_override_pattern")
    mixer = {"full_attention": sum(attention), "moe": moe_layer, "mlp": _mlp(cfg, _dense_width(cfg)),
             "linear_attention": sum(_recurrent(cfg))}
    return n * (2 * D + 2 * D * D + D + sum(D + mixer[kind] for kind in kinds))


def ties_word_embeddings(config):
    """Whether transformers' model of a config.json dict uses the input embedding matrix as the
    output head's weight (tie_word_embeddings, with the family's default). The head may still hold
    parameters of its own: ERNIE 4.5 with use_bias keeps a bias of vocab_size values in lm_head."""
    cfg = text_config(config)
    mt = cfg["model_type"]
    # transformers' Nemotron-H never ties its output head to the embedding, whatever the config says.
    return bool(_field(cfg, "tie_word_embeddings", mt == "ernie4_5_moe")) and mt != "nemotron_h"


def count_hf_parameters(config):
    """Total, active and per-component parameters of a Hugging Face config.json dict, as
    `transformers` builds the model. Active counts k of the E routed experts in each MoE layer
    and everything else in full (input embedding and output head included). "mtp" holds the
    multi-token-prediction parameters outside the total (0 when the config has none)."""
    cfg = text_config(config)
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: _field(cfg, key, default)
    V, D, L = f("vocab_size"), f("hidden_size"), _num_layers(cfg)
    tied = ties_word_embeddings(cfg)
    if mt == "nemotron_h":
        kinds = _nemotron_layers(cfg)
        mixers = ["attention" if k == "full_attention" else "recurrent" if k == "linear_attention" else None
                  for k in kinds]
        ffns = ["moe" if k == "moe" else "dense" if k == "mlp" else None for k in kinds]
        norms_per_layer = D                                     # one pre-norm per layer
    else:
        types = attention_layer_types(cfg) if mt == "qwen3_next" else ["full_attention"] * L
        mixers = ["recurrent" if t == "linear_attention" else "attention" for t in types]
        moe = set(_moe_layers(cfg, L))
        ffns = ["moe" if i in moe else "dense" for i in range(L)]
        norms_per_layer = 2 * D                                 # before the mixer and before the FFN
    attention, attention_norms = _attention(cfg) if "attention" in mixers else (0, 0)
    recurrent, recurrent_norms = _recurrent(cfg) if "recurrent" in mixers else (0, 0)
    n_moe, n_dense = ffns.count("moe"), ffns.count("dense")
    E, k, per_expert, shared, router, latent = _experts(cfg) if n_moe else (0, 0, 0, 0, 0, 0)
    lm_bias = V * f("use_bias", False) if mt == "ernie4_5_moe" else 0
    total = dict.fromkeys(HF_COMPONENTS, 0)
    total.update(embedding=V * D, lm_head=(0 if tied else D * V) + lm_bias,
                 attention=mixers.count("attention") * attention, recurrent=mixers.count("recurrent") * recurrent,
                 norms=L * norms_per_layer + D + mixers.count("attention") * attention_norms
                 + mixers.count("recurrent") * recurrent_norms,
                 dense_ffn=n_dense * _mlp(cfg, _dense_width(cfg)) if n_dense else 0,
                 routed_experts=n_moe * E * per_expert, shared_experts=n_moe * shared, router=n_moe * router,
                 latent_proj=n_moe * latent)
    active = {**total, "routed_experts": n_moe * k * per_expert}
    result = _summary(total, active)
    moe_layer = E * per_expert + shared + router + latent
    result["mtp"] = _nemotron_mtp(cfg, moe_layer, (attention, attention_norms), D) if mt == "nemotron_h" else 0
    return result


# ----------------------------------------------------------------------------------------------
# What each layer keeps while serving, as transformers decides it.

ATTENTION_KINDS = ("full_attention", "sliding_attention", "chunked_attention")
# Layers that keep no keys and values: a linear attention or Mamba-2 layer keeps a fixed-size state,
# Nemotron-H's MoE and MLP layers keep nothing.
STATEFUL_KINDS = ("linear_attention",)
STATELESS_KINDS = ("moe", "mlp")


def _sliding_window(cfg):
    """The sliding window in tokens, or None, as the family's transformers config resolves it."""
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: _field(cfg, key, default)
    if mt in ("qwen2_moe", "qwen3_moe"):                       # the window applies only when switched on
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
    if mt == "qwen3_next":                                     # every full_attention_interval-th layer attends
        interval = f("full_attention_interval", 4)
        return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(L)]
    if mt == "nemotron_h":
        return _nemotron_layers(cfg)
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
    """Kind of each layer of a Hugging Face config dict, as transformers names it: a list of
    num_hidden_layers names from ATTENTION_KINDS, and for the hybrids "linear_attention" (Mamba-2,
    Gated DeltaNet) and, in Nemotron-H, "moe" and "mlp" (layers without a token mixer).
    config.json's layer_types when it has them, otherwise what the family's config class fills in."""
    cfg = text_config(config)
    L = _num_layers(cfg)
    types = _field(cfg, "layer_types", None) or _default_layer_types(cfg, L)
    types = [LEGACY_LAYER_KINDS.get(kind, kind) for kind in types]
    if len(types) != L:
        raise ValueError(f"layer_types has {len(types)} entries but num_hidden_layers is {L}")
    allowed = ATTENTION_KINDS + {"qwen3_next": STATEFUL_KINDS,
                                 "nemotron_h": STATEFUL_KINDS + STATELESS_KINDS}.get(cfg["model_type"], ())
    unknown = sorted(set(types) - set(allowed))
    if unknown:
        raise ValueError(f"layer_types holds {unknown}; supported for {cfg['model_type']}: {allowed}")
    return list(types)


def cached_tokens_per_layer(config, context_length):
    """Tokens whose keys and values each layer keeps after reading context_length tokens: a list
    of num_hidden_layers ints.

    full_attention keeps every token. A sliding_attention layer with window W lets a token see
    itself and the W - 1 tokens before it, so it keeps the last W - 1. A chunked_attention layer
    (Llama 4) lets a token see only the earlier tokens of its own chunk of attention_chunk_size = C
    tokens, at most C - 1; it keeps the last C - 1, like a window of C. This is what transformers'
    DynamicCache holds after a prefill; a preallocated ring buffer (transformers' StaticCache,
    serving engines) reserves one more slot per layer, for the incoming token. Layers without
    attention keep no keys and values (0).
    """
    cfg = text_config(config)
    spans = {"sliding_attention": ("sliding_window", _sliding_window(cfg)),
             "chunked_attention": ("attention_chunk_size", _chunk_size(cfg))}
    tokens = []
    for kind in attention_layer_types(cfg):
        if kind == "full_attention":
            tokens.append(context_length)
            continue
        if kind not in spans:
            tokens.append(0)
            continue
        name, span = spans[kind]
        if not isinstance(span, int) or span < 2:
            raise ValueError(f"{cfg['model_type']} has {kind} layers, so {name} must be an int >= 2, got {span!r}")
        tokens.append(min(context_length, span - 1))
    return tokens


def kv_cache_values(config, context_length, batch_size=1):
    """Numbers the attention cache holds for batch_size sequences of context_length tokens.

    Standard attention caches K and V: 2 * n_kv_heads * head_dim values per token and layer, for
    the tokens cached_tokens_per_layer gives. DeepSeek's multi-head latent attention (MLA) caches
    one compressed latent and the shared rotary key instead: kv_lora_rank + qk_rope_head_dim values
    per token and layer. That is what serving engines (vLLM, SGLang) store, and what recent
    transformers caches; transformers 5.0 cached the keys and values expanded per head,
    n_heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) values. MoE layers change none of this.
    """
    cfg = text_config(config)
    f = lambda key, default=REQUIRED: _field(cfg, key, default)
    if cfg["model_type"] in MLA_FAMILIES:
        return batch_size * context_length * f("num_hidden_layers") * (f("kv_lora_rank") + f("qk_rope_head_dim"))
    nh = f("num_attention_heads")
    nkv = f("num_key_value_heads", None) or nh
    hd = f("head_dim", None) or f("hidden_size") // nh
    return batch_size * sum(cached_tokens_per_layer(cfg, context_length)) * 2 * nkv * hd


def recurrent_state_values(config, batch_size=1):
    """Numbers the Mamba-2 and Gated DeltaNet layers keep per batch of sequences, whatever the context
    length: each layer's recurrent state plus the last inputs of its short causal convolution
    (conv_kernel of them, the size transformers' cache allocates). 0 for models without such layers.

    Mamba-2 (Nemotron-H): a state of ssm_state_size values for each of the mamba_num_heads *
    mamba_head_dim channels. Gated DeltaNet (Qwen3-Next): a key_dim x value_dim matrix per value head.
    """
    cfg = text_config(config)
    n_layers = attention_layer_types(cfg).count("linear_attention")
    if not n_layers:
        return 0
    if cfg["model_type"] == "nemotron_h":
        H, inner, conv_dim, K = _mamba_sizes(cfg)
        state = inner * _field(cfg, "ssm_state_size")
    else:
        key_dim, value_dim, nv, dk, dv, K = _deltanet_sizes(cfg)
        conv_dim, state = 2 * key_dim + value_dim, nv * dk * dv
    return batch_size * n_layers * (state + conv_dim * K)


# ----------------------------------------------------------------------------------------------
# A real model's MoE layer in the course's own config keys (the cheat-sheet of notebook 08).

CHEAT_SHEET_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v3", "gpt_oss",
                        "granitemoe", "nemotron_h")


def course_moe_keys(config):
    """The MoE choices of a Hugging Face config.json as the course's config keys (utils/config.py):
    router_type, num_experts, num_experts_per_tok, norm_topk_prob, routed_scaling_factor, n_group,
    topk_group, num_shared_experts, shared_expert_hidden_dim, shared_expert_gate, expert_type and
    latent_dim, plus two that the course names but does not configure this way: "balancing"
    ("auxiliary loss", or "bias" for auxiliary-loss-free balancing, which is how the model's code
    routes: DeepSeek-V3's noaux_tc and Nemotron-H's e_score_correction_bias) and
    "router_aux_loss_coef" (the config's coefficient, None when it has none).

    Each rule follows the family's transformers code: e.g. Mixtral, Granite and gpt-oss take a
    softmax over the k best logits, which equals renormalised top-k (norm_topk_prob True).
    """
    cfg = text_config(config)
    mt, f = cfg["model_type"], lambda key, default=REQUIRED: _field(cfg, key, default)
    if mt not in CHEAT_SHEET_FAMILIES:
        raise ValueError(f"model_type {mt!r} is not in the cheat-sheet; supported: {list(CHEAT_SHEET_FAMILIES)}")
    shape = moe_layer_shape(cfg)
    sigmoid = mt == "nemotron_h" or f("scoring_func", "softmax") == "sigmoid"
    keys = {"router_type": "sigmoid" if sigmoid else "softmax",
            "num_experts": shape["num_experts"], "num_experts_per_tok": shape["top_k"],
            "moe_hidden_dim": shape["expert_hidden"],
            "norm_topk_prob": True if mt in ("mixtral", "granitemoe", "gpt_oss")
            else f("norm_topk_prob", mt in ("deepseek_v3", "nemotron_h")),
            "routed_scaling_factor": f("routed_scaling_factor", 1.0) if mt in ("deepseek_v3", "nemotron_h") else 1.0,
            "n_group": f("n_group", 1) if mt in ("deepseek_v3", "nemotron_h") else 1,
            "topk_group": f("topk_group", 1) if mt in ("deepseek_v3", "nemotron_h") else 1,
            "num_shared_experts": 0, "shared_expert_hidden_dim": None, "shared_expert_gate": False,
            "expert_type": "relu2" if mt == "nemotron_h" else "swiglu",
            "latent_dim": f("moe_latent_size", None) if mt == "nemotron_h" else None}
    if mt in ("qwen2_moe", "qwen3_next") and f("shared_expert_intermediate_size", 0):
        keys.update(num_shared_experts=1, shared_expert_hidden_dim=f("shared_expert_intermediate_size"),
                    shared_expert_gate=True)
    if mt == "deepseek_v3" and f("n_shared_experts", 0):
        keys.update(num_shared_experts=f("n_shared_experts"),
                    shared_expert_hidden_dim=f("n_shared_experts") * f("moe_intermediate_size"))
    if mt == "nemotron_h" and f("n_shared_experts", 0):
        keys.update(num_shared_experts=f("n_shared_experts"),
                    shared_expert_hidden_dim=f("moe_shared_expert_intermediate_size"))
    bias = (mt == "deepseek_v3" and f("topk_method", "noaux_tc") == "noaux_tc") or mt == "nemotron_h"
    keys["balancing"] = "bias" if bias else "auxiliary loss"
    keys["router_aux_loss_coef"] = cfg.get("router_aux_loss_coef", cfg.get("aux_loss_alpha"))
    return keys
