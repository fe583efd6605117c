"""The modern decoder block that real MoE LLMs use (Mixtral, Qwen, OLMoE, Granite, DeepSeek).

Notebook 03's GPT-2 block has LayerNorm, learned absolute positions, full multi-head attention
and a GELU MLP. The MoE models of notebook 08 all changed the same four pieces:

    RMSNorm               LayerNorm without the mean and the shift (Zhang & Sennrich 2019)
    RoPE                  positions as rotations of the queries and keys (Su et al. 2021)
    grouped-query attn.   several query heads share one key/value head: a smaller KV cache
                          (Ainslie et al. 2023), optionally with RMSNorm on queries and keys
    SwiGLU experts        the course's MoEFeedForward with expert_type "swiglu"

Shapes: B = batch, T = new tokens, D = emb_dim, H = n_heads, G = n_kv_heads, d = head_dim.
A model is one plain dict like the GPT's: the GPT's and the MoE keys of utils/config.py, plus
MODERN_OPTIONAL_KEYS below, checked by validate_modern_config. utils.hf_to_course.config_from_hf
builds that dict from a Hugging Face config.json.
"""
import torch
import torch.nn as nn

from .config import (GPT_REQUIRED_KEYS, MOE_OPTIONAL_KEYS, check_bool, check_config, check_experts_count,
                     check_number, check_positive_int, is_moe_block, validate_moe_config)
from .gpt import cached_attention_mask, fused_attention, new_positions, padded_attention_mask, positions_start
from .experts import Experts
from .moe import make_moe
from .router import TopKRouter


# The config of the modern decoder: the GPT's required keys, the MoE keys (utils/config.py),
# and these. None for n_kv_heads, head_dim and rotary_dim means n_heads, emb_dim // n_heads
# and head_dim.
MODERN_OPTIONAL_KEYS = {
    "n_kv_heads": None,            # key/value heads of grouped-query attention
    "head_dim": None,              # per head; Qwen3 sets it apart from emb_dim / n_heads
    "rope_theta": 10000.0,         # RoPE base; larger = slower rotations (Mixtral, Qwen3: 1e6)
    "rotary_dim": None,            # partial rotary: only the first rotary_dim dims of a head turn
    "qk_norm": None,               # None, "head" (Qwen3) or "full" (OLMoE): RMSNorm on q and k
    "clip_qkv": None,              # OLMoE: clamp q, k, v to [-clip_qkv, clip_qkv]
    "qkv_bias": False,             # biases on the q, k, v projections (Qwen2-MoE)
    "out_proj_bias": False,        # bias on the attention output projection
    "norm_eps": 1e-6,              # RMSNorm epsilon
    "ffn_hidden_dim": None,        # width of the dense SwiGLU MLP in blocks without MoE
    "dense_layers": (),            # block indices that keep a dense MLP (Qwen's mlp_only_layers)
    "tie_embeddings": False,       # the output head reuses the token embedding matrix
    "embedding_multiplier": 1.0,   # Granite's muP scales: embeddings *, residual branches *,
    "residual_multiplier": 1.0,    # attention scores * (None: 1/sqrt(head_dim)), logits /
    "attention_multiplier": None,
    "logits_scaling": 1.0,
}
QK_NORMS = (None, "head", "full")


