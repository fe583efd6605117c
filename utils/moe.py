"""Routed Mixture-of-Experts feed-forward layers.

A dense FeedForward sends every token through one MLP. A Mixture-of-Experts (MoE) layer holds
`num_experts` MLPs ("experts") and a router that picks `num_experts_per_tok` (top-k) of them per
token; the token's output is the gate-weighted sum of its chosen experts' outputs. Total parameters
grow with the number of experts; the compute per token grows only with top-k.

Shapes: B = batch, T = sequence, D = emb_dim, N = B*T tokens, E = num_experts, k = top-k,
H = moe_hidden_dim, A = number of (token, expert) assignments (N*k, fewer if some are dropped).

Config keys (in the same dict as the GPT's keys; see MOE_OPTIONAL_KEYS for the defaults):
    num_experts, num_experts_per_tok, moe_hidden_dim   the size of the layer
    expert_type          "gelu": Linear+GELU+Linear with biases, the course's FeedForward shape;
                         "swiglu": W2(silu(W1 x) * W3 x), no biases (Mixtral, Qwen, DeepSeek)
    norm_topk_prob       renormalise the k gate weights to sum to 1 (Mixtral: yes; Qwen1.5-MoE: no)
    aux_loss_coef        weight of the Switch-Transformer load-balancing loss
    z_loss_coef          weight of the ST-MoE router z-loss
    capacity_factor      None: dropless. A number c: each expert takes at most ceil(c * N * k / E)
                         assignments per batch; the rest are dropped (the token keeps its residual)
    moe_dispatch         "sorted" (fast, default) or "loop" (the readable reference); same results
    moe_every_n_layers   in GPTModel, layer i (0-based) is an MoE layer when (i + 1) % n == 0
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gpt import GELU, check_positive_int

MOE_OPTIONAL_KEYS = {
    "num_experts": 0,            # 0 means a dense model (no MoE layers)
    "num_experts_per_tok": 2,
    "moe_hidden_dim": None,      # required when num_experts > 0
    "expert_type": "gelu",
    "norm_topk_prob": True,
    "aux_loss_coef": 0.01,
    "z_loss_coef": 0.0,
    "capacity_factor": None,
    "moe_dispatch": "sorted",
    "moe_every_n_layers": 1,
}
EXPERT_TYPES = ("gelu", "swiglu")
DISPATCH_MODES = ("sorted", "loop")


def validate_moe_config(cfg):
    """Check the MoE keys of a config (defaults filled in); raise ValueError naming the bad field."""
    cfg = {**MOE_OPTIONAL_KEYS, **cfg}
    if "emb_dim" not in cfg:
        raise ValueError("config is missing required key 'emb_dim'")
    check_positive_int(cfg, "emb_dim", "num_experts", "num_experts_per_tok", "moe_hidden_dim",
                       "moe_every_n_layers")
    if cfg["num_experts_per_tok"] > cfg["num_experts"]:
        raise ValueError(f"num_experts_per_tok ({cfg['num_experts_per_tok']}) must be <= "
                         f"num_experts ({cfg['num_experts']})")
    for key, allowed in (("expert_type", EXPERT_TYPES), ("moe_dispatch", DISPATCH_MODES)):
        if cfg[key] not in allowed:
            raise ValueError(f"config[{key!r}] must be one of {allowed}, got {cfg[key]!r}")
    for key in ("aux_loss_coef", "z_loss_coef"):
        if not (isinstance(cfg[key], (int, float)) and cfg[key] >= 0):
            raise ValueError(f"config[{key!r}] must be a number >= 0, got {cfg[key]!r}")
    cf = cfg["capacity_factor"]
    if cf is not None and not (isinstance(cf, (int, float)) and cf > 0):
        raise ValueError(f"config['capacity_factor'] must be None (dropless) or > 0, got {cf!r}")
    return cfg


class TopKRouter(nn.Module):
    """Scores every expert for every token and keeps the k best.

    x: (N, D) -> logits (N, E), probs (N, E), topk_idx (N, k), topk_weight (N, k).
    The router runs in float32 even when the model runs in lower precision: softmax over small
    logit differences is where reduced precision hurts most.

    probs = softmax(logits) over all E experts. The gate weights are the top-k probabilities; with
    norm_topk_prob they are renormalised to sum to 1, which equals a softmax over just the k
    selected logits (the common factor 1/sum_j exp(l_j) cancels).
    """

    def __init__(self, emb_dim, num_experts, top_k, norm_topk_prob=True):
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(emb_dim, num_experts, bias=False)

    def forward(self, x):
        logits = F.linear(x.float(), self.gate.weight.float())
        probs = torch.softmax(logits, dim=-1)
        topk_weight, topk_idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        return logits, probs, topk_idx, topk_weight


class Experts(nn.Module):
    """E independent MLPs stored as stacked weight tensors (one slice per expert).

    Stacking keeps the experts in three tensors instead of 3*E modules, and is the layout that
    batched and grouped matmuls (and `transformers`) use.
    """

    def __init__(self, num_experts, emb_dim, hidden_dim, expert_type="gelu"):
        super().__init__()
        if expert_type not in EXPERT_TYPES:
            raise ValueError(f"expert_type must be one of {EXPERT_TYPES}, got {expert_type!r}")
        self.expert_type = expert_type
        E, D, H = num_experts, emb_dim, hidden_dim
        self.w_in = nn.Parameter(torch.empty(E, H, D))       # like nn.Linear: (out, in) per expert
        self.w_out = nn.Parameter(torch.empty(E, D, H))
        if expert_type == "swiglu":
            self.w_gate = nn.Parameter(torch.empty(E, H, D))
            self.b_in = self.b_out = None
        else:
            self.w_gate = None
            self.b_in = nn.Parameter(torch.zeros(E, H))
            self.b_out = nn.Parameter(torch.zeros(E, D))
        self.act = GELU()
        self.reset_parameters()

    def reset_parameters(self):
        # The same scheme as nn.Linear: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) per expert.
        for w in (self.w_in, self.w_gate, self.w_out):
            if w is not None:
                nn.init.uniform_(w, -1 / math.sqrt(w.shape[-1]), 1 / math.sqrt(w.shape[-1]))

    @property
    def num_experts(self):
        return self.w_in.shape[0]

    def forward(self, inputs):
        """Run every expert on its own tokens.

        inputs: a list of E tensors, inputs[e] of shape (n_e, D) (n_e may be 0) -> a list of E
        tensors of the same shapes. Slicing the stacked weights with unbind, once, keeps the
        backward pass to one gradient tensor per weight instead of one full-size one per expert.
        """
        E = self.num_experts
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
        w_gate = self.w_gate.unbind(0) if self.w_gate is not None else [None] * E
        b_in = self.b_in.unbind(0) if self.b_in is not None else [None] * E
        b_out = self.b_out.unbind(0) if self.b_out is not None else [None] * E
        return [self.mlp(x, w_in[e], w_out[e], w_gate[e], b_in[e], b_out[e]) if x.shape[0] else x
                for e, x in enumerate(inputs)]

    def mlp(self, x, w_in, w_out, w_gate=None, b_in=None, b_out=None):
        """One expert's MLP on x: (..., D) -> (..., D)."""
        if self.expert_type == "swiglu":
            h = F.silu(F.linear(x, w_gate)) * F.linear(x, w_in)
        else:
            h = self.act(F.linear(x, w_in, b_in))
        return F.linear(h, w_out, b_out)


