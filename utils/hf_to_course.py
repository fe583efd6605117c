"""A Hugging Face config.json in the course's own config keys (utils/config.py).

- course_moe_keys: the MoE layer of a real model as the course's MoE keys (notebook 08's
  cheat-sheet), for CHEAT_SHEET_FAMILIES;
- config_from_hf: the whole config of utils.modern.ModernMoEModel, for the families the loader of
  utils/checkpoints.py supports (SUPPORTED_MODEL_TYPES); it refuses what the decoder does not
  implement (quantised weights other than block-scaled FP8, sliding windows, scaled RoPE,
  activations other than SiLU).

Both read the families' rules from utils/hf_config.py, the ones utils/hf_params.py counts with.
"""
from functools import partial

from .dtypes import LOADABLE_DTYPES
from .hf_config import (attention_biases, attention_heads, attention_layer_types, field, qk_norm, quant_method,
                        quantization_config, sliding_window, text_config, ties_word_embeddings)
from .hf_moe import (dense_mlp_width, mlp_kind, moe_latent_size, moe_layer_shape, qwen_moe_layout,
                     router_aux_loss_coef, shared_experts)
from .quant import check_block

CHEAT_SHEET_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v3", "gpt_oss",
                        "granitemoe", "nemotron_h")
SUPPORTED_MODEL_TYPES = ("granitemoe", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


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
    mt, f = cfg["model_type"], partial(field, cfg)
    if mt not in CHEAT_SHEET_FAMILIES:
        raise ValueError(f"model_type {mt!r} is not in the cheat-sheet; supported: {list(CHEAT_SHEET_FAMILIES)}")
    shape = moe_layer_shape(cfg)
    deepseek_routing = mt in ("deepseek_v3", "nemotron_h")     # scaled, grouped, renormalised sigmoid routing
    sigmoid = mt == "nemotron_h" or f("scoring_func", "softmax") == "sigmoid"
    keys = {"router_type": "sigmoid" if sigmoid else "softmax",
            "num_experts": shape["num_experts"], "num_experts_per_tok": shape["top_k"],
            "moe_hidden_dim": shape["expert_hidden"],
            "norm_topk_prob": True if mt in ("mixtral", "granitemoe", "gpt_oss")
            else f("norm_topk_prob", deepseek_routing),
            "routed_scaling_factor": f("routed_scaling_factor", 1.0) if deepseek_routing else 1.0,
            "n_group": f("n_group", 1) if deepseek_routing else 1,
            "topk_group": f("topk_group", 1) if deepseek_routing else 1,
            "num_shared_experts": 0, "shared_expert_hidden_dim": None, "shared_expert_gate": False,
            "expert_type": mlp_kind(cfg)[0], "latent_dim": moe_latent_size(cfg)}
    count, width, gated = shared_experts(cfg)
    if count and width:                                       # a shared expert of width 0 computes nothing
        keys.update(num_shared_experts=count, shared_expert_hidden_dim=width, shared_expert_gate=gated)
    bias = (mt == "deepseek_v3" and f("topk_method", "noaux_tc") == "noaux_tc") or mt == "nemotron_h"
    keys["balancing"] = "bias" if bias else "auxiliary loss"
    keys["router_aux_loss_coef"] = router_aux_loss_coef(cfg)
    return keys


# ----------------------------------------------------------------------------------------------
# The whole model, for the loader.

# The quantised format the loader reads: block-scaled FP8 as DeepSeek-V3 and Qwen3-*-FP8 ship it.
FP8_QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}


def fp8_block_size(hf):
    """The (rows, cols) weight_block_size of a block-scaled FP8 checkpoint, or None for an
    unquantised one (no quantization_config). Any other quantisation raises a ValueError, before
    any tensor is read (see refuse_quantized).

    An FP8 checkpoint (DeepSeek-V3, Kimi K2, Qwen3-30B-A3B-FP8) stores its linear layers' weights in
    float8_e4m3fn, each beside a float32 `<name>_scale_inv` with one scale per block (utils/quant.py).
    Read: quant_method "fp8", fmt "e4m3" (the default), weight_block_size [rows, cols] and
    activation_scheme "dynamic" (FP8 kernels quantise the activations on the fly; nothing about
    them is stored). A "static" scheme would ship activation scales, and per-tensor FP8 (no
    weight_block_size) or power-of-two scales (scale_fmt "ue8m0") other layouts: all are refused.
    """
    quant = quantization_config(hf)
    if quant is None:
        return None
    method = quant_method(hf)
    if method != "fp8":
        raise ValueError(
            f"config.json has a quantization_config (quant_method {method!r}): this quantisation is not supported. "
            f"The loader reads unquantised weights ({', '.join(LOADABLE_DTYPES)}) and block-scaled FP8 "
            "(quant_method 'fp8'): load the model's unquantised (e.g. bfloat16) or FP8 release instead")
    for key, allowed in FP8_QUANTIZATION.items():
        if quant.get(key, allowed) != allowed:
            raise ValueError(f"quantization_config {key} must be {allowed!r} (block-scaled FP8 as DeepSeek-V3 ships "
                             f"it), got {quant[key]!r}")
    if quant.get("scale_fmt", "float") != "float":
        raise ValueError(f"quantization_config scale_fmt must be 'float' (float32 block scales), got {quant['scale_fmt']!r}")
    return check_block(quant.get("weight_block_size"), name="quantization_config weight_block_size")