def validate_modern_config(cfg):
    """Check a config of utils.modern.ModernMoEModel and return it with defaults filled in.

    Its keys are the GPT's required ones, MODERN_OPTIONAL_KEYS and the MoE keys (whose expert
    type defaults to "swiglu" here, the choice of every model this decoder loads).
    """
    optional = {**MOE_OPTIONAL_KEYS, "expert_type": "swiglu", **MODERN_OPTIONAL_KEYS}
    cfg = check_config(cfg, GPT_REQUIRED_KEYS, optional)
    check_positive_int(cfg, *GPT_REQUIRED_KEYS)
    H = cfg["n_heads"]
    if cfg["n_kv_heads"] is None:
        cfg["n_kv_heads"] = H
    if cfg["head_dim"] is None:
        if cfg["emb_dim"] % H:
            raise ValueError(f"emb_dim ({cfg['emb_dim']}) must be divisible by n_heads ({H}), or set head_dim")
        cfg["head_dim"] = cfg["emb_dim"] // H
    check_positive_int(cfg, "n_kv_heads", "head_dim")
    if H % cfg["n_kv_heads"]:
        raise ValueError(f"n_heads ({H}) must be a multiple of n_kv_heads ({cfg['n_kv_heads']})")
    if cfg["rotary_dim"] is None:
        cfg["rotary_dim"] = cfg["head_dim"]
    check_positive_int(cfg, "rotary_dim")
    if cfg["rotary_dim"] % 2 or cfg["rotary_dim"] > cfg["head_dim"]:
        raise ValueError(f"config['rotary_dim'] must be even and at most head_dim ({cfg['head_dim']}), "
                         f"got {cfg['rotary_dim']}")
    if cfg["qk_norm"] not in QK_NORMS:
        raise ValueError(f"config['qk_norm'] must be one of {QK_NORMS}, got {cfg['qk_norm']!r}")
    for key in ("rope_theta", "norm_eps", "embedding_multiplier", "residual_multiplier", "logits_scaling"):
        check_number(cfg, key, 0, strict=True)
    for key in ("attention_multiplier", "clip_qkv"):
        if cfg[key] is not None:
            check_number(cfg, key, 0, strict=True)
    check_bool(cfg, "qkv_bias", "out_proj_bias", "tie_embeddings")
    layers = range(cfg["n_layers"])
    if any(isinstance(i, bool) or i not in layers for i in cfg["dense_layers"]):
        raise ValueError(f"config['dense_layers'] must list block indices in 0 .. {cfg['n_layers'] - 1}, "
                         f"got {list(cfg['dense_layers'])}")
    if cfg["ffn_hidden_dim"] is not None:
        check_positive_int(cfg, "ffn_hidden_dim")
    check_experts_count(cfg)
    if cfg["num_experts"] > 0:
        cfg = validate_moe_config(cfg, also_allowed=MODERN_OPTIONAL_KEYS)
    if not all(is_moe_block(cfg, i) for i in layers) and cfg["ffn_hidden_dim"] is None:
        raise ValueError("config['ffn_hidden_dim'] is needed: some blocks have a dense MLP "
                         "(num_experts 0, moe_every_n_layers or dense_layers)")
    return cfg


