"""Parameters of real models, counted analytically from their Hugging Face config.json.

`count_hf_parameters(config)` counts every parameter `transformers` builds for a config.json dict
(the tests compare it with transformers' models instantiated on the meta device). It returns the
same dict as `utils.params.count_parameters`, and, under "mtp", the parameters of
multi-token-prediction layers that a config describes but transformers does not build (publishers
leave them out of their totals too). How each family's config is read (its field names, defaults
and rules) is utils/hf_config.py's job; this module only adds up matrices.

The families fall into three kinds of layer stacks:
- every layer has attention and a feed-forward (MoE or dense): Mixtral, Qwen2/3-MoE, OLMoE,
  DeepSeek-V2/V3 (and Kimi K2, a DeepSeek-V3 config), GLM-4.5, gpt-oss, Llama 4, Granite MoE,
  MiniMax-M2, ERNIE 4.5;
- Qwen3-Next: the same, but three layers in four replace attention with Gated DeltaNet, a linear
  attention whose memory is a fixed-size state;
- Nemotron-H (Nemotron 3 Nano and Super): each layer is ONE of Mamba-2 mixer (M), attention (*),
  MoE (E) or dense MLP (-), in the order hybrid_override_pattern gives; Super's experts work in a
  latent space (LatentMoE) and use relu^2 instead of a gated MLP.
"""
from functools import partial

from .counting import COMPONENTS, mlp_parameters, parameter_summary
from .hf_config import (MLA_FAMILIES, attention_biases, attention_heads, attention_layer_types, deltanet_sizes,
                        field, mamba_sizes, nemotron_layers, num_layers, qk_norm, text_config, ties_word_embeddings,
                        use_bias)
from .hf_moe import (NUM_EXPERTS, TOP_K, dense_mlp_width, expert_hidden, mlp_kind, moe_latent_size,
                     moe_layer_indices, shared_experts)

# ----------------------------------------------------------------------------------------------
# What one layer of each kind holds.


def _mla_attention(cfg):
    """(weights, internal norm weights) of one DeepSeek multi-head latent attention layer: queries
    (through a rank-q_lora_rank bottleneck when it is set) and keys/values through a shared
    rank-kv_lora_rank latent, each bottleneck with an RMSNorm; a decoupled rotary key."""
    f = partial(field, cfg)
    D, nh = f("hidden_size"), f("num_attention_heads")
    nope, rope, v, kv_rank = f("qk_nope_head_dim"), f("qk_rope_head_dim"), f("v_head_dim"), f("kv_lora_rank")
    q_rank = f("q_lora_rank", None)
    bias, out_bias = attention_biases(cfg)
    q = D * nh * (nope + rope) if q_rank is None else D * q_rank + bias * q_rank + q_rank * nh * (nope + rope)
    kv = D * (kv_rank + rope) + bias * (kv_rank + rope) + kv_rank * nh * (nope + v)
    return q + kv + nh * v * D + out_bias * D, kv_rank + (q_rank or 0)


def _attention(cfg):
    """(attention weights, attention-internal norm weights) of one attention layer."""
    mt = cfg["model_type"]
    if mt in MLA_FAMILIES:
        return _mla_attention(cfg)
    D = field(cfg, "hidden_size")
    nh, nkv, hd = attention_heads(cfg)
    q_heads = 2 * nh if mt == "qwen3_next" else nh              # Qwen3-Next's query also yields an output gate
    weights = D * q_heads * hd + 2 * D * nkv * hd + nh * hd * D
    qkv_bias, out_bias = attention_biases(cfg)
    biases = qkv_bias * (q_heads + 2 * nkv) * hd + out_bias * D
    sinks = nh if mt == "gpt_oss" else 0                        # one learned attention sink per head
    qk_norms = {None: 0, "head": 2 * hd, "full": (nh + nkv) * hd}[qk_norm(cfg)]
    return weights + biases + sinks, qk_norms


def _recurrent(cfg):
    """(mixer weights, its gated-norm weights) of one Mamba-2 (Nemotron-H) or Gated DeltaNet
    (Qwen3-Next) layer."""
    f = partial(field, cfg)
    D = f("hidden_size")
    if cfg["model_type"] == "nemotron_h":                       # Mamba-2
        H, inner, conv_dim, K = mamba_sizes(cfg)
        projection = inner + conv_dim + H                       # z (gate), x B C (convolved), dt per head
        bias = use_bias(cfg)
        weights = (D * projection + bias * projection + conv_dim * K + f("use_conv_bias", True) * conv_dim
                   + 3 * H + inner * D + bias * D)              # dt_bias, A_log, D per head; out_proj
        return weights, inner
    key_dim, value_dim, nv, _, dv, K = deltanet_sizes(cfg)      # Gated DeltaNet
    conv_dim = 2 * key_dim + value_dim
    weights = D * (2 * key_dim + 2 * value_dim) + D * 2 * nv + conv_dim * K + 2 * nv + value_dim * D
    return weights, dv


def _mlp(cfg, width):
    """Parameters of one dense MLP or shared expert of `width` hidden units (hf_moe.mlp_kind)."""
    activation, biased = mlp_kind(cfg)
    return mlp_parameters(activation, field(cfg, "hidden_size"), width, biases=biased)


