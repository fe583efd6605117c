"""Generating text: the KV cache, and the decoding loop (greedy or sampled) with or without it.

A model generates one token per step: it reads the sequence so far, turns its last position's
logits into the next token (the most likely one, or a sample), appends it and goes on. With a KV
cache it keeps every layer's keys and values, so a step computes only the newest token. Works for
every model of the course (utils/gpt.py, utils/moe_gpt.py, utils/modern.py): it asks the model how
big a cache to allocate (`kv_cache_shape`) and its modules whether they can decode token by token.
"""
import torch

from .config import is_count


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


def check_cached_decoding(model):
    """Raise a ValueError if a module of the model cannot decode token by token with a KV cache;
    such a module says why in a `cached_decoding_problem()` method (an MoE layer with a capacity
    limit: one token at a time would drop other assignments than the whole sequence does)."""
    problems = cached_decoding_problems(model)
    if problems:
        raise ValueError(problems[0])


def cached_decoding_problems(model):
    """What each module that cannot decode token by token says about it (an empty list: none can't)."""
    problems = [m.cached_decoding_problem() for m in model.modules() if hasattr(m, "cached_decoding_problem")]
    return [p for p in problems if p is not None]


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, generator=None,
             use_cache=True, stop=None, suppress_ids=None, attention_mask=None):
    """Append up to `max_new_tokens` tokens to idx (B, T) and return the longer (B, T') tensor.

    temperature 0 picks the most likely token (greedy). temperature > 0 samples from
    softmax(logits / temperature), restricted to the `top_k` most likely tokens when given.
    A row that has produced `eos_id` is finished: every later position of it holds eos_id. With an
    eos_id, the loop stops early once `stop(finished)` is true, finished being the (B,) bool tensor
    of finished rows; the default stop is "every row has finished". A model whose layers span
    several processes says how they agree to stop: a module with a `decoding_stop()` method gives
    the default stop (utils/parallel.py: all ranks keep stepping until every rank is done).
    Pass a seeded `torch.Generator` for reproducible samples. `suppress_ids` (a list of token ids)
    are never produced: their logits are set to -inf before choosing, e.g. a compact vocabulary's
    rare id, which stands for many tokens and decodes to the replacement character.

    attention_mask: (B, T), 1 for the prompt's real tokens and 0 for padding, for prompts of
    different lengths in one batch. The padding must be on the left (every row ends with its
    prompt, so all rows append their next token in the same column). Each row then gets exactly
    the tokens it gets alone (greedy; up to float rounding, which batching may change in the last
    bits): padding takes no position and no token looks at it. MoE layers must be dropless, or
    padding would take capacity from real tokens.

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
    suppress_ids = list(suppress_ids or ())
    if any(not is_count(i) or i >= model.cfg["vocab_size"] for i in suppress_ids):
        raise ValueError(f"suppress_ids must be token ids in [0, vocab_size={model.cfg['vocab_size']}), "
                         f"got {suppress_ids}")
    if len(set(suppress_ids)) >= model.cfg["vocab_size"]:
        raise ValueError("suppress_ids must leave at least one token id that can be produced")
    attention_mask = check_left_padding(model, idx, attention_mask)
    if use_cache and idx.shape[1] <= model.cfg["context_length"]:
        check_cached_decoding(model)
    if stop is None:
        agreed = [m.decoding_stop() for m in model.modules() if hasattr(m, "decoding_stop")]
        stop = agreed[0] if agreed else (lambda finished: bool(finished.all()))
    was_training = model.training
    model.eval()
    try:
        return _generate_loop(model, idx, max_new_tokens, temperature, top_k, eos_id, generator, use_cache, stop,
                              suppress_ids, attention_mask)
    finally:
        model.train(was_training)                    # restored even when the model raises


def check_left_padding(model, idx, attention_mask):
    """The attention_mask of generate as a bool tensor, or None when it masks nothing. Raises a
    ValueError unless it is a (B, T) mask of idx's shape, of 0/1 values, padding on the left only
    (each row: zeros, then ones, ending with a real token), for a model whose MoE layers are
    dropless."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(idx.shape):
        raise ValueError(f"attention_mask must have idx's shape {tuple(idx.shape)}, got {tuple(attention_mask.shape)}")
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError("attention_mask must hold 0 (padding) or 1 (a real token) only")
    mask = attention_mask.bool().to(idx.device)
    if not mask[:, -1].all() or (mask[:, 1:].long() < mask[:, :-1].long()).any():
        raise ValueError("attention_mask must pad on the left: each row zeros first, then ones, ending with a "
                         "real token (left-pad prompts of different lengths)")
    if mask.all():
        return None
    if cached_decoding_problems(model):           # the same limit: a capacity shared by all tokens
        raise ValueError("attention_mask with padding needs dropless MoE layers (capacity_factor=None): padding "
                         "tokens would take capacity from real ones")
    return mask


def _generate_loop(model, idx, max_new_tokens, temperature, top_k, eos_id, generator, use_cache, stop,
                   suppress_ids=(), mask=None):
    """The decoding loop of generate (in eval mode, arguments checked; mask: None or (B, T) bool)."""
    context_length = model.cfg["context_length"]
    cache = None
    if use_cache and idx.shape[1] <= context_length:
        cache = KVCache(model.kv_cache_shape, idx.shape[0], idx.device, next(model.parameters()).dtype,
                        max_length=min(context_length, idx.shape[1] + max_new_tokens))
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        padding = {} if mask is None else {"attention_mask": mask[:, -context_length:]}
        if cache is not None and idx.shape[1] <= context_length:
            logits = model(idx[:, cache.length:], cache=cache, **padding)[:, -1, :]   # prefill, then one token per step
        else:
            cache = None                                                 # the window slides: recompute it
            logits = model(idx[:, -context_length:], **padding)[:, -1, :]            # (B, V)
        if suppress_ids:
            logits = logits.index_fill(-1, torch.tensor(suppress_ids, device=logits.device), float("-inf"))
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
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if eos_id is not None and stop(finished):
            break
    return idx