def moe_keys(cfg):
    """What the MoE layers of a validated modern config read: emb_dim and the MoE keys."""
    return {"emb_dim": cfg["emb_dim"], **{key: cfg[key] for key in MOE_OPTIONAL_KEYS}}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension: (..., dim) -> (..., dim).

    Unlike LayerNorm it neither subtracts the mean nor adds a shift, which saves work and, in
    practice, loses nothing. The root mean square is computed in float32 (a sum of squares in
    bfloat16 would lose precision); the normalised vector is cast back to x's dtype before the
    scale, as in the published implementations.
    """

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inverse_frequencies(rotary_dim, theta):
    """The rotation speeds of RoPE: theta^(-2i / rotary_dim) for i = 0 .. rotary_dim/2 - 1.

    Pair i of a head's dimensions turns by position * frequency[i] radians: the first pairs fast
    (local order), the last ones slowly (long range). A larger theta slows them all down, which is
    how long-context models stretch RoPE (Qwen3: 1e6)."""
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)


def rope_cos_sin(positions, inv_freq):
    """cos and sin of the rotation angles: positions (T,) -> two (T, rotary_dim) float32 tensors
    (positions (B, T), one row per sequence of a padded batch -> two (B, T, rotary_dim)).

    The angle of pair i is repeated at i and i + rotary_dim/2: the halves layout below."""
    angles = positions.float()[..., None] * inv_freq                    # (..., T, rotary_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the first rotary_dim dimensions of every head: x (B, heads, T, d) -> same shape.

    Dimension j is paired with j + rotary_dim/2 (the "halves" layout of GPT-NeoX and of the
    Hugging Face checkpoints; the RoPE paper pairs neighbours, which is the same rotation on
    permuted weights). Each pair (a, b) becomes (a cos - b sin, b cos + a sin). With partial
    rotary (rotary_dim < d) the remaining dimensions pass through unrotated.
    """
    rotary_dim = cos.shape[-1]
    if cos.dim() == 3:                           # (B, T, rotary_dim): one row of positions per sequence
        cos, sin = cos[:, None], sin[:, None]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)                        # the partner of each dim
    out = rot * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with n_heads query heads and n_kv_heads key/value heads.

    x: (B, T, D) -> (B, T, D). Query head h reads key/value head h // (n_heads / n_kv_heads), so
    the keys and values - and the KV cache - are n_heads / n_kv_heads times smaller than in
    multi-head attention (n_kv_heads = n_heads). Positions enter only through RoPE on q and k.

    qk_norm "head" (Qwen3) normalises each head's query and key with an RMSNorm of size d;
    "full" (OLMoE) normalises the whole projected query (H*d) and key (G*d) before splitting
    into heads. clip_qkv (OLMoE) clamps q, k and v to [-clip, clip].
    attention_multiplier (Granite) replaces the usual 1/sqrt(d) scale of the scores.
    """

    def __init__(self, cfg):
        super().__init__()
        D, H, G, d = cfg["emb_dim"], cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
        self.n_heads, self.n_kv_heads, self.head_dim = H, G, d
        self.W_query = nn.Linear(D, H * d, bias=cfg["qkv_bias"])
        self.W_key = nn.Linear(D, G * d, bias=cfg["qkv_bias"])
        self.W_value = nn.Linear(D, G * d, bias=cfg["qkv_bias"])
        self.out_proj = nn.Linear(H * d, D, bias=cfg["out_proj_bias"])
        self.qk_norm = cfg["qk_norm"]
        q_size, k_size = (d, d) if self.qk_norm == "head" else (H * d, G * d)
        self.q_norm = RMSNorm(q_size, cfg["norm_eps"]) if self.qk_norm else None
        self.k_norm = RMSNorm(k_size, cfg["norm_eps"]) if self.qk_norm else None
        self.clip_qkv = cfg["clip_qkv"]
        self.scale = cfg["attention_multiplier"]                        # None: 1 / sqrt(d)

    def forward(self, x, cos, sin, cache=None, layer=0, visible=None):
        """cos, sin: (T, rotary_dim) (or (B, T, rotary_dim)) for the new tokens' positions. With a
        KVCache, x holds the tokens after the cache's `length` ones; their keys and values are
        stored in slot `layer`. `visible`: a (B, 1, T, S) bool mask that replaces the causal rule
        when some positions are padding (utils.gpt.padded_attention_mask)."""
        B, T, _ = x.shape
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, d)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, T, d)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)                              # (B, G, start + T, d)
        # Each key/value head serves n_heads / n_kv_heads query heads: repeat it for them.
        repeats = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        causal = False
        if visible is None:
            visible, causal = cached_attention_mask(start, T, x.device)
        context = fused_attention(q, k, v, attn_mask=visible, is_causal=causal, scale=self.scale)
        return self.out_proj(context.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class ModernBlock(nn.Module):
    """Pre-norm block with RMSNorm: x + m * Attn(norm1(x)), then x + m * FFN(norm2(x)).

    m is Granite's residual_multiplier (1 elsewhere). `ff` is the block's feed-forward: a routed
    MoE layer, or a dense SwiGLU MLP (Experts with one expert) in the layers that have none.
    """

    def __init__(self, cfg, ff):
        super().__init__()
        self.norm1 = RMSNorm(cfg["emb_dim"], cfg["norm_eps"])
        self.att = GroupedQueryAttention(cfg)
        self.norm2 = RMSNorm(cfg["emb_dim"], cfg["norm_eps"])
        self.ff = ff
        self.residual_multiplier = cfg["residual_multiplier"]

    def forward(self, x, cos, sin, cache=None, layer=0, visible=None):
        x = x + self.residual_multiplier * self.att(self.norm1(x), cos, sin, cache=cache, layer=layer, visible=visible)
        h = self.norm2(x)
        ff = self.ff.as_mlp(h) if isinstance(self.ff, Experts) else self.ff(h)
        return x + self.residual_multiplier * ff


class ModernMoEModel(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size), built from the modern blocks.

    logits = out_head(final_norm(blocks(embedding_multiplier * tok_emb(idx)))) / logits_scaling
    (the multipliers are Granite's muP scales, 1 elsewhere). With tie_embeddings the output head
    reuses the token embedding matrix. Works with utils.generation.generate and its KVCache, and with
    the routing analysis of notebook 05 (its MoE layers are the course's MoEFeedForward).
    """

    def __init__(self, cfg):
        super().__init__()
        cfg = validate_modern_config(cfg)
        self.cfg = cfg
        self.kv_cache_shape = {"n_layers": cfg["n_layers"], "kv_heads": cfg["n_kv_heads"],
                               "head_size": cfg["head_dim"], "positions": cfg["context_length"]}   # for KVCache
        D = cfg["emb_dim"]
        self.tok_emb = nn.Embedding(cfg["vocab_size"], D)
        self.trf_blocks = nn.ModuleList(
            ModernBlock(cfg, make_moe(moe_keys(cfg)) if is_moe_block(cfg, i) else
                        Experts(1, D, cfg["ffn_hidden_dim"], cfg["expert_type"]))
            for i in range(cfg["n_layers"]))
        self.final_norm = RMSNorm(D, cfg["norm_eps"])
        self.out_head = nn.Linear(D, cfg["vocab_size"], bias=False)
        self.tie_weights()

    def tie_weights(self):
        """Share the embedding matrix with the output head when the config ties them (to be
        called again after anything that replaces parameters, e.g. Module.to_empty)."""
        if self.cfg["tie_embeddings"]:
            self.out_head.weight = self.tok_emb.weight

    def reset_buffers(self):
        """Zero the routers' expert biases (buffers, not weights: checkpoints do not hold them),
        e.g. after Module.to_empty left them uninitialised."""
        for module in self.modules():
            if isinstance(module, TopKRouter):
                module.expert_bias.zero_()

    def forward(self, idx, cache=None, attention_mask=None):
        """idx: (B, T) -> logits (B, T, V). With a KVCache, idx holds only the tokens that follow
        the cache's `length` tokens, and the cache grows by T. attention_mask: (B, cached + T), 1
        for real tokens and 0 for padding (see utils.gpt.new_positions)."""
        positions = new_positions(idx, cache, self.cfg["context_length"], attention_mask)
        visible = None if attention_mask is None else padded_attention_mask(attention_mask, positions_start(cache),
                                                                            idx.shape[1])
        # The frequencies are recomputed in float32 at every call (a few numbers): kept as a buffer,
        # they would be rounded when the model is cast to bfloat16.
        inv_freq = rope_inverse_frequencies(self.cfg["rotary_dim"], self.cfg["rope_theta"]).to(idx.device)
        cos, sin = rope_cos_sin(positions, inv_freq)
        x = self.tok_emb(idx) * self.cfg["embedding_multiplier"]
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, cos, sin, cache=cache, layer=layer, visible=visible)
        if cache is not None:
            cache.length += idx.shape[1]
        return self.out_head(self.final_norm(x)) / self.cfg["logits_scaling"]
