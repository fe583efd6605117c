"""The router of a Mixture-of-Experts layer, and the losses that keep its experts balanced.

A router scores every expert for every token and keeps the k best (top-k). Left alone, it tends to
send most tokens to a few experts (the others then never learn), so MoE training adds small loss
terms that reward balanced routing: the Switch-Transformer load-balancing loss, DeepSeek-V3's
sequence-wise variant and the ST-MoE z-loss. utils/moe.py builds the MoE layer from these pieces.

Shapes: N tokens, D = emb_dim, E = num_experts, k = top-k, B sequences of T tokens (N = B * T).
"""
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F


RouterOutput = namedtuple("RouterOutput", ["logits", "scores", "probs", "topk_idx", "topk_weight"])
RouterOutput.__doc__ = """What TopKRouter returns for N tokens (a tuple; unpack it or read it by name).

logits       (N, E) the router's raw outputs, x @ gate.weight.T (the z-loss reads them)
scores       (N, E) the affinities: softmax(logits) or sigmoid(logits)
probs        (N, E) the scores normalised to sum to 1 per token, for the balancing losses; for a
             softmax router they are the scores themselves (the same tensor)
topk_idx     (N, k) the chosen experts
topk_weight  (N, k) their gates: the weights of their outputs in the token's sum
"""


class TopKRouter(nn.Module):
    """Scores every expert for every token and keeps the k best: x (N, D) -> RouterOutput.

    The router runs in float32 even when the model runs in lower precision (bfloat16 weights, or
    torch.autocast), and in float64 when the model is cast to it: small differences
    between logits decide which expert wins. Its gate weight and expert_bias also stay float32
    when the model is cast with .to(torch.bfloat16) or .half() (see _apply), as transformers keeps
    DeepSeek-V3's and Nemotron-H's (their _keep_in_fp32_modules_strict): next to a bias of 0.6,
    a bfloat16 number cannot even hold a bias update of 0.001.

    scores: softmax(logits) (Mixtral, Qwen) or sigmoid(logits) (DeepSeek-V3), the affinities.
    Selection: the k best of scores + expert_bias, optionally only within the topk_group best of
    n_group expert groups. The bias (a buffer, 0 unless aux-loss-free balancing moves it) changes
    which experts are chosen, never the gate weights.
    Gates: the chosen experts' unbiased scores, renormalised to sum to 1 if norm_topk_prob, times
    routed_scaling_factor. For softmax scores, renormalising equals a softmax over just the k
    chosen logits (the denominator over all E experts cancels).
    """

    def __init__(self, emb_dim, num_experts, top_k, router_type="softmax", norm_topk_prob=True,
                 routed_scaling_factor=1.0, n_group=1, topk_group=1):
        super().__init__()
        self.top_k, self.router_type, self.norm_topk_prob = top_k, router_type, norm_topk_prob
        self.routed_scaling_factor, self.n_group, self.topk_group = routed_scaling_factor, n_group, topk_group
        self.gate = nn.Linear(emb_dim, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    def _apply(self, fn, recurse=True):
        """nn.Module applies `fn` (the cast of .to(), .half(), .cuda(), ...) to every parameter and
        buffer through this method. Here a tensor that `fn` would cast to 16 bits takes the device
        `fn` gives it and float32 instead (a float32 tensor keeps its exact values)."""
        def keep_float32(t):
            moved = fn(t)
            if t.is_floating_point() and moved.dtype in (torch.bfloat16, torch.float16):
                return t.to(device=moved.device, dtype=torch.float32)   # never below float32
            return moved                         # float64 (.double(), gradcheck) is kept: it is more precise
        return super()._apply(keep_float32, recurse)

    def select(self, scores):
        """Indices (N, k) of the chosen experts: top-k of the biased scores within the best groups."""
        biased = scores + self.expert_bias
        if self.n_group > 1:
            N, E = biased.shape
            grouped = biased.view(N, self.n_group, E // self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)               # (N, n_group)
            best_groups = group_score.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best_groups, True)
            biased = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)
        return biased.topk(self.top_k, dim=-1).indices

    def forward(self, x):
        # At least float32, whatever the input; and autocast (bfloat16 mixed precision) must not
        # lower the logits' precision either.
        weight = self.gate.weight
        dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
        if torch.is_autocast_enabled(x.device.type):      # entering the context costs microseconds per decode step
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x.to(dtype), weight.to(dtype))
        else:
            logits = F.linear(x.to(dtype), weight.to(dtype))
        if self.router_type == "softmax":
            scores = torch.softmax(logits, dim=-1)
            probs = scores
        else:
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        topk_idx = self.select(scores.detach())
        topk_weight = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        if self.routed_scaling_factor != 1.0:
            topk_weight = topk_weight * self.routed_scaling_factor
        return RouterOutput(logits, scores, probs, topk_idx, topk_weight)


