"""A GPT-2-style language model, written out piece by piece.

Shapes: B = batch, T = sequence length, D = emb_dim, H = n_heads, V = vocab_size.
A model is described by one plain dict, e.g. `GPT_CONFIG_124M` below; every module takes that
same dict and reads the keys it needs. Which keys exist, their defaults and their checks are in
utils/config.py. This module knows nothing of Mixture-of-Experts layers: utils/moe_gpt.py builds on it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import validate_gpt_config

GPT_CONFIG_124M = {
    "vocab_size": 50257,     # GPT-2 BPE vocabulary
    "context_length": 1024,  # longest input the positional embedding covers
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


# Devices on which scaled_dot_product_attention gets contiguous inputs: on MPS it has returned
# wrong values for transposed (non-contiguous) ones (pytorch/pytorch#181133).
CONTIGUOUS_SDPA_DEVICES = ("mps",)


def cached_attention_mask(start, T, device):
    """How T new tokens at positions start .. start + T - 1 attend: (attn_mask, is_causal) for
    scaled_dot_product_attention over the start + T positions of the cache so far.

    A single new token sees everything (no mask). Tokens with nothing before them (no cache, or
    an empty one) use the causal rule of the fused kernel. Otherwise new token i sees positions
    0 .. start + i: a (T, start + T) bool mask, True where it may look.
    """
    if T == 1:
        return None, False
    if start == 0:
        return None, True
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start), False


def padded_attention_mask(attention_mask, start, T):
    """How T new tokens attend when some positions hold padding: a (B, 1, T, start + T) bool mask
    for scaled_dot_product_attention, True where new token i may look at position j.

    attention_mask: (B, start + T), 1 (or True) for real tokens, 0 for padding, over every position
    so far (the cache's `start` and the T new ones). Token i sees position j when j <= start + i
    (causal) and j is a real token. A padding token also sees itself, so that no row of the softmax
    is empty (that would give NaN); no real token ever looks at it, so what it computes never
    reaches them.
    """
    S = start + T
    causal = torch.ones(T, S, dtype=torch.bool, device=attention_mask.device).tril(diagonal=start)
    visible = causal & attention_mask.bool()[:, None, None, :]                  # (B, 1, T, S)
    itself = torch.zeros(T, S, dtype=torch.bool, device=attention_mask.device)
    itself[:, start:] = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return visible | itself


def fused_attention(q, k, v, **kwargs):
    """F.scaled_dot_product_attention(q, k, v, **kwargs), with contiguous q, k, v on the devices of
    CONTIGUOUS_SDPA_DEVICES. q: (B, H, T, d), k and v: (B, H, S, d) -> (B, H, T, d)."""
    if q.device.type in CONTIGUOUS_SDPA_DEVICES:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention, all heads at once.

    x: (B, T, D) -> (B, T, D), T <= context_length. Position t attends to positions 0..t only.
    With return_weights=True the weights are computed explicitly (one batched matmul over all
    heads, the causal mask, a softmax) and returned as (B, H, T, T); otherwise PyTorch's fused
    scaled_dot_product_attention computes the same function without storing them.
    """

    def __init__(self, d_in, d_out, context_length, num_heads, dropout=0.0, qkv_bias=False):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # True above the diagonal = "future" positions that must not be seen.
        mask = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def split_heads(self, x):
        """(B, T, H * head_dim) -> (B, H, T, head_dim)"""
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, return_weights=False, cache=None, layer=0, visible=None):
        """With a KVCache, x holds only the new tokens, which come after the cache's `length`
        tokens; their keys and values are stored in the cache's slot `layer`, and they attend to
        every earlier token and to each other causally. `visible`: a (B, 1, T, S) bool mask that
        replaces the causal rule when some positions are padding (padded_attention_mask)."""
        B, T, _ = x.shape
        if T > self.mask.shape[0]:
            raise ValueError(f"sequence length {T} exceeds context_length {self.mask.shape[0]}")
        q = self.split_heads(self.W_query(x))
        k = self.split_heads(self.W_key(x))
        v = self.split_heads(self.W_value(x))
        start = 0
        if cache is not None:
            if return_weights:
                raise ValueError("return_weights is not supported with a cache")
            start = cache.length
            k, v = cache.update(layer, k, v)                             # (B, H, start + T, head_dim)
        if return_weights:
            scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)   # (B, H, T, T)
            hidden = self.mask[:T, :T] if visible is None else ~visible
            scores = scores.masked_fill(hidden, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            context = self.dropout(weights) @ v                          # (B, H, T, head_dim)
        else:
            # The same computation in one fused kernel, as nanoGPT does. Without dropout (our MoE
            # runs, evaluation, generation) it never stores the (T, T) weights; with dropout, a CPU
            # falls back to the explicit computation. Dropout acts on the weights, as above.
            causal = False
            if visible is None:
                visible, causal = cached_attention_mask(start, T, x.device)
            context = fused_attention(q, k, v, attn_mask=visible, is_causal=causal,
                                      dropout_p=self.dropout.p if self.training else 0.0)
        out = self.out_proj(context.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))  # (B, T, D)
        return (out, weights) if return_weights else out


