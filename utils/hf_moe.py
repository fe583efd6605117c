"""The feed-forward layers of a Hugging Face config.json, read family by family the way
`transformers` builds them: which layers route (MoE) and which keep a dense MLP, the experts'
count, top-k and width, shared experts, latent projections, the MLP activation, and the declared
load-balancing coefficient. Each rule is read here once, for utils/hf_params.py (parameter counts),
utils/hf_to_course.py (the course's MoE keys), utils/memory.py and utils/serving.py; the rest of
a config (families, layer kinds, attention) is read by utils/hf_config.py.
"""
from functools import partial

from .config import is_moe_block
from .hf_config import REQUIRED, attention_layer_types, field, num_layers, text_config, use_bias

NUM_EXPERTS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
TOP_K = ("num_experts_per_tok", "moe_k")
# Families whose routed experts are intermediate_size wide (the others: moe_intermediate_size).
FULL_WIDTH_EXPERTS = ("mixtral", "olmoe", "granitemoe", "minimax_m2", "llama4_text", "gpt_oss")


def router_aux_loss_coef(cfg):
    """The coefficient of the load-balancing loss a config declares: router_aux_loss_coef, or
    DeepSeek's aux_loss_alpha; None when it has neither."""
    return cfg.get("router_aux_loss_coef", cfg.get("aux_loss_alpha"))


def mlp_kind(cfg):
    """(activation, biased) of a family's dense MLPs and shared experts, the activation as the
    course's expert_type (utils/config.py). Nemotron-H: "relu2" (up, relu^2, down: no gate), biased
    under mlp_bias (so are its LatentMoE projections); the others: "swiglu", biased only in ERNIE 4.5
    under use_bias. Routed experts have the same activation and no biases (but gpt-oss's)."""
    if cfg["model_type"] == "nemotron_h":
        return "relu2", field(cfg, "mlp_bias", False)
    return "swiglu", cfg["model_type"] == "ernie4_5_moe" and use_bias(cfg)


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
    mt, f, L = cfg["model_type"], partial(field, cfg), num_layers(cfg)
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
        return [i for i, kind in enumerate(attention_layer_types(cfg)) if kind == "moe"]
    return list(range(L))                                       # every layer


def expert_hidden(cfg):
    """Hidden width of one routed expert."""
    return field(cfg, "intermediate_size" if cfg["model_type"] in FULL_WIDTH_EXPERTS else "moe_intermediate_size")


def moe_latent_size(cfg):
    """The width a LatentMoE's experts work at (Nemotron-H's moe_latent_size: each MoE layer projects
    hidden_size down to it and back), or None when they work at hidden_size (a null or absent
    moe_latent_size, as in Nemotron 3 Nano; every other family)."""
    if cfg["model_type"] != "nemotron_h":
        return None
    return field(cfg, "moe_latent_size", None) or None


def shared_experts(cfg):
    """(count, total width, gated) of the always-active shared experts of one MoE layer, as
    transformers builds them; count 0 when there are none. Llama 4: one, as wide as a routed expert.
    Qwen2-MoE, Qwen3-Next: one of shared_expert_intermediate_size, scaled by a sigmoid gate
    (Linear(hidden_size, 1), built even when that width is 0). DeepSeek-V2/V3, GLM-4.5:
    n_shared_experts (ERNIE 4.5: moe_num_shared_experts) routed experts' widths, as one MLP.
    Nemotron-H: one MLP of moe_shared_expert_intermediate_size, whatever n_shared_experts says."""
    mt, f = cfg["model_type"], partial(field, cfg)
    if mt == "llama4_text":
        return 1, expert_hidden(cfg), False
    if mt in ("qwen2_moe", "qwen3_next"):
        return 1, f("shared_expert_intermediate_size"), True
    if mt == "nemotron_h":
        return 1, f("moe_shared_expert_intermediate_size"), False
    if mt in ("ernie4_5_moe", "deepseek_v2", "deepseek_v3", "glm4_moe"):
        n = f("moe_num_shared_experts" if mt == "ernie4_5_moe" else "n_shared_experts", 0)
        return n, n * expert_hidden(cfg), False
    return 0, 0, False


def moe_layer_shape(config):
    """The MoE layers of a Hugging Face config at a glance: hidden_size, num_experts, top_k,
    expert_hidden (each routed expert's width), dispatch_width (the width of the vector a token
    sends to each chosen expert: moe_latent_size in a latent MoE, hidden_size otherwise) and
    moe_layers (how many layers are MoE)."""
    cfg = text_config(config)
    D = field(cfg, "hidden_size")
    return {"hidden_size": D, "num_experts": field(cfg, NUM_EXPERTS), "top_k": field(cfg, TOP_K),
            "expert_hidden": expert_hidden(cfg), "dispatch_width": moe_latent_size(cfg) or D,
            "moe_layers": len(moe_layer_indices(cfg))}
