"""Routed Mixture-of-Experts feed-forward layers.

A dense FeedForward sends every token through one MLP. A Mixture-of-Experts (MoE) layer holds
`num_experts` MLPs ("experts") and a router that picks `num_experts_per_tok` (top-k) of them per
token; the token's output is the gate-weighted sum of its chosen experts' outputs. Total parameters
grow with the number of experts; the compute per token grows only with top-k.

Shapes: B = batch, T = sequence, D = emb_dim, N = B*T tokens, E = num_experts, k = top-k,
H = moe_hidden_dim, A = number of (token, expert) assignments (N*k, fewer if some are dropped).

The config keys of the MoE layers, their defaults and their checks are in utils/config.py.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import (CAPACITY_PRIORITIES, DISPATCH_MODES, EXPERT_TYPES, MOE_OPTIONAL_KEYS,  # noqa: F401
                     ROUTER_TYPES, validate_model_config, validate_moe_config)
from .gpt import GELU, FeedForward, GPTModel


def shared_expert_hidden(cfg):
    """Width of the (one) shared-expert MLP of a validated config; 0 means no shared expert.

    num_shared_experts counts the shared experts; their total width is shared_expert_hidden_dim
    when given, else num_shared_experts * moe_hidden_dim.
    """
    if cfg["num_shared_experts"] == 0:
        return 0
    return cfg["shared_expert_hidden_dim"] or cfg["num_shared_experts"] * cfg["moe_hidden_dim"]


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


class TopKRouter(nn.Module):
    """Scores every expert for every token and keeps the k best.

    x: (N, D) -> (logits, scores, probs), each (N, E), and (topk_idx, topk_weight), each (N, k).
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
    probs: scores normalised to sum to 1 per token (= scores for softmax), for balancing losses.
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
        dtype = torch.promote_types(torch.promote_types(x.dtype, self.gate.weight.dtype), torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), self.gate.weight.to(dtype))
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
        return logits, scores, probs, topk_idx, topk_weight * self.routed_scaling_factor


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
        self.act = GELU()
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
            h = self.act(F.linear(x, w_in, b_in))
        return F.linear(h, w_out, b_out)

    def dense(self, x):
        """All tokens through expert 0 (for E = 1: a dense MLP). x: (..., D) -> (..., D)."""
        return self([x])[0]


def combine_dtype(x):
    """The dtype in which the gate-weighted expert outputs are summed: float32 for bfloat16 or
    float16 activations (the rounding of each partial sum would add up), else x's own dtype."""
    return torch.promote_types(x.dtype, torch.float32)


def dispatch_loop(x, token_idx, expert_idx, weight, experts):
    """Reference dispatch: for each expert, select its assignments with a mask, run it, add back.

    x: (N, D); token_idx, expert_idx, weight: (A,) one entry per (token, expert) assignment.
    Returns (N, D) = sum over a token's assignments of weight * expert(x_token). The weighted sum
    is accumulated in (at least) float32 and cast back to x.dtype once, at the end.
    """
    masks = [expert_idx == e for e in range(experts.num_experts)]
    outputs = experts([x[token_idx[mask]] for mask in masks])
    out = x.new_zeros(x.shape, dtype=combine_dtype(x))
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
    dtype = combine_dtype(x)
    y = y.to(dtype) * weight[order, None].to(dtype)
    return x.new_zeros(x.shape, dtype=dtype).index_add_(0, tokens, y).to(x.dtype)


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


def load_balancing_loss(probs, topk_idx):
    """Switch-Transformer auxiliary loss E * sum_i f_i * P_i, with top-k.

    f_i: the fraction of the N*k assignments that go to expert i (not differentiable);
    P_i: the mean router probability of expert i (differentiable).
    The loss is 1 for perfectly uniform routing. Its maximum is E / k: each token sends at most
    one assignment to an expert, so f_i <= 1 / k and the loss <= E / k * sum_i P_i = E / k,
    reached when all tokens go to the same k experts and put all their probability on them.
    """
    E = probs.shape[-1]
    if topk_idx.numel() == 0:
        return probs.sum() * 0.0                 # no tokens: nothing to balance (0, still in the graph)
    f = torch.bincount(topk_idx.reshape(-1), minlength=E).float() / topk_idx.numel()
    return E * torch.sum(f * probs.mean(dim=0))