class LayerNorm(nn.Module):
    """Normalise each token's vector to mean 0, variance 1, then scale and shift (learned)."""

    def __init__(self, emb_dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        # = scale * (x - mean) / sqrt(var + eps) + shift, with the biased variance, per token;
        # F.layer_norm computes exactly this in one kernel (tests/test_gpt.py checks it).
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU with GPT-2's tanh approximation (what `transformers` calls "gelu_new"):

        0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))

    computed by PyTorch's fused kernel for exactly this formula (a fifth faster training on a CPU
    than the five separate operations; tests/test_gpt.py checks that they agree)."""

    def forward(self, x):
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """Position-wise MLP: D -> ffn_hidden_dim -> D with GELU. x: (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg):
        super().__init__()
        hidden = cfg.get("ffn_hidden_dim") or 4 * cfg["emb_dim"]
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], hidden),
            GELU(),
            nn.Linear(hidden, cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + FFN(LN(x)). x: (B, T, D) -> (B, T, D).

    `ff` is the feed-forward module; the MoE notebooks pass a routed layer instead of FeedForward.
    """

    def __init__(self, cfg, ff=None):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
            num_heads=cfg["n_heads"], dropout=cfg.get("drop_rate", 0.0), qkv_bias=cfg.get("qkv_bias", False),
        )
        self.ff = FeedForward(cfg) if ff is None else ff
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_resid = nn.Dropout(cfg.get("drop_rate", 0.0))

    def forward(self, x, cache=None, layer=0, visible=None):
        x = x + self.drop_resid(self.att(self.norm1(x), cache=cache, layer=layer, visible=visible))
        x = x + self.drop_resid(self.ff(self.norm2(x)))
        return x


def kv_cache_shape(cfg):
    """What a KV cache of the GPT of a validated config holds (utils.generation.KVCache): per layer
    and position, kv_heads keys and values of head_size numbers each, for up to `positions`
    positions. Full multi-head attention: one key/value head per query head."""
    return {"n_layers": cfg["n_layers"], "kv_heads": cfg["n_heads"], "head_size": cfg["emb_dim"] // cfg["n_heads"],
            "positions": cfg["context_length"]}


class GPTModel(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size).

    Every block has the dense FeedForward, unless `feedforward` is given: a function that returns
    the feed-forward module of block `layer` (0-based). utils.moe_gpt.MoEGPTModel passes one that
    returns routed MoE layers, and its own `validate_config` for the keys they read; this module
    knows nothing about them.
    """

    validate_config = staticmethod(validate_gpt_config)

    def __init__(self, cfg, feedforward=None):
        super().__init__()
        cfg = self.validate_config(cfg)
        if feedforward is None:
            feedforward = lambda layer: FeedForward(cfg)  # noqa: E731
        self.cfg = cfg
        self.kv_cache_shape = kv_cache_shape(cfg)

        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg, feedforward(i)) for i in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, idx, cache=None, attention_mask=None):
        """idx: (B, T) -> logits (B, T, V). With a KVCache (see KVCache), idx holds only the tokens
        that follow the cache's `length` tokens; the cache then grows by T. attention_mask:
        (B, cached + T), 1 for real tokens and 0 for padding (new_positions, padded_attention_mask)."""
        positions = new_positions(idx, cache, self.cfg["context_length"], attention_mask)
        visible = None if attention_mask is None else padded_attention_mask(attention_mask, positions_start(cache),
                                                                            idx.shape[1])
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(positions))  # (B, T, D)
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, cache=cache, layer=layer, visible=visible)
        if cache is not None:
            cache.length += idx.shape[1]
        return self.out_head(self.final_norm(x))                          # (B, T, V)


def positions_start(cache):
    """How many positions come before the new tokens: the cache's length (0 without a cache)."""
    return 0 if cache is None else cache.length


def new_positions(idx, cache, context_length, attention_mask=None):
    """The positions of the new tokens idx (B, T): (T,) 0 .. T-1, or after the cache's `length`
    tokens. Raises a ValueError for no tokens, or for more positions than context_length.

    With an attention_mask (B, cached + T) of 1 for real tokens and 0 for padding, each row counts
    only its real tokens: (B, T) positions, so a left-padded prompt gets the positions it has alone
    (a padding token gets position 0; nothing looks at it).
    """
    T = idx.shape[1]
    start = positions_start(cache)
    if T == 0:
        raise ValueError(f"idx must hold at least one token per sequence, got shape {tuple(idx.shape)}")
    if start + T > context_length:
        raise ValueError(f"sequence length {start + T} ({start} cached + {T} new) exceeds "
                         f"context_length {context_length}")
    if attention_mask is None:
        return torch.arange(start, start + T, device=idx.device)
    if tuple(attention_mask.shape) != (idx.shape[0], start + T):
        raise ValueError(f"attention_mask must have shape (batch, cached + new tokens) = {(idx.shape[0], start + T)}, "
                         f"got {tuple(attention_mask.shape)}")
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, start:]
