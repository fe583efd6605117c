"""What a trained MoE's routing shows: which experts each domain's tokens use, and whether the
difference comes from the context or just from which tokens each domain contains; and, with the
experts split over W processes (utils/parallel.py), how many assignments each process receives
and to how many processes each token must travel.

Shapes: L = MoE layers, N = tokens, k = top-k, E = experts.
"""
import torch

from .config import is_count
from .moe import moe_layers


@torch.no_grad()
def route_tokens(model, token_ids, context_length, batch_size=8):
    """Route a token stream through the model: (tokens (N,), chosen experts (L, N, k)).

    Runs the model in eval mode over non-overlapping windows of `token_ids` (1-D); the last
    partial window is left out.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = (len(token_ids) - 1) // context_length
    windows = token_ids[:n * context_length].view(n, context_length)
    chosen = []
    for batch in windows.split(batch_size):
        model(batch.to(device))
        chosen.append(torch.stack([layer.last_routing["topk_idx"].cpu() for layer in layers]))
    model.train(was_training)
    return windows.reshape(-1), torch.cat(chosen, dim=1)


def expert_shares(chosen, num_experts):
    """Share of the assignments each expert receives, per layer: (L, N, k) -> (L, E)."""
    counts = torch.stack([torch.bincount(layer.reshape(-1), minlength=num_experts) for layer in chosen]).float()
    return counts / counts.sum(-1, keepdim=True)


def tv_distance(p, q):
    """Total-variation distance 0.5 * sum |p - q| over the last dimension (0: same, 1: disjoint)."""
    return 0.5 * (p - q).abs().sum(-1)


def _expert_counts_by_token(tokens, chosen, vocab_size, num_experts):
    """(L, vocab_size, E): how often each token type was sent to each expert."""
    L, N, k = chosen.shape
    flat = tokens.repeat_interleave(k) * num_experts + chosen.reshape(L, N * k)     # (L, N*k) bins
    counts = torch.zeros(L, vocab_size * num_experts)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float))
    return counts.view(L, vocab_size, num_experts)


def token_matched_shares(tokens_a, chosen_a, tokens_b, chosen_b, vocab_size, num_experts):
    """Expert shares of two token streams, with the token types' mix made equal.

    A plain comparison of two domains' expert shares mixes two effects: the domains contain
    different tokens (and a router may simply route each token type its own way), and the same
    token may be routed differently in a different context. Here only token types present in both
    streams count, each weighted by min(count in a, count in b) in both: what remains of the
    difference is routing by context. Returns (shares_a, shares_b), each (L, E).
    """
    by_token_a = _expert_counts_by_token(tokens_a, chosen_a, vocab_size, num_experts)
    by_token_b = _expert_counts_by_token(tokens_b, chosen_b, vocab_size, num_experts)
    n_a = torch.bincount(tokens_a, minlength=vocab_size).float()
    n_b = torch.bincount(tokens_b, minlength=vocab_size).float()
    weight = torch.minimum(n_a, n_b)                                           # 0 unless in both
    shares = []
    for by_token in (by_token_a, by_token_b):
        per_type = by_token / by_token.sum(-1, keepdim=True).clamp_min(1)        # p(expert | token type)
        mixed = (per_type * (weight / weight.sum())[:, None]).sum(1)             # (L, E)
        shares.append(mixed / mixed.sum(-1, keepdim=True))
    return shares[0], shares[1]


def _expert_ranks(topk_idx, num_experts, world_size):
    """The rank holding each chosen expert when num_experts experts are split evenly and in order
    over world_size ranks: topk_idx (any shape) -> the same shape. Checks the arguments."""
    for name, value in (("num_experts", num_experts), ("world_size", world_size)):
        if not is_count(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_experts % world_size:
        raise ValueError(f"num_experts must be a positive multiple of world_size ({world_size}): every rank "
                         f"holds the same number of experts, got num_experts={num_experts}")
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.is_floating_point() or topk_idx.is_complex() \
            or topk_idx.dtype == torch.bool:
        raise ValueError(f"topk_idx must be an integer tensor of expert ids, got "
                         f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)}")
    if topk_idx.numel() and (topk_idx.min() < 0 or topk_idx.max() >= num_experts):
        raise ValueError(f"topk_idx must hold expert ids in [0, num_experts={num_experts}), got values from "
                         f"{topk_idx.min().item()} to {topk_idx.max().item()}")
    return topk_idx.long() // (num_experts // world_size)


def rank_loads(topk_idx, num_experts, world_size):
    """Assignments each rank receives when experts are split evenly and in order over world_size
    ranks: topk_idx (N, k) (any shape: every entry is one assignment) -> (world_size,) counts.
    num_experts must be a positive multiple of world_size."""
    ranks = _expert_ranks(topk_idx, num_experts, world_size)
    return torch.bincount(ranks.reshape(-1), minlength=world_size)


def destination_ranks(topk_idx, num_experts, world_size):
    """How many distinct ranks each token's experts live on: topk_idx (N, k) -> (N,). A token must be
    sent to each of them once, at least; the plain all-to-all sends it once per chosen expert.
    num_experts must be a positive multiple of world_size."""
    ranks = _expert_ranks(topk_idx, num_experts, world_size)             # (N, k)
    if ranks.dim() != 2:
        raise ValueError(f"topk_idx must be (tokens, k), got shape {tuple(topk_idx.shape)}")
    return torch.nn.functional.one_hot(ranks, world_size).amax(1).sum(-1)
