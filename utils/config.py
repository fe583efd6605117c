"""The course's model configs: which keys a config may have, their defaults, and the checks.

A model is one plain dict (e.g. utils.gpt.GPT_CONFIG_124M). The GPT's keys come first; the MoE
layers of notebooks 05-08 add their own keys to the same dict. Every check raises a ValueError that
names the bad key and what is allowed, so a typo fails at once instead of training the wrong model.

GPT keys: vocab_size, context_length, emb_dim, n_heads, n_layers (required); drop_rate, qkv_bias,
ffn_hidden_dim (optional, GPT_OPTIONAL_KEYS).

MoE config keys (in the same dict as the GPT's keys; see MOE_OPTIONAL_KEYS for the defaults):
    num_experts, num_experts_per_tok, moe_hidden_dim   the size of the layer
    expert_type          "gelu": Linear+GELU+Linear with biases, the course's FeedForward shape;
                         "swiglu": W2(silu(W1 x) * W3 x), no biases (Mixtral, Qwen, DeepSeek);
                         "relu2": W2 relu(W1 x)^2, no biases (Nemotron)
    router_type          "softmax" (Mixtral, Qwen) or "sigmoid" (DeepSeek-V3) affinity scores
    norm_topk_prob       renormalise the k gate weights to sum to 1 (Mixtral: yes; Qwen1.5-MoE: no)
    routed_scaling_factor  multiplies the gate weights (DeepSeek-V3: 2.5)
    n_group, topk_group  group-limited routing: experts form n_group groups, and each token picks
                         its experts only from its topk_group best groups (DeepSeek-V3: 8 and 4)
    bias_update_rate     auxiliary-loss-free balancing: after each optimizer step,
                         expert_bias += rate * sign(mean load - load); the bias only affects which
                         experts are selected, never the gate weights (DeepSeek-V3: 0.001)
    aux_loss_coef        weight of the Switch-Transformer load-balancing loss
    seq_aux_loss_coef    weight of DeepSeek-V3's sequence-wise balance loss
    z_loss_coef          weight of the ST-MoE router z-loss
    capacity_factor      None: dropless. A number c: each expert takes at most ceil(c * n * k / E)
                         assignments from a pool of n tokens; the rest are dropped (the token keeps
                         its residual). What the pool is and who is served first: capacity_priority
    capacity_priority    "position" (default): the pool is one sequence (n = T) and tokens are served
                         in order: no later token takes an earlier token's place, but the capacity
                         itself grows with T, so a token's keep also depends on the sequence's length;
                         "gshard": the pool is the whole batch (n = N) and every token's first choice
                         comes before any second choice, as in GShard and Switch - not causal in a
                         decoder (a later token can take an earlier token's place)
    num_shared_experts   always-active experts of width moe_hidden_dim (DeepSeekMoE), added to the
                         routed output; stored as one MLP of width num_shared_experts * moe_hidden_dim
                         (the same function)
    shared_expert_hidden_dim  the shared experts' total width instead, when they are not
                         moe_hidden_dim wide (Qwen2-MoE, Nemotron-H); needs num_shared_experts >= 1
    shared_expert_gate   scale the shared expert by sigmoid(Linear(D, 1)(x)) (Qwen1.5/Qwen2-MoE)
    latent_dim           LatentMoE: the experts work in this dimension, at most emb_dim (None: plain
                         MoE; emb_dim: the projections without the compression)
    moe_dispatch         "sorted" (fast, default), "loop" (the readable reference) or "grouped" (one
                         grouped matmul per weight, utils.experts.dispatch_grouped); same results.
                         "sorted" hands over to "grouped" for bfloat16 on recent NVIDIA GPUs, and to
                         the decode path for a few tokens without autograd (utils/moe.py)
    moe_every_n_layers   in MoEGPTModel, layer i (0-based) is an MoE layer when (i + 1) % n == 0;
                         at most n_layers
"""
import difflib
import math
import operator

# The keys a GPT config may have: required ones, then optional ones with their defaults.
GPT_REQUIRED_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
GPT_OPTIONAL_KEYS = {
    "drop_rate": 0.0,        # dropout on embeddings, attention weights and residual branches
    "qkv_bias": False,       # bias on the query/key/value projections
    "ffn_hidden_dim": None,  # FeedForward width; None means 4 * emb_dim as in GPT-2
}

