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

from .config import is_count, validate_gpt_config

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

    def forward(self, x, return_weights=False, cache=None, layer=0):
        """With a KVCache, x holds only the new tokens, which come after the cache's `length`
        tokens; their keys and values are stored in the cache's slot `layer`, and they attend to
        every earlier token and to each other causally."""
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
            scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            context = self.dropout(weights) @ v                          # (B, H, T, head_dim)
        else:
            # The same computation in one fused kernel, as nanoGPT does. Without dropout (our MoE
            # runs, evaluation, generation) it never stores the (T, T) weights; with dropout, a CPU
            # falls back to the explicit computation. Dropout acts on the weights, as above.
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

    def forward(self, x, cache=None, layer=0):
        x = x + self.drop_resid(self.att(self.norm1(x), cache=cache, layer=layer))
        x = x + self.drop_resid(self.ff(self.norm2(x)))
        return x


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
        # What a KVCache for this model holds: per layer and position, kv_heads keys and values of
        # head_size numbers each, for up to `positions` positions.
        self.kv_cache_shape = {"n_layers": cfg["n_layers"], "kv_heads": cfg["n_heads"],
                               "head_size": cfg["emb_dim"] // cfg["n_heads"], "positions": cfg["context_length"]}

        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg, feedforward(i)) for i in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, idx, cache=None):
        """idx: (B, T) -> logits (B, T, V). With a KVCache (see KVCache), idx holds only the tokens
        that follow the cache's `length` tokens; the cache then grows by T."""
        positions = new_positions(idx, cache, self.cfg["context_length"])
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(positions))  # (B, T, D)
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, cache=cache, layer=layer)
        if cache is not None:
            cache.length += idx.shape[1]
        return self.out_head(self.final_norm(x))                          # (B, T, V)


def new_positions(idx, cache, context_length):
    """The positions (T,) of the new tokens idx (B, T): 0 .. T-1, or after the cache's `length`
    tokens. Raises a ValueError for no tokens, or for more positions than context_length."""
    T = idx.shape[1]
    start = 0 if cache is None else cache.length
    if T == 0:
        raise ValueError(f"idx must hold at least one token per sequence, got shape {tuple(idx.shape)}")
    if start + T > context_length:
        raise ValueError(f"sequence length {start + T} ({start} cached + {T} new) exceeds "
                         f"context_length {context_length}")
    return torch.arange(start, start + T, device=idx.device)


