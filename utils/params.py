"""Total vs active parameters, counted analytically from a config (no weights allocated).

`count_parameters(config)` takes either one of the course's config dicts (dense GPT, routed MoE,
shared experts, latent MoE) or a Hugging Face `config.json` as a dict (it has a "model_type";
counted by utils/hf_params.py), and returns a dict with
    total            every parameter the model stores
    active           parameters one token uses: embeddings and head included, routed experts
                     counted top-k of E, shared experts and dense layers in full
    components       {component: parameters}, e.g. embedding, attention, routed_experts, ...
    active_components  the same, as used by one token
`parameter_breakdown(model)` counts the same components from an instantiated course model, so the
two can be checked against each other. `moe_layer_costs(cfg)` gives one MoE layer's parameters,
FLOPs per token and bytes sent to the experts. Memory in bytes is utils/memory.py's.
"""
from .config import is_moe_block, shared_expert_hidden, validate_model_config, validate_moe_config
from .counting import COMPONENTS, mlp_parameters, parameter_summary
from .gpt import FeedForward, LayerNorm, MultiHeadAttention
from .hf_config import is_hf_config
from .hf_params import count_hf_parameters
from .moe import LatentMoE, MoEFeedForward


def expert_parameters(expert_type, dim, hidden):
    """Parameters of one of the course's expert MLPs (utils.experts.Experts) on vectors of size `dim`
    with `hidden` units: "gelu" experts have biases, like the dense FeedForward; "swiglu" and
    "relu2" experts have none."""
    return mlp_parameters(expert_type, dim, hidden, biases=expert_type == "gelu")


def count_course_parameters(cfg):
    """Analytic count for a course config (MoEGPTModel with dense, MoE, shared-expert or latent layers)."""
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
        n_moe = sum(is_moe_block(cfg, layer) for layer in range(L))
        layer = moe_layer_costs(cfg)["param_components"]
        for key, n in layer.items():
            total[key] = active[key] = n_moe * n
        active["routed_experts"] = total["routed_experts"] * cfg["num_experts_per_tok"] // cfg["num_experts"]
    total["dense_ffn"] = active["dense_ffn"] = (L - n_moe) * expert_parameters("gelu", D, cfg["ffn_hidden_dim"])
    return parameter_summary(total, active)


def count_parameters(config):
    """Total, active and per-component parameters of a course config or a Hugging Face config dict."""
    if is_hf_config(config):
        return count_hf_parameters(config)
    return count_course_parameters(config)


def parameter_breakdown(model):
    """The same dict as count_parameters, counted from an instantiated course GPTModel's modules."""
    count = lambda module: sum(p.numel() for p in module.parameters()) if module is not None else 0
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
            total["shared_experts"] += count(module.shared_expert) + count(module.shared_expert_gate)
            if isinstance(module, LatentMoE):
                total["latent_proj"] += count(module.down_proj) + count(module.up_proj)
    for key in COMPONENTS:
        if key != "routed_experts":
            active[key] = total[key]
    return parameter_summary(total, active)


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
    # The matrices' weights, biases left out: they are additions, not multiply-adds.
    matmul_weights = (D * E + projections + k * mlp_parameters(kind, dim, H)
                      + mlp_parameters(kind, D, shared_hidden) + gate)
    return {"params": sum(params.values()), "param_components": params,
            "flops_per_token": 2 * matmul_weights,
            "bytes_per_token": 2 * k * dim * bytes_per_value}
