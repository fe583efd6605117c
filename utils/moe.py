"""Routed Mixture-of-Experts feed-forward layers.

A dense FeedForward sends every token through one MLP. A Mixture-of-Experts (MoE) layer holds
`num_experts` MLPs ("experts") and a router that picks `num_experts_per_tok` (top-k) of them per
token; the token's output is the gate-weighted sum of its chosen experts' outputs. Total parameters
grow with the number of experts; the compute per token grows only with top-k.

Shapes: B = batch, T = sequence, D = emb_dim, N = B*T tokens, E = num_experts, k = top-k,
H = moe_hidden_dim, A = number of (token, expert) assignments (N*k, fewer if some are dropped).

The config keys of the MoE layers, their defaults and their checks are in utils/config.py; the
router and the balancing losses are in utils/router.py, the experts and the dispatch in
utils/experts.py; utils/moe_gpt.py puts these layers into the GPT. To use the layer in another
project, copy config.py, router.py, experts.py and this file into one package folder: they need
nothing else but torch.
"""
import math
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CAPACITY_PRIORITIES, is_count, shared_expert_hidden, validate_moe_config
from .experts import (DISPATCH, Experts, check_grouped_mm, dispatch_few, dispatch_grouped, dispatch_sorted,
                      prefers_grouped_mm)
from .router import TopKRouter, load_balancing_loss, router_z_loss, routing_stats, sequence_balance_loss

# The (token, expert, gate) assignments the experts serve: token_idx, expert_idx, gate, each (A,),
# and keep, the (N, k) bool mask of the router's choices within capacity (None when dropless).
Assignments = namedtuple("Assignments", ["token_idx", "expert_idx", "gate", "keep"])