def check_config(cfg, required, optional, also_allowed=()):
    """Raise a ValueError for a missing required key or a key nobody knows.

    Returns a copy of `cfg` with the optional keys' defaults filled in. Keys in `also_allowed` may
    be present (another module reads them) but get no default here.
    """
    allowed = set(required) | set(optional) | set(also_allowed)
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        close = {key: difflib.get_close_matches(key, allowed, n=1) for key in unknown}
        hints = "".join(f" (did you mean {match[0]!r} for {key!r}?)" for key, match in close.items() if match)
        raise ValueError(f"unknown config key(s) {unknown}{hints}; allowed keys: {sorted(allowed)}")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"config is missing required key(s) {missing}")
    return {**optional, **cfg}


def is_count(value):
    """Whether value is an integer >= 0 (a Python or NumPy integer), and not a bool."""
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= 0
    except TypeError:
        return False


def check_positive_int(cfg, *keys):
    for key in keys:
        value = cfg[key]
        if not is_count(value) or value == 0:
            raise ValueError(f"config[{key!r}] must be a positive integer, got {value!r}")


def validate_gpt_config(cfg, extra_optional=None):
    """Check a GPT config and return it with defaults filled in.

    `extra_optional` lets a module that extends the model (e.g. the MoE layers) declare its own
    keys, so that a typo in any key is still caught.
    """
    cfg = check_config(cfg, GPT_REQUIRED_KEYS, {**GPT_OPTIONAL_KEYS, **(extra_optional or {})})
    check_positive_int(cfg, *GPT_REQUIRED_KEYS)
    if cfg["emb_dim"] % cfg["n_heads"] != 0:
        raise ValueError(f"emb_dim ({cfg['emb_dim']}) must be divisible by n_heads ({cfg['n_heads']})")
    if not 0.0 <= cfg["drop_rate"] < 1.0:
        raise ValueError(f"config['drop_rate'] must be in [0, 1), got {cfg['drop_rate']}")
    if cfg["ffn_hidden_dim"] is None:
        cfg["ffn_hidden_dim"] = 4 * cfg["emb_dim"]
    check_positive_int(cfg, "ffn_hidden_dim")
    check_bool(cfg, "qkv_bias")
    return cfg


def check_bool(cfg, *keys):
    for key in keys:
        if not isinstance(cfg[key], bool):
            raise ValueError(f"config[{key!r}] must be True or False, got {cfg[key]!r}")


MOE_OPTIONAL_KEYS = {
    "num_experts": 0,            # 0 means a dense model (no MoE layers)
    "num_experts_per_tok": 2,
    "moe_hidden_dim": None,      # required when num_experts > 0
    "expert_type": "gelu",
    "router_type": "softmax",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "bias_update_rate": 0.0,
    "aux_loss_coef": 0.01,
    "seq_aux_loss_coef": 0.0,
    "z_loss_coef": 0.0,
    "capacity_factor": None,
    "capacity_priority": "position",
    "num_shared_experts": 0,
    "shared_expert_hidden_dim": None,
    "shared_expert_gate": False,
    "latent_dim": None,
    "moe_dispatch": "sorted",
    "moe_every_n_layers": 1,
}
EXPERT_TYPES = ("gelu", "swiglu", "relu2")
ROUTER_TYPES = ("softmax", "sigmoid")
DISPATCH_MODES = ("sorted", "loop", "grouped")
CAPACITY_PRIORITIES = ("position", "gshard")