class KVCache:
    """The keys and values of every token a model has seen so far, in every layer, so that
    generating one more token computes attention for that token only.

    Without a cache, each new token re-runs the whole sequence through every layer. The keys and
    values of earlier tokens never change (causal attention: a token never sees later ones), so
    they can be kept: keys[layer] and values[layer] are (B, H, max_length, head_dim) tensors,
    allocated once, of which the first `length` positions are filled. `shape` is what the model
    says it needs, its `kv_cache_shape`: {"n_layers", "kv_heads", "head_size", "positions"}
    (grouped-query attention, utils/modern.py, keeps fewer key/value heads than query heads).
    max_length defaults to the model's context length; generate() asks for just the prompt plus
    the new tokens (a real model's context of 128K tokens would otherwise take gigabytes before
    the first token).
    """

    def __init__(self, shape, batch_size, device=None, dtype=torch.float32, max_length=None):
        size = (batch_size, shape["kv_heads"], max_length or shape["positions"], shape["head_size"])
        self.keys = [torch.zeros(size, device=device, dtype=dtype) for _ in range(shape["n_layers"])]
        self.values = [torch.zeros(size, device=device, dtype=dtype) for _ in range(shape["n_layers"])]
        self.length = 0

    def update(self, layer, k, v):
        """Store the new tokens' k, v (B, H, T, head_dim) of `layer` after the cached ones (the model
        advances `length` once all layers are done); return all keys and values so far."""
        end = self.length + k.shape[2]
        if k.dtype != self.keys[layer].dtype or k.device != self.keys[layer].device:
            raise ValueError(f"the cache holds {self.keys[layer].dtype} on {self.keys[layer].device}, the model "
                             f"gives {k.dtype} on {k.device}: build the cache with the model's dtype and device")
        if end > self.keys[layer].shape[2]:
            raise ValueError(f"the cache holds {self.keys[layer].shape[2]} positions, {end} needed")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def nbytes(self):
        """Bytes the cache occupies (all positions, filled or not)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, generator=None,
             use_cache=True, stop=None):
    """Append up to `max_new_tokens` tokens to idx (B, T) and return the longer (B, T') tensor.

    temperature 0 picks the most likely token (greedy). temperature > 0 samples from
    softmax(logits / temperature), restricted to the `top_k` most likely tokens when given.
    A row that has produced `eos_id` is finished: every later position of it holds eos_id. With an
    eos_id, the loop stops early once `stop(finished)` is true, finished being the (B,) bool tensor
    of finished rows; the default stop is "every row has finished". A model whose layers span
    several processes says how they agree to stop: a module with a `decoding_stop()` method gives
    the default stop (utils/parallel.py: all ranks keep stepping until every rank is done).
    Pass a seeded `torch.Generator` for reproducible samples.

    use_cache=True keeps every layer's keys and values in a KVCache: the prompt is processed once
    (prefill), then each step runs only the newest token (decode). It gives the same tokens as
    use_cache=False, which re-runs the whole sequence every step. Beyond context_length the model
    sees the last context_length tokens (a sliding window): every token then shifts position at
    each step, so the whole window is recomputed, cache or not. (With the GPT's learned absolute
    positions this is required; with RoPE, utils/modern.py, it keeps the two paths identical.)
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be a (batch, tokens) tensor holding at least one prompt token per row, "
                         f"got shape {tuple(idx.shape)}")
    if not is_count(max_new_tokens):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.cfg["vocab_size"]:
        raise ValueError(f"top_k must be in [1, vocab_size={model.cfg['vocab_size']}], got {top_k}")
    if use_cache and idx.shape[1] <= model.cfg["context_length"]:
        # A module that cannot decode token by token says why (an MoE layer with a capacity limit).
        problems = [m.cached_decoding_problem() for m in model.modules() if hasattr(m, "cached_decoding_problem")]
        problems = [p for p in problems if p is not None]
        if problems:
            raise ValueError(problems[0])
    if stop is None:
        agreed = [m.decoding_stop() for m in model.modules() if hasattr(m, "decoding_stop")]
        stop = agreed[0] if agreed else (lambda finished: bool(finished.all()))
    was_training = model.training
    model.eval()
    try:
        return _generate_loop(model, idx, max_new_tokens, temperature, top_k, eos_id, generator, use_cache, stop)
    finally:
        model.train(was_training)                    # restored even when the model raises


def _generate_loop(model, idx, max_new_tokens, temperature, top_k, eos_id, generator, use_cache, stop):
    """The decoding loop of generate (in eval mode, arguments checked)."""
    context_length = model.cfg["context_length"]
    cache = None
    if use_cache and idx.shape[1] <= context_length:
        cache = KVCache(model.kv_cache_shape, idx.shape[0], idx.device, next(model.parameters()).dtype,
                        max_length=min(context_length, idx.shape[1] + max_new_tokens))
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        if cache is not None and idx.shape[1] <= context_length:
            logits = model(idx[:, cache.length:], cache=cache)[:, -1, :]   # prefill, then one token per step
        else:
            cache = None                                                 # the window slides: recompute it
            logits = model(idx[:, -context_length:])[:, -1, :]           # (B, V)
        if temperature == 0.0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth_best, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished[:, None], eos_id)     # a finished row only pads
            finished |= next_id.squeeze(1) == eos_id
        idx = torch.cat([idx, next_id], dim=1)
        if eos_id is not None and stop(finished):
            break
    return idx