# The balancing losses are means over tokens. Each is computed from sums over this process's tokens
# and their count; `sum_over_ranks`, when given, adds those up over the processes that share the
# batch (utils/parallel.py passes an all-reduce), so that the loss is the one of the whole batch.

def load_balancing_loss(probs, topk_idx, sum_over_ranks=None):
    """Switch-Transformer auxiliary loss E * sum_i f_i * P_i, with top-k.

    probs: (N, E); topk_idx: (N, k).
    f_i: the fraction of the N*k assignments that go to expert i (not differentiable);
    P_i: the mean router probability of expert i (differentiable).
    The loss is 1 for perfectly uniform routing. Its maximum is E / k: each token sends at most
    one assignment to an expert, so f_i <= 1 / k and the loss <= E / k * sum_i P_i = E / k,
    reached when every token picks the same k experts and puts all its probability on them.
    With no tokens at all it is 0 (and still part of the autograd graph).
    """
    E, k = probs.shape[-1], topk_idx.shape[-1]
    counts = torch.bincount(topk_idx.reshape(-1), minlength=E).float()   # (E,) assignments per expert
    prob_sum = probs.reshape(-1, E).sum(0)                                # (E,)
    tokens = probs.new_tensor(float(topk_idx.numel() // k))
    if sum_over_ranks is not None:
        counts, prob_sum, tokens = sum_over_ranks(counts), sum_over_ranks(prob_sum), sum_over_ranks(tokens)
    tokens = tokens.clamp_min(1.0)               # no tokens: the counts are 0, and so is the loss
    f = counts / (tokens * k)
    P = prob_sum / tokens
    return E * torch.sum(f * P)


def sequence_balance_loss(probs, topk_idx, batch_size, sum_over_ranks=None):
    """DeepSeek-V3's sequence-wise balance loss, averaged over the sequences of the batch.

    Per sequence of T tokens: f_i = E / (k T) * (assignments to expert i), P_i = mean over the
    sequence of probs[:, i]; loss = sum_i f_i * P_i (1 when balanced within the sequence).
    probs: (N, E) with N = batch_size * T; topk_idx: (N, k). 0 when there are no tokens.
    """
    N, E = probs.shape
    k = topk_idx.shape[1]
    if N == 0:
        per_sequence = probs.sum() * 0.0         # no tokens: nothing to balance
    else:
        T = N // batch_size
        counts = F.one_hot(topk_idx, E).sum(1).view(batch_size, T, E).sum(1).float()   # (B, E)
        f = counts * E / (k * T)
        P = probs.view(batch_size, T, E).mean(1)
        per_sequence = (f * P).sum(-1).sum()    # summed over the sequences
    sequences = probs.new_tensor(float(batch_size if N else 0))
    if sum_over_ranks is not None:
        per_sequence, sequences = sum_over_ranks(per_sequence), sum_over_ranks(sequences)
    return per_sequence / sequences.clamp_min(1.0)


def router_z_loss(logits, sum_over_ranks=None):
    """ST-MoE z-loss: mean squared log-sum-exp of the router logits; keeps logits small and stable.
    logits: (N, E); 0 when there are no tokens."""
    z_sum = torch.logsumexp(logits, dim=-1).pow(2).sum()
    tokens = logits.new_tensor(float(logits.shape[0]))
    if sum_over_ranks is not None:
        z_sum, tokens = sum_over_ranks(z_sum), sum_over_ranks(tokens)
    return z_sum / tokens.clamp_min(1.0)


def routing_stats(probs, topk_idx, keep=None):
    """Statistics of one batch's routing (all detached):

    tokens_per_expert (E,) assignments each expert received (after dropping),
    load_imbalance     max / mean of tokens_per_expert (1.0 is perfectly balanced),
    dropped_fraction   share of the N*k assignments dropped by the capacity limit,
    router_entropy     mean entropy of the router distribution, in nats (ln E = undecided),
    topk_idx           (N, k) the chosen experts.
    A batch without tokens (N = 0) has zero loads, imbalance 1.0, nothing dropped and entropy 0.
    """
    E = probs.shape[-1]
    keep = torch.ones_like(topk_idx, dtype=torch.bool) if keep is None else keep
    counts = torch.bincount(topk_idx[keep], minlength=E)
    p = probs.detach()
    if topk_idx.shape[0] == 0:                   # no tokens: no load, nothing dropped, nothing to decide
        return {"tokens_per_expert": counts, "load_imbalance": 1.0, "dropped_fraction": 0.0,
                "router_entropy": 0.0, "topk_idx": topk_idx.detach()}
    return {
        "tokens_per_expert": counts,
        "load_imbalance": (counts.max() / counts.float().mean()).item(),
        "dropped_fraction": 1.0 - keep.float().mean().item(),
        "router_entropy": -(p * torch.log(p.clamp_min(1e-9))).sum(-1).mean().item(),
        "topk_idx": topk_idx.detach(),
    }