def check_number(cfg, key, minimum, strict):
    value = cfg[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(f"config[{key!r}] must be a finite number {'>' if strict else '>='} {minimum}, got {value!r}")


def validate_moe_config(cfg, also_allowed=()):
    """Check the MoE keys of a config (defaults filled in); raise ValueError naming the bad field.

    When the config also describes the whole model (it has n_layers), moe_every_n_layers is
    checked against n_layers too. Keys in also_allowed may be present (another module reads them).
    """
    # An MoE layer's config is often the whole GPT's: every key a GPT config may hold is allowed,
    # and any other key (a typo such as 'capacity_factr') is an error.
    cfg = check_config(cfg, ("emb_dim",), MOE_OPTIONAL_KEYS,
                       also_allowed=(*GPT_REQUIRED_KEYS, *GPT_OPTIONAL_KEYS, *also_allowed))
    check_positive_int(cfg, "emb_dim", "num_experts", "num_experts_per_tok", "moe_hidden_dim",
                       "moe_every_n_layers", "n_group", "topk_group")
    check_bool(cfg, "norm_topk_prob", "shared_expert_gate")
    E, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    if k > E:
        raise ValueError(f"num_experts_per_tok ({k}) must be <= num_experts ({E})")
    for key, allowed in (("expert_type", EXPERT_TYPES), ("router_type", ROUTER_TYPES),
                         ("moe_dispatch", DISPATCH_MODES), ("capacity_priority", CAPACITY_PRIORITIES)):
        if cfg[key] not in allowed:
            raise ValueError(f"config[{key!r}] must be one of {allowed}, got {cfg[key]!r}")
    for key in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        check_number(cfg, key, 0, strict=False)
    check_number(cfg, "routed_scaling_factor", 0, strict=True)
    if cfg["capacity_factor"] is not None:
        check_number(cfg, "capacity_factor", 0, strict=True)
    if "n_layers" in cfg:
        check_positive_int(cfg, "n_layers")
        if cfg["moe_every_n_layers"] > cfg["n_layers"]:
            raise ValueError(f"config['moe_every_n_layers'] must be between 1 and n_layers ({cfg['n_layers']}), "
                             f"got {cfg['moe_every_n_layers']}: the model would have no MoE layer")

    G, G_k = cfg["n_group"], cfg["topk_group"]
    if G_k > G:
        raise ValueError(f"config['topk_group'] must be between 1 and n_group ({G}), got {G_k}")
    if G > 1:
        if E % G != 0 or E // G < 2:
            raise ValueError(f"n_group ({G}) must divide num_experts ({E}) into groups of at least 2")
        if k > G_k * (E // G):
            raise ValueError(f"topk_group ({G_k}) groups of {E // G} experts must hold at least "
                             f"num_experts_per_tok ({k}) experts")

    S = cfg["num_shared_experts"]
    if not is_count(S):
        raise ValueError(f"config['num_shared_experts'] must be an integer >= 0, got {S!r}")
    for key in ("shared_expert_hidden_dim", "latent_dim"):
        if cfg[key] is not None:
            check_positive_int(cfg, key)
    if cfg["shared_expert_hidden_dim"] is not None and S == 0:
        raise ValueError(f"config['shared_expert_hidden_dim'] ({cfg['shared_expert_hidden_dim']}) is the total "
                         "width of the shared experts, but num_shared_experts is 0: set num_shared_experts >= 1 "
                         "or shared_expert_hidden_dim to None")
    if cfg["shared_expert_gate"] and S == 0:
        raise ValueError("config['shared_expert_gate'] is True but there is no shared expert to gate: "
                         "set num_shared_experts >= 1 or shared_expert_gate to False")
    if cfg["latent_dim"] is not None and cfg["latent_dim"] > cfg["emb_dim"]:
        raise ValueError(f"config['latent_dim'] must be None or between 1 and emb_dim ({cfg['emb_dim']}), "
                         f"got {cfg['latent_dim']}")
    return cfg


def validate_model_config(cfg):
    """Check a whole model config - GPT keys and MoE keys - and return it with defaults filled in.
    With num_experts > 0 the MoE keys are checked too (validate_moe_config)."""
    cfg = validate_gpt_config(cfg, extra_optional=MOE_OPTIONAL_KEYS)
    check_experts_count(cfg)
    if cfg["num_experts"] > 0:
        cfg = validate_moe_config(cfg)
    return cfg


def check_experts_count(cfg):
    """num_experts is 0 (a dense model) or a positive integer (routed MoE layers)."""
    E = cfg["num_experts"]
    if not is_count(E):
        raise ValueError(f"config['num_experts'] must be 0 (dense) or a positive integer, got {E!r}")


def is_moe_block(cfg, layer):
    """Whether block `layer` (0-based) of a validated model config (the GPT of utils/moe_gpt.py, or the
    modern decoder's, utils/modern.py) has a routed MoE layer: every moe_every_n_layers-th block
    (Qwen's decoder_sparse_step) that is not in dense_layers (a key of modern configs only)."""
    return cfg["num_experts"] > 0 and (layer + 1) % cfg["moe_every_n_layers"] == 0 \
        and layer not in cfg.get("dense_layers", ())


def shared_expert_hidden(cfg):
    """Width of the (one) shared-expert MLP of a validated MoE config; 0 means no shared expert.

    num_shared_experts counts the shared experts; their total width is shared_expert_hidden_dim
    when given, else num_shared_experts * moe_hidden_dim.
    """
    if cfg["num_shared_experts"] == 0:
        return 0
    return cfg["shared_expert_hidden_dim"] or cfg["num_shared_experts"] * cfg["moe_hidden_dim"]