def refuse_quantized(hf):
    """Raise a ValueError if a config.json dict declares a quantisation the loader cannot read.

    A quantised checkpoint (FP8 with block scales as in DeepSeek-V3 or Qwen3-FP8, MXFP4, GPTQ,
    AWQ, bitsandbytes, ...) stores low-precision tensors next to the scales that give them their
    values (e.g. weight_scale_inv), and often packs several values into one element. Copying such
    a tensor into a float parameter without its scale gives wrong weights. The loader reads
    block-scaled FP8 (fp8_block_size) and dequantises it; every other quantisation is refused
    before any tensor is read."""
    fp8_block_size(hf)


def _rope(cfg):
    """(rope_theta, partial_rotary_factor) from a config.json, old layout or transformers 5's
    rope_parameters; RoPE variants that rescale positions (YaRN, linear, ...) are refused."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: 'default')")
    default_theta = 1e6 if cfg["model_type"] == "mixtral" else 10000.0
    theta = params.get("rope_theta", cfg.get("rope_theta", default_theta))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return float(theta), partial


def _refuse_sliding_window(cfg):
    """Raise a ValueError when some layer attends over fewer tokens than the context
    (max_position_embeddings): the decoder attends to every earlier token."""
    window, context = sliding_window(cfg), field(cfg, "max_position_embeddings", 0)
    sees_all = window is None or window >= context                # a window as long as the context is none
    limited = [kind for kind in attention_layer_types(cfg)
               if kind != "full_attention" and not (kind == "sliding_attention" and sees_all)]
    if limited:
        raise ValueError(f"sliding-window attention (sliding_window={window}) is not supported")


def config_from_hf(hf):
    """A Hugging Face config.json dict -> the config dict of utils.modern.ModernMoEModel.

    Raises a ValueError for an unsupported model_type (listing the supported ones), a quantisation
    other than block-scaled FP8 (refuse_quantized), a missing field, or a feature this decoder does not
    implement (sliding-window attention, scaled RoPE, an activation other than SiLU), instead of
    building a model that would compute something else.
    """
    refuse_quantized(hf)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    cfg = text_config(hf)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (the experts are SwiGLU: 'silu')")
    D, L = field(cfg, "hidden_size"), field(cfg, "num_hidden_layers")
    _refuse_sliding_window(cfg)
    H, n_kv_heads, head_dim = attention_heads(cfg)
    theta, partial = _rope(cfg)
    qkv_bias, out_proj_bias = attention_biases(cfg)
    # The MoE layer (E, k, widths, renormalisation, shared expert) is read as notebook 08's
    # cheat-sheet reads it; the rest of this function is about attention and the model around it.
    moe = course_moe_keys(cfg)
    aux_loss_coef = moe.pop("router_aux_loss_coef") or 0.0
    del moe["balancing"]
    course = {
        "vocab_size": field(cfg, "vocab_size"), "context_length": field(cfg, "max_position_embeddings"),
        "emb_dim": D, "n_heads": H, "n_layers": L, "n_kv_heads": n_kv_heads, "head_dim": head_dim,
        "rope_theta": theta, "rotary_dim": int(head_dim * partial),
        "qk_norm": qk_norm(cfg), "clip_qkv": cfg.get("clip_qkv") if model_type == "olmoe" else None,
        "qkv_bias": qkv_bias, "out_proj_bias": out_proj_bias,
        "norm_eps": field(cfg, "rms_norm_eps"), "tie_embeddings": ties_word_embeddings(cfg),
        **moe, "aux_loss_coef": aux_loss_coef,
    }
    if model_type in ("qwen2_moe", "qwen3_moe"):
        course["ffn_hidden_dim"] = dense_mlp_width(cfg, None)
        course.update(qwen_moe_layout(cfg))
    if model_type == "granitemoe":
        course.update({key: cfg.get(key, 1.0) for key in ("embedding_multiplier", "residual_multiplier",
                                                          "attention_multiplier", "logits_scaling")})
    return course