def dispatch_loop(x, token_idx, expert_idx, weight, experts):
    """Reference dispatch: for each expert, select its assignments with a mask, run it, add back.

    x: (N, D); token_idx, expert_idx, weight: (A,) one entry per (token, expert) assignment.
    Returns (N, D) = sum over a token's assignments of weight * expert(x_token).
    """
    masks = [expert_idx == e for e in range(experts.num_experts)]
    outputs = experts([x[token_idx[mask]] for mask in masks])
    out = torch.zeros_like(x)
    for mask, y in zip(masks, outputs):
        out.index_add_(0, token_idx[mask], y * weight[mask, None].to(x.dtype))
    return out


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
    y = y * weight[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, y)


DISPATCH = {"loop": dispatch_loop, "sorted": dispatch_sorted}


def capacity_keep_mask(topk_idx, num_experts, capacity):
    """Which of the (N, k) assignments fit in each expert's capacity.

    Priority as in GShard: every token's first choice comes before any second choice, and within a
    choice level, earlier tokens come first. Returns a bool mask (N, k).
    """
    N, k = topk_idx.shape
    by_priority = topk_idx.T.reshape(-1)                                 # slot-major order
    one_hot = F.one_hot(by_priority, num_experts)                        # (k*N, E)
    position_in_expert = (one_hot.cumsum(0) * one_hot).sum(-1) - 1       # 0 for the first arrival
    return (position_in_expert < capacity).reshape(k, N).T