def _experts(cfg):
    """(E, k, parameters of one routed expert, shared-expert parameters, router parameters,
    latent projections) of one MoE layer. A routed expert has the activation of the family's MLPs
    and no biases (ERNIE 4.5's neither, even under use_bias; gpt-oss's have them); a LatentMoE's
    experts work in its latent space, its projections biased like its MLPs."""
    mt, f = cfg["model_type"], partial(field, cfg)
    D, E, k = f("hidden_size"), f(NUM_EXPERTS), f(TOP_K)
    activation, biased = mlp_kind(cfg)
    latent = moe_latent_size(cfg)                               # LatentMoE: D -> latent -> D
    expert = mlp_parameters(activation, latent or D, expert_hidden(cfg), biases=mt == "gpt_oss")
    count, width, gated = shared_experts(cfg)
    shared = (_mlp(cfg, width) if count else 0) + (D if gated else 0)      # the gate: Linear(D, 1)
    # gpt-oss's router has a bias; ERNIE 4.5 keeps its selection bias as a (frozen) parameter.
    router = D * E + (E if mt in ("gpt_oss", "ernie4_5_moe") else 0)
    projections = 2 * D * latent + biased * (latent + D) if latent else 0
    return E, k, expert, shared, router, projections


# ----------------------------------------------------------------------------------------------
# The whole model.

def _nemotron_mtp(cfg, moe_layer, attention, D):
    """Parameters of Nemotron-H's multi-token-prediction layers (num_nextn_predict_layers of them,
    each a short stack in mtp_hybrid_override_pattern order). As vLLM and TensorRT-LLM build them:
    the first layer of a stack normalises the token embedding and the main model's hidden state
    and projects the two, concatenated, back to D (eh_proj); each layer has its norm and mixer;
    the last a final norm. The embedding and output head are the main model's."""
    n = field(cfg, "num_nextn_predict_layers", 0)
    if not n:
        return 0
    kinds = nemotron_layers(cfg, "mtp_layers_block_type", "mtp_hybrid_override_pattern")
    mixer = {"full_attention": sum(attention), "moe": moe_layer, "mlp": _mlp(cfg, dense_mlp_width(cfg)),
             "linear_attention": sum(_recurrent(cfg))}
    return n * (2 * D + 2 * D * D + D + sum(D + mixer[kind] for kind in kinds))


def _layer_roles(cfg):
    """(mixer of each layer: "attention", "recurrent" or None; feed-forward of each layer: "moe",
    "dense" or None; norm weights per layer outside the mixers)."""
    D, L, moe = field(cfg, "hidden_size"), num_layers(cfg), set(moe_layer_indices(cfg))
    if cfg["model_type"] == "nemotron_h":                       # each layer is ONE mixer or feed-forward
        kinds = attention_layer_types(cfg)
        mixers = ["attention" if k == "full_attention" else "recurrent" if k == "linear_attention" else None
                  for k in kinds]
        ffns = ["moe" if i in moe else "dense" if k == "mlp" else None for i, k in enumerate(kinds)]
        return mixers, ffns, D                                  # one pre-norm per layer
    types = attention_layer_types(cfg) if cfg["model_type"] == "qwen3_next" else ["full_attention"] * L
    mixers = ["recurrent" if t == "linear_attention" else "attention" for t in types]
    ffns = ["moe" if i in moe else "dense" for i in range(L)]
    return mixers, ffns, 2 * D                                  # before the mixer and before the FFN


def count_hf_parameters(config):
    """Total, active and per-component parameters of a Hugging Face config.json dict, as
    `transformers` builds the model. Active counts k of the E routed experts in each MoE layer
    and everything else in full (input embedding and output head included). "mtp" holds the
    multi-token-prediction parameters outside the total (0 when the config has none)."""
    cfg = text_config(config)
    mt, f = cfg["model_type"], partial(field, cfg)
    V, D, L = f("vocab_size"), f("hidden_size"), num_layers(cfg)
    tied = ties_word_embeddings(cfg)
    mixers, ffns, norms_per_layer = _layer_roles(cfg)
    attention, attention_norms = _attention(cfg) if "attention" in mixers else (0, 0)
    recurrent, recurrent_norms = _recurrent(cfg) if "recurrent" in mixers else (0, 0)
    n_attention, n_recurrent = mixers.count("attention"), mixers.count("recurrent")
    n_moe, n_dense = ffns.count("moe"), ffns.count("dense")
    E, k, per_expert, shared, router, latent = _experts(cfg) if n_moe else (0, 0, 0, 0, 0, 0)
    lm_bias = V * use_bias(cfg) if mt == "ernie4_5_moe" else 0     # ERNIE 4.5's head has a bias under use_bias
    total = dict.fromkeys(COMPONENTS, 0)
    total.update(embedding=V * D, lm_head=(0 if tied else D * V) + lm_bias,
                 attention=n_attention * attention, recurrent=n_recurrent * recurrent,
                 norms=L * norms_per_layer + D + n_attention * attention_norms + n_recurrent * recurrent_norms,
                 dense_ffn=n_dense * _mlp(cfg, dense_mlp_width(cfg)) if n_dense else 0,
                 routed_experts=n_moe * E * per_expert, shared_experts=n_moe * shared, router=n_moe * router,
                 latent_proj=n_moe * latent)
    active = {**total, "routed_experts": n_moe * k * per_expert}
    result = parameter_summary(total, active)
    moe_layer = E * per_expert + shared + router + latent
    result["mtp"] = _nemotron_mtp(cfg, moe_layer, (attention, attention_norms), D) if mt == "nemotron_h" else 0
    return result
