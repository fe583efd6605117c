"""Routed Mixture-of-Experts feed-forward layers.

A dense FeedForward sends every token through one MLP. A Mixture-of-Experts (MoE) layer holds
`num_experts` MLPs ("experts") and a router that picks `num_experts_per_tok` (top-k) of them per
token; the token's output is the gate-weighted sum of its chosen experts' outputs. Total parameters
grow with the number of experts; the compute per token grows only with top-k.

Shapes: B = batch, T = sequence, D = emb_dim, N = B*T tokens, E = num_experts, k = top-k,
H = moe_hidden_dim, A = number of (token, expert) assignments (N*k, fewer if some are dropped).

The config keys of the MoE layers, their defaults and their checks are in utils/config.py; the
router and the balancing losses are in utils/router.py; utils/moe_gpt.py puts these layers into
the GPT. To use the layer in another project, copy config.py, router.py and this file into one
package folder: they need nothing else but torch.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CAPACITY_PRIORITIES, EXPERT_TYPES, shared_expert_hidden, validate_moe_config
from .router import TopKRouter, load_balancing_loss, router_z_loss, routing_stats, sequence_balance_loss


def fine_grained(cfg, m):
    """DeepSeekMoE's fine-grained segmentation: split every expert into m experts of 1/m the width
    and route to m times as many. The expert weight matrices keep their total and active sizes;
    the router grows from E to m*E outputs (and "gelu" experts gain output biases). Shared
    experts are not routed and keep their width."""
    cfg = validate_moe_config(cfg)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1 or cfg["moe_hidden_dim"] % m != 0:
        raise ValueError(f"m must be a positive integer dividing moe_hidden_dim ({cfg['moe_hidden_dim']}), got {m!r}")
    shared = shared_expert_hidden(cfg)
    return {**cfg, "num_experts": cfg["num_experts"] * m, "num_experts_per_tok": cfg["num_experts_per_tok"] * m,
            "moe_hidden_dim": cfg["moe_hidden_dim"] // m, "shared_expert_hidden_dim": shared or None}


class Experts(nn.Module):
    """E independent MLPs stored as stacked weight tensors (one slice per expert). With E = 1 it
    is a plain dense MLP, which is how shared experts and dense baselines are built.

    Stacking keeps the experts in three tensors instead of 3*E modules, and is the layout that
    batched and grouped matmuls (and `transformers`) use.
    """

    decayed_parameters = ("w_in", "w_gate", "w_out")   # weight matrices; b_in, b_out are biases (utils.train)

    def __init__(self, num_experts, emb_dim, hidden_dim, expert_type="gelu"):
        super().__init__()
        if expert_type not in EXPERT_TYPES:
            raise ValueError(f"expert_type must be one of {EXPERT_TYPES}, got {expert_type!r}")
        self.expert_type = expert_type
        E, D, H = num_experts, emb_dim, hidden_dim
        self.w_in = nn.Parameter(torch.empty(E, H, D))       # like nn.Linear: (out, in) per expert
        self.w_out = nn.Parameter(torch.empty(E, D, H))
        self.w_gate = nn.Parameter(torch.empty(E, H, D)) if expert_type == "swiglu" else None
        if expert_type == "gelu":
            self.b_in = nn.Parameter(torch.zeros(E, H))
            self.b_out = nn.Parameter(torch.zeros(E, D))
        else:
            self.b_in = self.b_out = None
        self.reset_parameters()

    def reset_parameters(self):
        # The same scheme as nn.Linear, weights and biases alike: uniform(-1/sqrt(fan_in),
        # 1/sqrt(fan_in)) per expert, so a "gelu" expert starts like the dense FeedForward.
        for w, b in ((self.w_in, self.b_in), (self.w_gate, None), (self.w_out, self.b_out)):
            if w is not None:
                bound = 1 / math.sqrt(w.shape[-1])
                nn.init.uniform_(w, -bound, bound)
                if b is not None:
                    nn.init.uniform_(b, -bound, bound)

    @property
    def num_experts(self):
        return self.w_in.shape[0]

    def forward(self, inputs):
        """Run every expert on its own tokens.

        inputs: a list of E tensors, inputs[e] of shape (n_e, D) (n_e may be 0) -> a list of E
        tensors of the same shapes. Slicing the stacked weights with unbind, once, keeps the
        backward pass to one gradient tensor per weight instead of one full-size one per expert.
        """
        weights = [self.w_in, self.w_out, self.w_gate, self.b_in, self.b_out]
        if torch.is_grad_enabled():
            # unbind once: its backward writes all experts' gradients into one tensor per weight
            weights = [w.unbind(0) if w is not None else [None] * len(inputs) for w in weights]
            return [self.mlp(x, *(w[e] for w in weights)) if x.shape[0] else x for e, x in enumerate(inputs)]
        # Without autograd (generation), index just the experts that have tokens: a decode step of
        # one token touches only k of them, and slicing all E would cost more than their matmuls.
        return [self.mlp(x, *(w[e] if w is not None else None for w in weights)) if x.shape[0] else x
                for e, x in enumerate(inputs)]

    def mlp(self, x, w_in, w_out, w_gate=None, b_in=None, b_out=None):
        """One expert's MLP on x: (..., D) -> (..., D)."""
        if self.expert_type == "swiglu":
            h = F.silu(F.linear(x, w_gate)) * F.linear(x, w_in)
        elif self.expert_type == "relu2":
            h = F.relu(F.linear(x, w_in)).square()
        else:
            h = F.gelu(F.linear(x, w_in, b_in), approximate="tanh")     # GPT-2's GELU (utils.gpt.GELU)
        return F.linear(h, w_out, b_out)

    def as_mlp(self, x):
        """A one-expert Experts used as a plain dense MLP (shared experts, the dense blocks of
        utils/modern.py): every token through its expert. x: (..., D) -> (..., D)."""
        if self.num_experts != 1:
            raise ValueError(f"as_mlp needs exactly one expert, this Experts holds {self.num_experts}")
        return self([x])[0]