def load_balancing_loss(probs, topk_idx):
    """Switch-Transformer auxiliary loss E * sum_i f_i * P_i, with top-k.

    f_i: the fraction of the N*k assignments that go to expert i (not differentiable);
    P_i: the mean router probability of expert i (differentiable).
    The loss is 1 for perfectly uniform routing and grows to E when everything goes to one expert.
    """
    E = probs.shape[-1]
    f = torch.bincount(topk_idx.reshape(-1), minlength=E).float() / topk_idx.numel()
    return E * torch.sum(f * probs.mean(dim=0))


def router_z_loss(logits):
    """ST-MoE z-loss: mean squared log-sum-exp of the router logits; keeps logits small and stable."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class MoEFeedForward(nn.Module):
    """A routed MoE that replaces FeedForward: (B, T, D) -> (B, T, D).

    After each forward pass:
      self.aux_loss      aux_loss_coef * load-balancing loss + z_loss_coef * z-loss (a tensor),
                         which utils.train.train adds to the language-model loss;
      self.last_routing  detached statistics of that batch (see routing_stats).
    """

    def __init__(self, cfg):
        super().__init__()
        cfg = validate_moe_config(cfg)
        self.num_experts = cfg["num_experts"]
        self.top_k = cfg["num_experts_per_tok"]
        self.aux_loss_coef = cfg["aux_loss_coef"]
        self.z_loss_coef = cfg["z_loss_coef"]
        self.capacity_factor = cfg["capacity_factor"]
        self.dispatch = DISPATCH[cfg["moe_dispatch"]]
        self.router = TopKRouter(cfg["emb_dim"], self.num_experts, self.top_k, cfg["norm_topk_prob"])
        self.experts = Experts(self.num_experts, cfg["emb_dim"], cfg["moe_hidden_dim"], cfg["expert_type"])
        self.aux_loss = None
        self.last_routing = None

    def capacity(self, num_tokens):
        """Assignments each expert may take in a batch of num_tokens (None when dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(-1, D)                                           # (N, D)
        logits, probs, topk_idx, topk_weight = self.router(flat)
        N, k = topk_idx.shape
        keep = torch.ones_like(topk_idx, dtype=torch.bool)
        if self.capacity_factor is not None:
            keep = capacity_keep_mask(topk_idx, self.num_experts, self.capacity(N))
        token_idx = torch.arange(N, device=x.device).repeat_interleave(k)  # (N*k,) token of each assignment
        keep_flat = keep.reshape(-1)
        out = self.dispatch(flat, token_idx[keep_flat], topk_idx.reshape(-1)[keep_flat],
                            topk_weight.reshape(-1)[keep_flat], self.experts)
        self.aux_loss = self.aux_loss_coef * load_balancing_loss(probs, topk_idx)
        if self.z_loss_coef > 0:
            self.aux_loss = self.aux_loss + self.z_loss_coef * router_z_loss(logits)
        self.last_routing = routing_stats(probs, topk_idx, keep)
        return out.reshape(B, T, D)


def routing_stats(probs, topk_idx, keep=None):
    """Statistics of one batch's routing (all detached):

    tokens_per_expert (E,) assignments each expert received (after dropping),
    load_imbalance     max / mean of tokens_per_expert (1.0 is perfectly balanced),
    dropped_fraction   share of the N*k assignments dropped by the capacity limit,
    router_entropy     mean entropy of the router distribution, in nats (ln E = undecided),
    topk_idx           (N, k) the chosen experts.
    """
    E = probs.shape[-1]
    keep = torch.ones_like(topk_idx, dtype=torch.bool) if keep is None else keep
    counts = torch.bincount(topk_idx[keep], minlength=E)
    p = probs.detach()
    return {
        "tokens_per_expert": counts,
        "load_imbalance": (counts.max() / counts.float().mean()).item(),
        "dropped_fraction": 1.0 - keep.float().mean().item(),
        "router_entropy": -(p * torch.log(p.clamp_min(1e-9))).sum(-1).mean().item(),
        "topk_idx": topk_idx.detach(),
    }


def moe_layers(model):
    """The MoEFeedForward modules of a model, in order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


@torch.no_grad()
def expert_load(model, token_ids, context_length, batch_size=8):
    """Assignments per expert per MoE layer over a token stream: a (layers, E) tensor of counts.

    Runs the model in eval mode over non-overlapping windows of `token_ids` (1-D).
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = (len(token_ids) - 1) // context_length
    windows = token_ids[:n * context_length].view(n, context_length)
    counts = torch.zeros(len(layers), layers[0].num_experts, dtype=torch.long)
    for batch in windows.split(batch_size):
        model(batch.to(device))
        counts += torch.stack([layer.last_routing["tokens_per_expert"].cpu() for layer in layers])
    model.train(was_training)
    return counts


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
