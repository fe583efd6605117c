"""Memory in bytes: the weights, in the formats real models ship them in, and what a server keeps
per sequence besides them (the attention's KV cache, the recurrent state of hybrid models).

- weights: BYTES_PER_VALUE (plain number formats) and WEIGHT_FORMATS (per-component storage
  formats built from them, e.g. DeepSeek-V3's FP8, gpt-oss's MXFP4); weight_bytes,
  stored_weight_bytes, format_of_config
- caches of a Hugging Face config, in numbers stored: cached_tokens_per_layer, kv_cache_values,
  recurrent_state_values; in bytes, for course and Hugging Face configs alike: kv_cache_bytes,
  recurrent_state_bytes, serving_cache_bytes
"""
from .config import validate_model_config
from .dtypes import BYTES_PER_VALUE
from .gpt import kv_cache_shape
from .hf_config import (MLA_FAMILIES, attention_chunk_size, attention_heads, attention_layer_types, deltanet_sizes,
                        field, is_hf_config, mamba_sizes, quant_method, sliding_window, text_config)
from .params import count_parameters
from .quant import E2M1_BITS, E8M0_BITS, FP8_BLOCK, MX_BLOCK

# ----------------------------------------------------------------------------------------------
# Weights.

# Bytes of one value in each plain number format (utils/dtypes.py): every size below is built from it.
_BITS = {dtype: 8 * n for dtype, n in BYTES_PER_VALUE.items()}
# FP8 (e4m3) values with one float32 scale per 128 x 128 block of a linear layer's weight matrix
# (utils.quant.FP8_BLOCK; whole blocks: real models' widths are multiples of 128).
_FP8_LINEAR = _BITS["float8"] + _BITS["float32"] / (FP8_BLOCK[0] * FP8_BLOCK[1])
# MXFP4: 4-bit e2m1 values sharing one 8-bit e8m0 scale per 32 (utils.quant.MX_BLOCK).
_MXFP4 = E2M1_BITS + E8M0_BITS / MX_BLOCK

# Bits per stored weight, per parameter component of utils.params.count_parameters:
# (bits of every component not listed, {component: bits}).
#   "fp8":   8-bit floats with block scales (_FP8_LINEAR) in every linear layer; embeddings, output
#            head, norms and router kept in bfloat16 (DeepSeek-V3, arXiv 2412.19437, section 3.3; its
#            config.json: quant_method "fp8", weight_block_size [128, 128]).
#   "mxfp4": the routed experts' weights in MXFP4 (4.25 bits per parameter), the rest in bfloat16
#            (gpt-oss model card, arXiv 2508.10925; config.json: quant_method "mxfp4"). The experts'
#            small bias vectors are counted at 4.25 bits too.
WEIGHT_FORMATS = {
    "float32": (_BITS["float32"], {}),
    "bfloat16": (_BITS["bfloat16"], {}),
    "fp8": (_BITS["bfloat16"], {c: _FP8_LINEAR for c in ("attention", "recurrent", "dense_ffn", "routed_experts",
                                                          "shared_experts", "latent_proj")}),
    "mxfp4": (_BITS["bfloat16"], {"routed_experts": _MXFP4}),
}


def weight_bytes(num_params, dtype="bfloat16"):
    """Memory for num_params values stored as dtype, one of BYTES_PER_VALUE."""
    if dtype not in BYTES_PER_VALUE:
        raise ValueError(f"dtype must be one of {tuple(BYTES_PER_VALUE)}, got {dtype!r}")
    return num_params * BYTES_PER_VALUE[dtype]


def bits_per_weight(fmt, component):
    """Bits one weight of a parameter component (utils.counting.COMPONENTS) takes in format fmt."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"fmt must be one of {tuple(WEIGHT_FORMATS)}, got {fmt!r}")
    default, special = WEIGHT_FORMATS[fmt]
    return special.get(component, default)


def stored_weight_bytes(config, fmt="bfloat16"):
    """Bytes of all weights of a course or Hugging Face config stored in a WEIGHT_FORMATS format."""
    components = count_parameters(config)["components"]
    return sum(n * bits_per_weight(fmt, c) / 8 for c, n in components.items())


def format_of_config(config):
    """The weight format a config.json's quantization_config declares ("bfloat16" when none)."""
    method = quant_method(config)
    if method is None:
        return "bfloat16"
    if method not in WEIGHT_FORMATS:
        raise ValueError(f"quant_method must be one of {tuple(WEIGHT_FORMATS)}, got {method!r}")
    return method


# ----------------------------------------------------------------------------------------------
# What each layer of a Hugging Face model keeps while serving, as transformers decides it.

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
    spans = {"sliding_attention": ("sliding_window", sliding_window(cfg)),
             "chunked_attention": ("attention_chunk_size", attention_chunk_size(cfg))}
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
    if cfg["model_type"] in MLA_FAMILIES:
        latent = field(cfg, "kv_lora_rank") + field(cfg, "qk_rope_head_dim")
        return batch_size * context_length * field(cfg, "num_hidden_layers") * latent
    _, nkv, hd = attention_heads(cfg)
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
        _, inner, conv_dim, K = mamba_sizes(cfg)
        state = inner * field(cfg, "ssm_state_size")
    else:
        key_dim, value_dim, nv, dk, dv, K = deltanet_sizes(cfg)
        conv_dim, state = 2 * key_dim + value_dim, nv * dk * dv
    return batch_size * n_layers * (state + conv_dim * K)


# ----------------------------------------------------------------------------------------------
# The caches in bytes, for course and Hugging Face configs.

def kv_cache_bytes(config, context_length, batch_size=1, dtype="bfloat16"):
    """Memory of the attention cache (keys and values) for batch_size sequences of context_length
    tokens: for a course config, every layer caches K and V of emb_dim values per token; for a
    Hugging Face config, see kv_cache_values (GQA, sliding windows, chunks, MLA, and no keys or
    values in the Mamba-2 and linear-attention layers of hybrids)."""
    per_value = weight_bytes(1, dtype)
    if not is_hf_config(config):                               # a course config: what its GPT caches
        shape = kv_cache_shape(validate_model_config(config))
        return batch_size * context_length * shape["n_layers"] * 2 * shape["kv_heads"] * shape["head_size"] * per_value
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