def combine_dtype(dtype):
    """The dtype in which gate-weighted expert outputs of `dtype` are summed: float32 for bfloat16
    or float16 (the rounding of each partial sum would add up), else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


def combine(y, token_idx, weight, num_tokens, dtype):
    """The gate-weighted sum of the expert outputs of each token.

    y: (A, d) one output row per assignment; token_idx, weight: (A,) its token and gate.
    Returns (num_tokens, d) in `dtype`: out[t] = sum over t's assignments a of weight[a] * y[a],
    accumulated in combine_dtype(dtype) and cast to dtype once, at the end.
    """
    acc = combine_dtype(dtype)
    out = y.new_zeros(num_tokens, y.shape[1], dtype=acc)
    return out.index_add_(0, token_idx, y.to(acc) * weight[:, None].to(acc)).to(dtype)


def dispatch_loop(x, token_idx, expert_idx, weight, experts):
    """Reference dispatch: for each expert, select its assignments with a mask, run it, add back.

    x: (N, D); token_idx, expert_idx, weight: (A,) one entry per (token, expert) assignment.
    Returns (N, D) = sum over a token's assignments of weight * expert(x_token). The weighted sum
    is accumulated in (at least) float32 and cast back to x.dtype once, at the end.
    """
    masks = [expert_idx == e for e in range(experts.num_experts)]
    outputs = experts([x[token_idx[mask]] for mask in masks])
    out = x.new_zeros(x.shape, dtype=combine_dtype(x.dtype))
    for mask, y in zip(masks, outputs):
        out.index_add_(0, token_idx[mask], y.to(out.dtype) * weight[mask, None].to(out.dtype))
    return out.to(x.dtype)


def dispatch_sorted(x, token_idx, expert_idx, weight, experts):
    """Fast dispatch: sort the assignments by expert so each expert reads one contiguous slice.

    One gather builds the expert-ordered input, each expert runs one matmul on its slice (no
    per-expert mask or search), and one index_add scatters the weighted outputs back. Same
    arguments and result as dispatch_loop.
    """
    order = torch.argsort(expert_idx, stable=True)
    counts = torch.bincount(expert_idx, minlength=experts.num_experts).tolist()
    tokens = token_idx[order]
    x_sorted = torch.index_select(x, 0, tokens)                          # (A, D), grouped by expert
    y = torch.cat(experts(list(torch.split(x_sorted, counts))))          # (A, D)
    return combine(y, tokens, weight[order], x.shape[0], x.dtype)


DISPATCH = {"loop": dispatch_loop, "sorted": dispatch_sorted}


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
      self.last_routing  detached statistics of that batch (see routing_stats).
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
        self.dispatch = DISPATCH[cfg["moe_dispatch"]]
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
        assignments than the whole sequence does. utils.gpt.generate asks every module."""
        if self.capacity_factor is None:
            return None
        return (f"use_cache=True needs dropless MoE layers, but a layer has capacity_factor="
                f"{self.capacity_factor}: set it to None or pass use_cache=False")

    def assignments(self, route, B, T):
        """The (token, expert, gate) assignments that the experts serve, from a RouterOutput of
        B*T tokens: token_idx, expert_idx, gate, each (A,), and keep, the (N, k) bool mask of the
        assignments within capacity (None when dropless: all N*k are served)."""
        N, k = route.topk_idx.shape
        token_idx = torch.arange(N, device=route.topk_idx.device).repeat_interleave(k)  # token of each assignment
        assigned = token_idx, route.topk_idx.reshape(-1), route.topk_weight.reshape(-1)
        if self.capacity_factor is None:
            return (*assigned, None)
        pool = T if self.capacity_priority == "position" else N
        keep = capacity_keep_mask(route.topk_idx.view(B, T, k), self.num_experts, self.capacity(pool),
                                  self.capacity_priority).view(N, k)
        return (*(a[keep.reshape(-1)] for a in assigned), keep)

    def add_shared_expert(self, flat, out):
        """out + the shared expert's output on flat (N, D) (gated when the config asks): (N, D)."""
        if self.shared_expert is None:
            return out
        shared = self.shared_expert.as_mlp(flat)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
        return out + shared

    def balancing_loss(self, route, batch_size, sum_over_ranks=None):
        """The weighted sum of the layer's balancing losses for a RouterOutput of batch_size
        sequences; `sum_over_ranks` as in utils/router.py (expert parallelism)."""
        loss = self.aux_loss_coef * load_balancing_loss(route.probs, route.topk_idx, sum_over_ranks)
        if self.seq_aux_loss_coef > 0:
            loss = loss + self.seq_aux_loss_coef * sequence_balance_loss(route.probs, route.topk_idx, batch_size)
        if self.z_loss_coef > 0:
            loss = loss + self.z_loss_coef * router_z_loss(route.logits, sum_over_ranks)
        return loss

    def forward(self, x):
        """x: (B, T, D) -> (B, T, D); also sets self.aux_loss and the routing of last_routing."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)                                           # (N, D)
        route = self.router(flat)
        token_idx, expert_idx, gate, keep = self.assignments(route, B, T)
        routed = self.dispatch(self.to_experts(flat), token_idx, expert_idx, gate, self.experts)
        out = self.add_shared_expert(flat, self.from_experts(routed))
        self.aux_loss = self.balancing_loss(route, B)
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
            # shrink the signal by about 3x in each projection).
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
