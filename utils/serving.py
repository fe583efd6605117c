"""Serving an MoE: how many experts a batch of decode steps touches, and which weights a decode
step must read.

Generating text runs one token per sequence per step (decode). Each step multiplies a few vectors
by every weight matrix it uses, so on a GPU its time is bounded by reading those weights from
memory, not by arithmetic. A dense model reads all its weights every step. An MoE reads its
non-expert weights plus the experts its tokens chose: k experts per layer for one sequence, nearly
all E for a large batch, where each sequence's token picks its own k. The weights' formats and
sizes are utils/memory.py's.

Shapes: B = batch (sequences decoded together), T = prompt length, L = MoE layers.
"""
import torch

from .config import is_count, is_moe_block, validate_model_config
from .generation import KVCache, check_cached_decoding
from .hf_config import is_hf_config, ties_word_embeddings
from .hf_moe import moe_layer_shape
from .memory import bits_per_weight
from .moe import moe_layers
from .params import count_parameters


def expected_experts_touched(num_experts, top_k, batch_size):
    """Distinct experts that batch_size tokens choose in one layer, on average, if every token picks
    its top_k experts uniformly at random and independently of the others: E * (1 - (1 - k/E)^B).

    Each expert is missed by one token with probability 1 - k/E, by all B with (1 - k/E)^B.
    Independent routing with equal loads gives the most distinct experts: unequal loads or tokens
    that agree with each other touch fewer.
    """
    for name, value in (("num_experts", num_experts), ("top_k", top_k), ("batch_size", batch_size)):
        if not is_count(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"top_k must be at most num_experts ({num_experts}), got {top_k}")
    return num_experts * (1 - (1 - top_k / num_experts) ** batch_size)


@torch.no_grad()
def experts_touched_per_step(model, token_ids, prompt_len):
    """Count the experts each decode step of a batch uses.

    token_ids: (B, T) token ids of B sequences. The first prompt_len tokens of each are prefilled
    at once; then every following token runs as one decode step (one token per sequence, with the
    KV cache), as if the model had generated the rest of the text. Returns a
    (T - prompt_len, L) tensor: the number of distinct experts the B tokens of each decode step
    chose in each MoE layer (k when B = 1).
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers")
    B, T = token_ids.shape
    if not 1 <= prompt_len < T:
        raise ValueError(f"prompt_len must be in [1, {T - 1}] (token_ids has {T} tokens per sequence), got {prompt_len}")
    if T > model.cfg["context_length"]:
        raise ValueError(f"token_ids has {T} tokens per sequence, more than context_length {model.cfg['context_length']}")
    check_cached_decoding(model)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model.kv_cache_shape, B, token_ids.device, next(model.parameters()).dtype)
        model(token_ids[:, :prompt_len], cache=cache)                    # prefill
        touched = []
        for t in range(prompt_len, T):
            model(token_ids[:, t:t + 1], cache=cache)                     # one decode step
            touched.append([layer.last_routing["topk_idx"].unique().numel() for layer in layers])
    finally:
        model.train(was_training)
    return torch.tensor(touched)


def _moe_shape(config):
    """(num_experts, top_k, number of MoE layers) of a course or Hugging Face config."""
    if is_hf_config(config):
        shape = moe_layer_shape(config)
        return shape["num_experts"], shape["top_k"], shape["moe_layers"]
    cfg = validate_model_config(config)
    n_moe = sum(is_moe_block(cfg, layer) for layer in range(cfg["n_layers"]))
    return cfg["num_experts"], cfg["num_experts_per_tok"], n_moe


def decode_step_weight_bytes(config, batch_size, fmt="bfloat16", experts_touched=None):
    """Bytes of weights one decode step of batch_size sequences reads, by part:
    {"experts": the routed experts touched, "other": every other weight, "total": both}.

    experts_touched: distinct experts per MoE layer (the average over layers); by default the
    independent-routing estimate of expected_experts_touched. Every other weight is read in full,
    except the embedding table, of which a step reads only the B rows it looks up (left out here:
    B * emb_dim values); a model whose output head is tied to the embedding reads it as the head
    (whole, once), plus whatever the head holds of its own (ERNIE 4.5's lm_head bias).
    """
    counts = count_parameters(config)["components"]
    E, k, n_moe = _moe_shape(config)
    if experts_touched is None:
        experts_touched = expected_experts_touched(E, k, batch_size) if n_moe else 0
    elif not 0 <= experts_touched <= E:
        raise ValueError(f"experts_touched must be between 0 and num_experts ({E}), got {experts_touched}")
    other = {c: n for c, n in counts.items() if c not in ("embedding", "routed_experts")}
    # Tied: the head's weight is the embedding matrix, counted under "embedding" only; "lm_head"
    # then holds the head's own parameters, if any (a bias), not its weight. Course configs never tie.
    if is_hf_config(config) and ties_word_embeddings(config):
        other["lm_head"] = other.get("lm_head", 0) + counts["embedding"]
    experts = counts.get("routed_experts", 0) * (experts_touched / E if n_moe else 0)
    result = {"experts": experts * bits_per_weight(fmt, "routed_experts") / 8,
              "other": sum(n * bits_per_weight(fmt, c) / 8 for c, n in other.items())}
    result["total"] = result["experts"] + result["other"]
    return result
