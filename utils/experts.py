"""The experts of an MoE layer, and the two ways of sending tokens to them.

Experts holds E independent MLPs as stacked weight tensors. Dispatch gives each expert the tokens
routed to it and sums the gate-weighted outputs back per token: dispatch_loop is the readable
reference (one mask per expert), dispatch_sorted the fast one (sort the assignments by expert).
utils/moe.py builds the MoE layer on them; utils/parallel.py sends the tokens to experts on other
processes and combines their results with the same `combine`.

Shapes: N tokens, D = the experts' input dimension, H = hidden width, E = experts,
A = number of (token, expert) assignments.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import EXPERT_TYPES


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
        if torch.is_grad_enabled():
            # unbind once: its backward writes all experts' gradients into one tensor per weight
            weights = [self.w_in, self.w_out, self.w_gate, self.b_in, self.b_out]
            weights = [w.unbind(0) if w is not None else [None] * len(inputs) for w in weights]
            return [self.mlp(x, *(w[e] for w in weights)) if x.shape[0] else x for e, x in enumerate(inputs)]
        # Without autograd (generation), index just the experts that have tokens: a decode step of
        # one token touches only k of them, and slicing all E would cost more than their matmuls.
        return [self.mlp(x, *self.weights_of(e)) if x.shape[0] else x for e, x in enumerate(inputs)]

    def weights_of(self, e):
        """Expert e's (w_in, w_out, w_gate, b_in, b_out): views into the stacked tensors, no copy
        (None for the weights its expert_type does not have)."""
        return tuple(w[e] if w is not None else None
                     for w in (self.w_in, self.w_out, self.w_gate, self.b_in, self.b_out))

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


def dispatch_few(x, topk_idx, topk_weight, experts):
    """Decode dispatch: a few tokens, every choice served (dropless), no autograd.

    x: (N, D); topk_idx, topk_weight: (N, k) the router's choices and gates. Returns (N, D), the
    result of dispatch_loop on the same assignments (up to the order in which a token's k outputs
    are added). Only the chosen experts run, each once, on a view of its slice of the stacked
    weights: nothing is sorted, counted or split over all E experts, and no weights are copied.
    (Gathering the k chosen experts' weights into one tensor for a single batched matmul would
    write and re-read them: three times the memory traffic of a step that only reads them.) The
    choices are grouped by expert on the host, one copy of N*k small integers; a single token (a
    batch-1 decode step) needs no gather or scatter at all.
    """
    acc = combine_dtype(x.dtype)
    N, k = topk_idx.shape
    if N == 1:
        out = None
        for e, gate in zip(topk_idx[0].tolist(), topk_weight[0].tolist()):
            y = experts.mlp(x, *experts.weights_of(e)).to(acc)
            out = y * gate if out is None else out.add_(y, alpha=gate)     # out += gate * y
        return out.to(x.dtype)
    rows_of = {}                                   # expert -> its assignments a (token a // k)
    for a, e in enumerate(topk_idx.reshape(-1).tolist()):
        rows_of.setdefault(e, []).append(a)
    out = x.new_zeros(x.shape, dtype=acc)
    flat_weight = topk_weight.reshape(-1)
    for e, rows in rows_of.items():
        rows = torch.tensor(rows, device=x.device)
        tokens = rows // k
        y = experts.mlp(x[tokens], *experts.weights_of(e))
        out.index_add_(0, tokens, y.to(acc) * flat_weight[rows, None].to(acc))
    return out.to(x.dtype)


def check_grouped_mm():
    """Raise a ValueError unless this torch has torch.nn.functional.grouped_mm."""
    if not hasattr(F, "grouped_mm"):
        raise ValueError(f"config['moe_dispatch'] 'grouped' needs torch.nn.functional.grouped_mm, which torch "
                         f"{torch.__version__} does not have: use 'sorted'")


def dispatch_grouped(x, token_idx, expert_idx, weight, experts):
    """Grouped-GEMM dispatch: sort the assignments by expert, as dispatch_sorted does, then multiply
    all experts' slices at once, one torch.nn.functional.grouped_mm per weight matrix.

    grouped_mm takes the expert-ordered rows (A, d) and the stacked weights (E, d, out), and the
    offsets where each expert's rows end: on a recent NVIDIA GPU one fused kernel serves every
    expert, however uneven their loads, with no host synchronisation (dispatch_sorted needs the
    counts on the host to split the rows). Same arguments and result as dispatch_loop.
    """
    check_grouped_mm()
    order = torch.argsort(expert_idx, stable=True)
    ends = torch.bincount(expert_idx, minlength=experts.num_experts).cumsum(0).to(torch.int32)
    tokens, chosen = token_idx[order], expert_idx[order]
    x_sorted = torch.index_select(x, 0, tokens)                           # (A, d), grouped by expert

    def grouped(rows, w):                                                 # rows of expert e times w[e].T
        return F.grouped_mm(rows, w.transpose(1, 2), offs=ends)

    if experts.expert_type == "swiglu":
        h = F.silu(grouped(x_sorted, experts.w_gate)) * grouped(x_sorted, experts.w_in)
    elif experts.expert_type == "relu2":
        h = F.relu(grouped(x_sorted, experts.w_in)).square()
    else:
        h = F.gelu(grouped(x_sorted, experts.w_in) + experts.b_in[chosen], approximate="tanh")
    y = grouped(h, experts.w_out)
    if experts.b_out is not None:
        y = y + experts.b_out[chosen]
    return combine(y, tokens, weight[order], x.shape[0], x.dtype)


# NVIDIA data-centre GPUs whose bfloat16 grouped_mm is one fused kernel for all experts: H100/H200
# (compute capability 9.0) and B200 (10.0), the GPUs torchtitan trains MoEs with grouped_mm on.
GROUPED_MM_CAPABILITIES = ((9, 0), (10, 0))


def prefers_grouped_mm(x, experts):
    """Whether the default dispatch hands the experts over to dispatch_grouped: for bfloat16 tokens
    on an NVIDIA GPU of GROUPED_MM_CAPABILITIES (not ROCm), with the experts' dimensions multiples
    of 8 (the kernel's alignment: rows of 16 bytes). Elsewhere - CPUs, float32, other GPUs - the
    sorted dispatch is kept: on a CPU grouped_mm is a loop of matmuls (notebook 05 times both
    there); on other GPUs it was not measured for this course. A rule, not a measurement: it was
    not timed on a GPU for this course either."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(F, "grouped_mm") and torch.version.hip is None):
        return False
    dims = (experts.w_in.shape[-1], experts.w_in.shape[-2])               # (D, H)
    return torch.cuda.get_device_capability(x.device) in GROUPED_MM_CAPABILITIES and all(d % 8 == 0 for d in dims)


DISPATCH = {"loop": dispatch_loop, "sorted": dispatch_sorted, "grouped": dispatch_grouped}