def sequence_balance_loss(probs, topk_idx, batch_size):
    """DeepSeek-V3's sequence-wise balance loss, averaged over the sequences of the batch.

    Per sequence of T tokens: f_i = E / (k T) * (assignments to expert i), P_i = mean over the
    sequence of probs[:, i]; loss = sum_i f_i * P_i (1 when balanced within the sequence).
    probs: (N, E) with N = batch_size * T; topk_idx: (N, k).
    """
    N, E = probs.shape
    k = topk_idx.shape[1]
    if N == 0:
        return probs.sum() * 0.0                 # no tokens: nothing to balance
    T = N // batch_size
    counts = F.one_hot(topk_idx, E).sum(1).view(batch_size, T, E).sum(1).float()   # (B, E)
    f = counts * E / (k * T)
    P = probs.view(batch_size, T, E).mean(1)
    return (f * P).sum(-1).mean()


def router_z_loss(logits):
    """ST-MoE z-loss: mean squared log-sum-exp of the router logits; keeps logits small and stable.
    logits: (N, E); 0 when N = 0."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class MoEFeedForward(nn.Module):
    """A routed MoE that replaces FeedForward: (B, T, D) -> (B, T, D).

    output = sum over the token's chosen experts of gate * expert(x)  [+ shared expert(x)]

    After each forward pass:
      self.aux_loss      the weighted balancing losses (a tensor), which utils.train.train adds
                         to the language-model loss;
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

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(-1, D)                                           # (N, D)
        logits, scores, probs, topk_idx, topk_weight = self.router(flat)
        N, k = topk_idx.shape
        token_idx = torch.arange(N, device=x.device).repeat_interleave(k)  # (N*k,) token of each assignment
        assignments = token_idx, topk_idx.reshape(-1), topk_weight.reshape(-1)
        keep = None                                                       # dropless: every assignment kept
        if self.capacity_factor is not None:
            pool = T if self.capacity_priority == "position" else N
            keep = capacity_keep_mask(topk_idx.view(B, T, k), self.num_experts, self.capacity(pool),
                                      self.capacity_priority).view(N, k)
            assignments = [a[keep.reshape(-1)] for a in assignments]
        routed = self.dispatch(self.to_experts(flat), *assignments, self.experts)
        out = self.from_experts(routed)
        if self.shared_expert is not None:
            shared = self.shared_expert.dense(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        self.aux_loss = self.aux_loss_coef * load_balancing_loss(probs, topk_idx)
        if self.seq_aux_loss_coef > 0:
            self.aux_loss = self.aux_loss + self.seq_aux_loss_coef * sequence_balance_loss(probs, topk_idx, B)
        if self.z_loss_coef > 0:
            self.aux_loss = self.aux_loss + self.z_loss_coef * router_z_loss(logits)
        self._routing = (probs.detach(), topk_idx.detach(), keep)
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


def is_moe_layer(cfg, layer):
    """Whether block `layer` (0-based) of a validated model config has an MoE feed-forward."""
    return cfg["num_experts"] > 0 and (layer + 1) % cfg["moe_every_n_layers"] == 0


class MoEGPTModel(GPTModel):
    """The GPT of utils/gpt.py with a routed MoE feed-forward (make_moe) in every
    moe_every_n_layers-th block and the dense FeedForward in the others. With num_experts = 0 it
    is the dense GPTModel. Token ids (B, T) -> logits (B, T, vocab_size)."""

    def __init__(self, cfg):
        cfg = validate_model_config(cfg)
        super().__init__(cfg, feedforward=lambda layer: make_moe(cfg) if is_moe_layer(cfg, layer) else FeedForward(cfg))


@torch.no_grad()
def upcycle(dense_model, cfg):
    """Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): an MoEGPTModel(cfg) that
    starts from a trained dense model instead of from random weights.

    Every weight outside the feed-forward layers (embeddings, attention, norms, output head) is
    copied. In every MoE layer, each of the E experts is a copy of that block's trained
    FeedForward, and the router is new, initialised from torch's current random state; dense
    blocks keep their FeedForward. cfg must be the dense model's config plus the MoE keys, with
    "gelu" experts whose moe_hidden_dim is the dense FeedForward's hidden size.

    With renormalised top-k gates (norm_topk_prob, the default; they sum to 1) and
    routed_scaling_factor 1, every token's output is sum_e gate_e * FFN(x) = FFN(x): the new model
    computes exactly the dense model's function until training moves its experts apart.
    """
    if not isinstance(dense_model, GPTModel) or moe_layers(dense_model):
        raise ValueError("dense_model must be a dense GPTModel (a model without MoE layers)")
    cfg = validate_model_config(cfg)
    hidden = dense_model.cfg["ffn_hidden_dim"]
    if cfg["num_experts"] < 1:
        raise ValueError(f"num_experts must be at least 1 to upcycle, got {cfg['num_experts']}")
    for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias"):
        if cfg[key] != dense_model.cfg[key]:
            raise ValueError(f"cfg must describe the dense model's GPT: {key} is {cfg[key]!r} in cfg, "
                             f"{dense_model.cfg[key]!r} in the dense model")
    for key, allowed in (("expert_type", "gelu"), ("moe_hidden_dim", hidden), ("latent_dim", None),
                         ("num_shared_experts", 0)):
        if cfg[key] != allowed:
            raise ValueError(f"upcycling copies the dense FeedForward (GELU, hidden {hidden}) into every "
                             f"expert, so {key} must be {allowed!r}, got {cfg[key]!r}")
    for key, allowed in (("norm_topk_prob", True), ("routed_scaling_factor", 1.0), ("capacity_factor", None)):
        if cfg[key] != allowed:   # otherwise the gates would not sum to 1, or assignments would be dropped
            raise ValueError(f"an upcycled model starts as the dense function only with {key} = {allowed!r}, "
                             f"got {cfg[key]!r}")
    model = MoEGPTModel(cfg)
    dense_state = dense_model.state_dict()
    for name, tensor in model.state_dict().items():
        if ".ff." in name and not name.split(".ff.")[1].startswith("layers."):
            continue                                         # MoE layers: filled below
        if name not in dense_state or dense_state[name].shape != tensor.shape:
            found = tuple(dense_state[name].shape) if name in dense_state else "nothing"
            raise ValueError(f"cfg does not match the dense model at {name}: expected shape "
                             f"{tuple(tensor.shape)}, the dense model has {found}")
        tensor.copy_(dense_state[name])
    for block, dense_block in zip(model.trf_blocks, dense_model.trf_blocks):
        if isinstance(block.ff, MoEFeedForward):
            fc1, fc2 = dense_block.ff.layers[0], dense_block.ff.layers[2]
            experts = block.ff.experts
            experts.w_in.copy_(fc1.weight.expand_as(experts.w_in))       # (E, H, D) <- (H, D)
            experts.b_in.copy_(fc1.bias.expand_as(experts.b_in))
            experts.w_out.copy_(fc2.weight.expand_as(experts.w_out))     # (E, D, H) <- (D, H)
            experts.b_out.copy_(fc2.bias.expand_as(experts.b_out))
    reference = next(dense_model.parameters())
    return model.to(reference.device, reference.dtype)         # the router stays float32 (TopKRouter._apply)


@torch.no_grad()
def update_expert_biases(model, step=None):
    """Auxiliary-loss-free balancing (DeepSeek-V3), as an `after_step` callback for train().

    For every MoE layer with bias_update_rate > 0: expert_bias += rate * sign(mean load - load),
    with the load counted from the layer's last batch. Overloaded experts become less likely to
    be selected, underloaded ones more; no gradient and no loss term are involved.
    """
    for layer in moe_layers(model):
        if layer.bias_update_rate > 0:
            load = torch.bincount(layer.last_routing["topk_idx"].reshape(-1), minlength=layer.num_experts).float()
            bias = layer.router.expert_bias
            bias += layer.bias_update_rate * torch.sign(load.mean() - load).to(bias.device)


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


def moe_layers(model):
    """The MoE layers (MoEFeedForward, including LatentMoE) of a model, in order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


class LoadRecorder:
    """An `after_step` callback for utils.train.train that keeps every step's expert load.

    After training, `loads()` is a (steps, layers, E) tensor of assignment counts.
    """

    def __init__(self):
        self.history = []

    def __call__(self, model, step):
        self.history.append(torch.stack([m.last_routing["tokens_per_expert"].cpu() for m in moe_layers(model)]))

    def loads(self):
        return torch.stack(self.history)