def fine_grained(cfg, m):
    """DeepSeekMoE's fine-grained segmentation: split every expert into m experts of 1/m the width
    and route to m times as many. The expert weight matrices keep their total and active sizes;
    the router grows from E to m*E outputs (and "gelu" experts gain output biases). Shared
    experts are not routed and keep their width."""
    cfg = validate_moe_config(cfg)
    if not is_count(m) or m < 1 or cfg["moe_hidden_dim"] % m != 0:
        raise ValueError(f"m must be a positive integer dividing moe_hidden_dim ({cfg['moe_hidden_dim']}), got {m!r}")
    shared = shared_expert_hidden(cfg)
    return {**cfg, "num_experts": cfg["num_experts"] * m, "num_experts_per_tok": cfg["num_experts_per_tok"] * m,
            "moe_hidden_dim": cfg["moe_hidden_dim"] // m, "shared_expert_hidden_dim": shared or None}


def _first_served(queues, num_experts, capacity):
    """queues: (P, A) expert ids, each row a pool in serving order -> (P, A) bool: is the
    assignment among the first `capacity` its expert receives in that pool?"""
    one_hot = F.one_hot(queues, num_experts)                             # (P, A, E)
    arrivals = (one_hot.cumsum(1) * one_hot).sum(-1) - 1                 # 0 for an expert's first arrival
    return arrivals < capacity


def capacity_keep_mask(topk_idx, num_experts, capacity, priority="position"):
    """Which assignments fit in their expert's capacity: a bool mask of topk_idx's shape.

    topk_idx: (B, T, k) the experts chosen by each token of B sequences ((T, k): one sequence).
    Every expert serves at most `capacity` assignments from each pool, first come first served;
    the priority decides the pools and the serving order:

    "position"  each sequence is its own pool, served token by token: all k choices of token t
                before any choice of token t+1. Whether token t keeps an assignment depends only
                on the choices of tokens 0..t of its own sequence, so the layer stays causal.
    "gshard"    the whole batch is one pool, served choice by choice (GShard, Switch): the first
                choices of all B*T tokens, in token order, then all second choices, and so on. A
                token's second choice can be pushed out by a *later* token's first choice.
    """
    if priority not in CAPACITY_PRIORITIES:
        raise ValueError(f"priority must be one of {CAPACITY_PRIORITIES}, got {priority!r}")
    k = topk_idx.shape[-1]
    if topk_idx.numel() == 0:
        return torch.ones_like(topk_idx, dtype=torch.bool)
    if priority == "position":
        T = topk_idx.shape[-2]
        queues = topk_idx.reshape(-1, T * k)                             # (B, T*k): token-major per sequence
        return _first_served(queues, num_experts, capacity).reshape(topk_idx.shape)
    by_choice = topk_idx.reshape(-1, k).T.reshape(1, -1)                 # (1, k*N): choice-major, whole batch
    keep = _first_served(by_choice, num_experts, capacity)
    return keep.reshape(k, -1).T.reshape(topk_idx.shape)


class MoEFeedForward(nn.Module):
    """A routed MoE that replaces FeedForward: (B, T, D) -> (B, T, D).

    output = sum over the token's chosen experts of gate * expert(x)  [+ shared expert(x)]

    After each forward pass:
      self.aux_loss      the weighted balancing losses (a tensor), which utils.train.train adds
                         to the language-model loss (a plain training loop adds it itself:
                         loss = loss + sum(m.aux_loss for m in model.modules()
                                           if isinstance(m, MoEFeedForward)));
                         None after a pass without autograd (torch.no_grad: evaluation,
                         generation), which trains nothing and skips them;
      self.last_routing  detached statistics of that batch (see routing_stats).

    How the assignments reach the experts: self.dispatch, dispatch_sorted by default (or the
    config's "loop" / "grouped", utils/experts.py). The default hands over by itself to the decode
    path, dispatch_few, for a few tokens without autograd (serves_few), and to dispatch_grouped
    for bfloat16 on recent NVIDIA GPUs (prefers_grouped_mm).

    Expert parallelism (utils/parallel.py) changes two parts of the layer and nothing else:
      self.dispatch        how the assignments reach the experts and come back combined
                           (an exchange between processes, never replaced by the paths above);
      self.sum_over_ranks  None here; a sum over the processes that share the batch, so that the
                           balancing losses are those of the whole batch (see utils/router.py).
    """

    def __init__(self, cfg, expert_dim=None):
        super().__init__()
        cfg = validate_moe_config(cfg)
        D = cfg["emb_dim"]
        self.num_experts = cfg["num_experts"]
        self.top_k = cfg["num_experts_per_tok"]
        self.aux_loss_coef = cfg["aux_loss_coef"]
        self.seq_aux_loss_coef = cfg["seq_aux_loss_coef"]
        self.z_loss_coef = cfg["z_loss_coef"]
        self.bias_update_rate = cfg["bias_update_rate"]
        self.capacity_factor = cfg["capacity_factor"]
        self.capacity_priority = cfg["capacity_priority"]
        if cfg["moe_dispatch"] == "grouped":
            check_grouped_mm()
        self.dispatch = DISPATCH[cfg["moe_dispatch"]]
        self.sum_over_ranks = None
        self.router = TopKRouter(D, self.num_experts, self.top_k, cfg["router_type"], cfg["norm_topk_prob"],
                                 cfg["routed_scaling_factor"], cfg["n_group"], cfg["topk_group"])
        # The experts' own dimension: emb_dim, or a smaller latent size in LatentMoE.
        self.experts = Experts(self.num_experts, expert_dim or D, cfg["moe_hidden_dim"], cfg["expert_type"])
        shared_hidden = shared_expert_hidden(cfg)
        self.shared_expert = Experts(1, D, shared_hidden, cfg["expert_type"]) if shared_hidden else None
        self.shared_expert_gate = nn.Linear(D, 1, bias=False) if shared_hidden and cfg["shared_expert_gate"] else None
        self.aux_loss = None
        self._routing = None

    def to_experts(self, x):
        """Map token vectors into the experts' space (the identity here; LatentMoE projects down)."""
        return x

    def from_experts(self, y):
        """Map the combined expert output back to emb_dim (the identity here)."""
        return y

    def capacity(self, num_tokens):
        """Assignments each expert may take from a pool of num_tokens tokens (None when dropless):
        ceil(capacity_factor * num_tokens * k / E). The pool is one sequence (num_tokens = T) for
        capacity_priority "position", the whole batch (B*T) for "gshard". Either way it depends
        on the input's length T: a prefix fed alone gets a smaller capacity than inside a longer
        input."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def cached_decoding_problem(self):
        """Why this layer cannot decode token by token with a KV cache (None: it can). A capacity is
        shared by the tokens of one forward pass, so one token at a time would drop other
        assignments than the whole sequence does. utils.generation.generate asks every module."""
        if self.capacity_factor is None:
            return None
        return (f"use_cache=True needs dropless MoE layers, but a layer has capacity_factor="
                f"{self.capacity_factor}: set it to None or pass use_cache=False")

    def assignments(self, route, B, T):
        """The Assignments the experts serve, from a RouterOutput of B*T tokens: every one of the
        N*k choices, or, with a capacity factor, those within capacity."""
        N, k = route.topk_idx.shape
        token_idx = torch.arange(N * k, device=route.topk_idx.device) // k   # token of each assignment
        assigned = token_idx, route.topk_idx.reshape(-1), route.topk_weight.reshape(-1)
        if self.capacity_factor is None:
            return Assignments(*assigned, None)
        pool = T if self.capacity_priority == "position" else N
        keep = capacity_keep_mask(route.topk_idx.view(B, T, k), self.num_experts, self.capacity(pool),
                                  self.capacity_priority).view(N, k)
        return Assignments(*(a[keep.reshape(-1)] for a in assigned), keep)

    def add_shared_expert(self, flat, out):
        """out + the shared expert's output on flat (N, D) (gated when the config asks): (N, D)."""
        if self.shared_expert is None:
            return out
        shared = self.shared_expert.as_mlp(flat)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
        return out + shared

    def balancing_loss(self, route, batch_size):
        """The weighted sum of the layer's balancing losses for a RouterOutput of batch_size
        sequences (over the whole batch, through sum_over_ranks, under expert parallelism)."""
        sums = self.sum_over_ranks
        loss = self.aux_loss_coef * load_balancing_loss(route.probs, route.topk_idx, sums)
        if self.seq_aux_loss_coef > 0:
            loss = loss + self.seq_aux_loss_coef * sequence_balance_loss(route.probs, route.topk_idx, batch_size, sums)
        if self.z_loss_coef > 0:
            loss = loss + self.z_loss_coef * router_z_loss(route.logits, sums)
        return loss

    def serves_few(self, topk_idx, grad_enabled):
        """Whether this forward pass takes the decode path, dispatch_few: no autograd, a dropless
        layer in one process (the default dispatch), and fewer choices than experts (N * k <= E:
        a decode step of a small batch). Otherwise every expert's share of the work is sorted
        out once (dispatch_sorted), which costs a fixed few dozen small operations per layer: at
        batch 1 of a small model, more time than the experts' own matmuls."""
        return (not grad_enabled and self.dispatch is dispatch_sorted and self.capacity_factor is None
                and topk_idx.numel() <= self.num_experts)

    def forward(self, x):
        """x: (B, T, D) -> (B, T, D); also sets self.aux_loss and the routing of last_routing."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)                                           # (N, D)
        route = self.router(flat)
        grad_enabled = torch.is_grad_enabled()
        if self.serves_few(route.topk_idx, grad_enabled):
            routed, keep = dispatch_few(self.to_experts(flat), route.topk_idx, route.topk_weight, self.experts), None
        else:
            assigned = self.assignments(route, B, T)
            dispatch = self.dispatch
            if dispatch is dispatch_sorted and prefers_grouped_mm(x, self.experts):
                dispatch = dispatch_grouped
            routed = dispatch(self.to_experts(flat), assigned.token_idx, assigned.expert_idx, assigned.gate,
                              self.experts)
            keep = assigned.keep
        out = self.add_shared_expert(flat, self.from_experts(routed))
        # Without autograd (evaluation, generation) nothing is trained: the balancing losses are skipped.
        self.aux_loss = self.balancing_loss(route, B) if grad_enabled else None
        self._routing = (route.probs.detach(), route.topk_idx.detach(), keep)
        return out.reshape(B, T, D)

    @property
    def last_routing(self):
        """routing_stats of the last forward pass (None before the first), computed when read."""
        return routing_stats(*self._routing) if self._routing is not None else None


class LatentMoE(MoEFeedForward):
    """Latent MoE (NVIDIA Nemotron 3): the routed experts work in a smaller space of latent_dim.

    The router and the shared expert see the full x (dimension D). One down-projection D -> l,
    shared by all experts, is applied before dispatch; each expert maps l -> hidden -> l; the
    gate-weighted combination happens in l; one up-projection l -> D follows; then the shared
    expert's output is added. Expert weights and the bytes sent to the experts shrink by D / l.
    With latent_dim None it is exactly MoEFeedForward.
    """

    def __init__(self, cfg):
        cfg = validate_moe_config(cfg)
        super().__init__(cfg, expert_dim=cfg["latent_dim"])
        latent = cfg["latent_dim"]
        self.down_proj = nn.Linear(cfg["emb_dim"], latent, bias=False) if latent else None
        self.up_proj = nn.Linear(latent, cfg["emb_dim"], bias=False) if latent else None
        if latent:
            # Semi-orthogonal start: the projections neither shrink nor blow up the vectors, so the
            # experts see inputs of the same scale as in a plain MoE (nn.Linear's default would
            # shrink the signal's variance by about 3x, its size by sqrt(3), in each projection).
            nn.init.orthogonal_(self.down_proj.weight)
            nn.init.orthogonal_(self.up_proj.weight)

    def to_experts(self, x):
        return x if self.down_proj is None else self.down_proj(x)

    def from_experts(self, y):
        return y if self.up_proj is None else self.up_proj(y)


def make_moe(cfg):
    """The MoE layer a config asks for: LatentMoE when it sets latent_dim, else MoEFeedForward."""
    return LatentMoE(cfg) if cfg.get("latent_dim") else MoEFeedForward(cfg)


def moe_layers(model):
    """The MoE layers (MoEFeedForward, including LatentMoE) of a model, in order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]
