"""Expert parallelism on torch.distributed: the experts of an MoE layer spread over processes, and
the tokens travel to them and back with all-to-all.

When an MoE outgrows one device, each of W processes ("ranks", one per device) keeps E/W of every
MoE layer's experts; everything else (attention, router, shared expert, latent projections) is
replicated, and every rank works on its own share of the batch (data parallelism). In each MoE
layer a rank routes its tokens, sends each token vector to the rank that owns the chosen expert
(an all-to-all: every rank sends a different amount to every other), runs its local experts on
what it received, and sends the results back (a second all-to-all), where they are combined with
the gates.

utils/launch.py starts the processes (`launch(fn, world_size, ...)`: gloo on CPU, nccl when every
rank has a GPU). Here:
- `ExpertParallelMoE` wraps an MoEFeedForward or LatentMoE (`expert_parallel` every layer of a
  model); `dedup=True` sends a token once per destination rank instead of once per chosen expert;
- `expert_data_parallel_groups` splits the processes into expert-parallel groups (which split the
  experts) and data-parallel groups (which hold copies of the same experts), and
  `expert_parallel_gradients` turns every rank's gradients into those of one process;
- `save_expert_parallel` / `load_expert_parallel` write one safetensors checkpoint with every expert
  under its global index, and load it over any number of ranks, each reading only its experts;
- `generate_expert_parallel` decodes on every rank, all ranks stepping together until all are done.
PyTorch's own launcher works too: `torchrun --standalone --nproc_per_node=2 -m utils.parallel` runs a
check of the layer against the single-process one.

Shapes: W = the expert-parallel group's size (the world size unless a subgroup is given), E = experts,
E_r = E / W experts per rank, N = local tokens, k = top-k, A = N * k assignments, U = distinct
(token, destination rank) pairs, R = rows received, d = the experts' dimension (emb_dim, or
latent_dim in a LatentMoE).
"""
import json
import math
import operator
import struct
from collections import namedtuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import is_count
from .experts import Experts, combine, dispatch_sorted
from .generation import generate
from .moe import MoEFeedForward, make_moe


class AllToAll(torch.autograd.Function):
    """All-to-all of rows with autograd: rank r sends rows x[sum(send[:w]) : sum(send[:w+1])] to rank w,
    and receives recv[w] rows from each rank w, in rank order.

    The backward is the same exchange in reverse: the gradient of each received row goes back to
    the rank and position it came from.
    """

    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group):
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        out = x.new_empty(sum(recv_counts), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad.new_empty(sum(ctx.send_counts), *grad.shape[1:])
        dist.all_to_all_single(grad_x, grad.contiguous(), ctx.send_counts, ctx.recv_counts, group=ctx.group)
        return grad_x, None, None, None


class AllReduceSum(torch.autograd.Function):
    """Sum of a tensor over all ranks, with autograd: the gradient is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _require_group():
    """Raise a RuntimeError unless torch.distributed has a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("no process group: call torch.distributed.init_process_group first, "
                           "or run the code through utils.launch.launch (or torchrun)")


def _in_graph(t):
    """t itself, or, when grad is enabled and t does not require grad, a leaf copy of t that does.

    A collective with autograd (AllToAll, AllReduceSum) runs its backward only where its input is
    in the autograd graph. Whether it is can differ between ranks (an input that needs no grad, a
    rank that receives no rows), and a rank that skips a backward collective leaves the others
    waiting in it. torch.is_grad_enabled() is the same on every rank, so this rule keeps them alike.
    """
    if torch.is_grad_enabled() and not t.requires_grad:
        return t.detach().requires_grad_(True)
    return t


def _local_experts(experts, start, count):
    """An Experts module holding experts start .. start+count-1 of `experts` (copies of their weights)."""
    with torch.random.fork_rng(devices=[]):      # building it must not move the caller's random stream
        local = Experts(count, experts.w_in.shape[2], experts.w_in.shape[1], experts.expert_type)
    with torch.no_grad():
        for name, param in local.named_parameters():
            param.copy_(getattr(experts, name)[start:start + count])
    return local.to(experts.w_in.device, experts.w_in.dtype)


COMBINE_AT = ("destination", "source")


class ExpertParallelMoE(nn.Module):
    """An MoEFeedForward or LatentMoE whose routed experts are split evenly over the ranks of an
    expert-parallel process group `group` (the default group, every process, when None): the rank
    of group rank r keeps experts r*E/W .. (r+1)*E/W - 1 only, W being the group's size.

    forward(x): (B, T, D) -> (B, T, D), the layer's own signature. Each rank passes its own tokens;
    the outputs, and the gradients of inputs and expert weights, equal those of the single-process
    layer run on all ranks' tokens together. The router, shared expert and latent projections are
    replicated. How the ranks' gradients add up to the single-process ones depends on how each rank
    weighs the global aux loss (see expert_parallel_gradients): summed over the ranks when each rank
    back-propagates aux_loss / P, P being the number of processes; averaged when each adds the full
    aux_loss to the mean loss of its share, as utils.train.train does.

    The wrapped layer runs as it is, with two of its parts replaced (see MoEFeedForward): its
    `dispatch` becomes `exchange` below, and its `sum_over_ranks` an all-reduce over every process
    (the default group, even when `group` is a subgroup: the batch is the tokens of all processes),
    so that its balancing and z losses, in `moe.aux_loss`, are those of the whole batch on every
    rank. Its `experts` are dropped (this rank's share is copied into `local_experts`).

    dedup=False sends one row per (token, expert) assignment, as dispatch_sorted runs them.
    dedup=True sends each token's vector once to each rank holding at least one of its experts,
    with its experts there (`expert_ids`, local ids, -1 in unused slots) in min(k, E/W) slots.
    With combine_at="destination" (the default) the gates go along, the receiving rank adds up
    the gate-weighted outputs of the token's experts there, and one vector per (token, rank)
    comes back; with combine_at="source" one output per assignment comes back, combined with
    the gates at home. Combining at the destination adds a token's experts on one rank into a
    partial sum there, in the model's dtype, and the source adds the partial sums: in float32 the
    result equals the single process to rounding (atol 1e-5), in bfloat16 it differs from it by
    that extra rounding of each partial sum (the values on the wire stay in the model's dtype).

    After each forward pass the wrapped layer's `last_routing` describes this rank's tokens, and
    `last_exchange` what this rank passed to the all-to-alls of the forward pass, read from the
    tensors as they were sent: "tensors", {name: {"rows": rows sent to each rank, "row_bytes":
    bytes per row (the tensor's row size times its element size)}} for "counts", "vectors" (and,
    with dedup, "expert_ids" and, combined at the destination, "gates") and "results" (what this
    rank sent back); "sent_rows" and "received_rows", the token vectors sent to and received from
    each rank; "returned_rows", the result rows sent back to each rank; "bytes_sent", the bytes of
    all those tensors that left this rank (rows for other ranks; the backward pass sends the
    float ones, "vectors", "gates" and "results", again as gradients in the other direction, and
    the integer "counts" and "expert_ids" not); "width" and "value_bytes", the values per token
    vector and bytes per value.

    Ranks may hold different numbers of tokens (a different B or T), none at all (B = 0 or T = 0:
    the output is empty), or receive no rows (collapsed routing): every rank still takes part in
    every all-to-all of the forward pass, and, when grad is enabled, of the backward pass. So that
    the backward exchanges happen on every rank whatever requires grad there, the tensors entering
    them are made part of the autograd graph whenever torch.is_grad_enabled(), a rule every rank
    decides alike (_in_graph). As with data parallelism, every rank must then call backward on a
    loss that uses this layer's output and aux_loss (or no rank may).
    """

    def __init__(self, moe, group=None, dedup=False, combine_at="destination"):
        super().__init__()
        if not isinstance(moe, MoEFeedForward):
            raise ValueError(f"moe must be an MoEFeedForward or LatentMoE, got {type(moe).__name__}")
        if not isinstance(dedup, bool):
            raise ValueError(f"dedup must be True or False, got {dedup!r}")
        if combine_at not in COMBINE_AT:
            raise ValueError(f"combine_at must be one of {COMBINE_AT}, got {combine_at!r}")
        _require_group()
        if moe.capacity_factor is not None:
            raise ValueError(f"capacity_factor must be None (dropless) for ExpertParallelMoE, got {moe.capacity_factor}")
        if moe.bias_update_rate > 0:
            raise ValueError("bias_update_rate must be 0: the bias updates would need the global expert loads, "
                             "and each rank's copy of the router would drift apart")
        self.group, self.dedup, self.combine_at = group, dedup, combine_at
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        E = moe.num_experts
        if E % self.world_size:
            raise ValueError(f"num_experts ({E}) must be divisible by the expert-parallel group's size "
                             f"({self.world_size}): every rank holds the same number of experts")
        self.experts_per_rank = E // self.world_size
        self.first_expert = self.rank * self.experts_per_rank
        self.local_experts = _local_experts(moe.experts, self.first_expert, self.experts_per_rank)
        self.moe = moe
        del moe.experts                          # only the local share stays in this process
        moe.experts = None
        moe.dispatch, moe.sum_over_ranks = self.exchange, self.sum_over_ranks
        self.last_exchange = None

    def decoding_stop(self):
        """The stop rule utils.generation.generate uses for a model holding this layer: every rank keeps
        stepping until every rank's rows have finished (lockstep_stop over this layer's group)."""
        return lockstep_stop(self.group)

    def forward(self, x):
        """x: (B, T, D) -> (B, T, D); B or T may be 0 (and differ between ranks)."""
        if x.dim() != 3:
            raise ValueError(f"x must be a (batch, tokens, emb_dim) tensor, got shape {tuple(x.shape)}")
        return self.moe(x)

    def _send(self, name, t, send_counts, recv_counts):
        """All-to-all of the rows of t (send_counts[w] rows to rank w; recv_counts[w] from rank w),
        recorded in self._sent under `name`. Float tensors go with autograd (AllToAll), integer
        ones without."""
        if t.shape[0] != sum(send_counts):
            raise RuntimeError(f"{name}: {t.shape[0]} rows, but {sum(send_counts)} to send")
        self._sent[name] = {"rows": list(send_counts), "row_bytes": math.prod(t.shape[1:]) * t.element_size()}
        if t.is_floating_point():
            return AllToAll.apply(_in_graph(t), send_counts, recv_counts, self.group)
        out = t.new_empty(sum(recv_counts), *t.shape[1:])
        dist.all_to_all_single(out, t.contiguous(), recv_counts, send_counts, group=self.group)
        return out

    def _send_counts(self, counts):
        """counts (W, c): c integers for each rank -> (W, c), what each rank sent us (recorded as "counts")."""
        return self._send("counts", counts, [1] * self.world_size, [1] * self.world_size)

    def exchange(self, x, token_idx, expert_idx, gate, experts=None):
        """The wrapped layer's dispatch, across ranks: x (N, d) in the experts' space; token_idx,
        expert_idx, gate (A,) this rank's assignments -> (N, d), the gate-weighted sum of each
        token's expert outputs, as dispatch_sorted computes it in one process. The experts that
        run here are self.local_experts (`experts`, the wrapped layer's, is None)."""
        self._sent = {}
        if self.dedup:
            out, received = self._exchange_dedup(x, token_idx, expert_idx, gate)
        else:
            out, received = self._exchange_per_assignment(x, token_idx, expert_idx, gate)
        sent = self._sent
        off_rank = sum(r["row_bytes"] * c for r in sent.values() for w, c in enumerate(r["rows"]) if w != self.rank)
        self.last_exchange = {"tensors": sent, "sent_rows": sent["vectors"]["rows"], "received_rows": received,
                              "returned_rows": sent["results"]["rows"], "bytes_sent": off_rank,
                              "width": x.shape[1], "value_bytes": x.element_size()}
        return out

    def _exchange_per_assignment(self, x, token_idx, expert_idx, gate):
        """One row per assignment: -> (the (N, d) output, rows received from each rank)."""
        W, E_r = self.world_size, self.experts_per_rank
        order = torch.argsort(expert_idx, stable=True)                        # by expert, hence by rank
        token_idx, sorted_experts, gate = token_idx[order], expert_idx[order], gate[order]
        # How many rows go to each rank, and to each expert there: (W, E_r).
        send_matrix = torch.bincount(sorted_experts, minlength=W * E_r).view(W, E_r)
        recv_matrix = self._send_counts(send_matrix)                          # row w: what rank w sends us
        send_counts, recv_counts = send_matrix.sum(1).tolist(), recv_matrix.sum(1).tolist()

        # Without _in_graph (in _send), a rank whose input needs no grad and that receives no rows
        # would build no autograd node for the exchanges and skip their backward all-to-alls, while
        # the other ranks wait in them (a hang under NCCL, "Connection closed by peer" under gloo).
        received = self._send("vectors", x.index_select(0, token_idx), send_counts, recv_counts)   # (R, d)
        # Received rows come by source rank, and within each by expert: label them with local experts.
        local_ids = torch.arange(E_r, device=x.device).repeat(W)               # (W * E_r,)
        row_expert = local_ids.repeat_interleave(recv_matrix.reshape(-1))      # (R,)
        rows = torch.arange(len(row_expert), device=x.device)
        results = dispatch_sorted(received, rows, row_expert, torch.ones_like(row_expert, dtype=received.dtype),
                                  self.local_experts)                           # (R, d), same row order
        returned = self._send("results", results, recv_counts, send_counts)  # (A, d), order of the vectors
        return combine(returned, token_idx, gate, x.shape[0], returned.dtype), recv_counts

    def _exchange_dedup(self, x, token_idx, expert_idx, gate):
        """One row per (token, destination rank): -> (the (N, d) output, rows received from each rank)."""
        W, E_r, N = self.world_size, self.experts_per_rank, x.shape[0]
        slots = min(self.moe.top_k, E_r)                      # a token's experts on one rank, at most
        dest, local = expert_idx // E_r, expert_idx % E_r
        # The distinct (destination, token) pairs, in that order (rows for rank 0 first), and the row
        # of each assignment; within a row, its assignments ordered by local expert take slots 0, 1, ...
        pairs, row_of = torch.unique(dest * N + token_idx, sorted=True, return_inverse=True)   # (U,), (A,)
        row_token, row_dest = pairs % max(N, 1), pairs // max(N, 1)
        order = torch.argsort(row_of * E_r + local, stable=True)
        rows_sorted = row_of[order]
        per_row = torch.bincount(row_of, minlength=len(pairs))
        slot = torch.arange(len(order), device=x.device) - (per_row.cumsum(0) - per_row)[rows_sorted]
        ids = torch.full((len(pairs), slots), -1, dtype=torch.int32, device=x.device)
        ids[rows_sorted, slot] = local[order].to(torch.int32)                               # (U, slots)

        send_counts = torch.bincount(row_dest, minlength=W)
        recv_counts = self._send_counts(send_counts[:, None]).reshape(-1).tolist()
        send_counts = send_counts.tolist()
        received = self._send("vectors", x.index_select(0, row_token), send_counts, recv_counts)   # (R, d)
        recv_ids = self._send("expert_ids", ids, send_counts, recv_counts)                         # (R, slots)
        row, used = (recv_ids >= 0).nonzero(as_tuple=True)    # the received assignments, row by row
        experts_of = recv_ids[row, used].long()
        if self.combine_at == "destination":
            gates = torch.zeros(len(pairs), slots, dtype=gate.dtype, device=x.device)
            gates = gates.index_put((rows_sorted, slot), gate[order])                            # (U, slots)
            recv_gates = self._send("gates", gates, send_counts, recv_counts)
            # The gate-weighted sum of each row's experts here: one result per received row.
            results = dispatch_sorted(received, row, experts_of, recv_gates[row, used], self.local_experts)
            returned = self._send("results", results, recv_counts, send_counts)                # (U, d)
            ones = returned.new_ones(len(pairs))
            return combine(returned, row_token, ones, N, returned.dtype), recv_counts
        # combine_at="source": one ungated output per received assignment, in row and slot order.
        each = torch.arange(len(row), device=x.device)
        results = dispatch_sorted(received[row], each, experts_of, received.new_ones(len(row)), self.local_experts)
        back = torch.bincount(row, minlength=len(received)).split(recv_counts)      # assignments per source
        returned = self._send("results", results, [int(b.sum()) for b in back],
                              torch.bincount(dest, minlength=W).tolist())           # (A, d), order of `order`
        return combine(returned, token_idx[order], gate[order], N, returned.dtype), recv_counts

    def sum_over_ranks(self, t):
        """t summed over every process (the default group: the batch is all processes' tokens), with
        autograd (the gradient of the sum reaches every rank's t). Every rank calls it alike: _in_graph
        keeps its backward on every rank."""
        return AllReduceSum.apply(_in_graph(t), None)


def expert_parallel(model, group=None, **kwargs):
    """Replace every MoE layer of a course model, in place, by its ExpertParallelMoE over `group` (the
    expert-parallel group; every process when None), with the keyword arguments of ExpertParallelMoE
    (dedup, combine_at); return the model."""
    for block in model.trf_blocks:
        if isinstance(block.ff, MoEFeedForward):
            block.ff = ExpertParallelMoE(block.ff, group, **kwargs)
    return model


# The groups of one rank under expert x data parallelism: `expert`, the ranks that split the experts
# between them (its all-to-alls run there); `data`, the ranks that hold copies of the same experts.
ParallelGroups = namedtuple("ParallelGroups", ["expert", "data", "expert_size", "data_size"])


_GROUPS = {}        # expert_size -> (the default group they were made in, ParallelGroups)


def expert_data_parallel_groups(expert_size):
    """The (expert-parallel, data-parallel) groups of this rank, for a world of P processes laid out
    as a grid of P / expert_size rows of expert_size ranks, written "s x P/s" (expert-parallel size
    x data-parallel copies: 2 x 2 for P = 4 and s = 2): rank p sits in row p // expert_size,
    column p % expert_size. The ranks of a row form an expert-parallel group (they split every
    layer's experts and exchange tokens with each other); the ranks of a column form a
    data-parallel group (they hold the same experts). Consecutive ranks form the expert groups, as
    in Megatron-Core, so that on a real cluster the all-to-alls stay within a node when
    expert_size <= the GPUs per node. expert_size = P (P x 1) is plain expert parallelism;
    expert_size = 1 (1 x P) plain data parallelism (every rank holds every expert).

    Every rank must call it (torch.distributed.new_group is collective), in the same order. The
    groups are made once per expert_size and default process group: later calls return the same
    ones (each group holds communication resources until the process group is destroyed).
    Returns ParallelGroups(expert, data, expert_size, data_size).
    """
    _require_group()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if not is_count(expert_size) or expert_size < 1 or world_size % expert_size:
        raise ValueError(f"expert_size must be a positive integer dividing the world size ({world_size}), "
                         f"got {expert_size!r}")
    made_in, groups = _GROUPS.get(expert_size, (None, None))
    if made_in is dist.group.WORLD:                           # made in this process group: reuse them
        return groups
    data_size = world_size // expert_size
    mine = {}
    rows = [list(range(i * expert_size, (i + 1) * expert_size)) for i in range(data_size)]
    columns = [list(range(j, world_size, expert_size)) for j in range(expert_size)]
    for kind, groups in (("expert", rows), ("data", columns)):
        for ranks in groups:                                  # every rank creates every group, in order
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group
    _GROUPS[expert_size] = (dist.group.WORLD, ParallelGroups(mine["expert"], mine["data"], expert_size, data_size))
    return _GROUPS[expert_size][1]


def lockstep_stop(group=None):
    """A `stop` for utils.generation.generate under expert parallelism: every rank must run the same number
    of forward passes, or the all-to-alls of a rank that stopped early leave the others waiting.

    Returns stop(finished) -> bool, finished being this rank's (B,) bool tensor of finished rows
    (B may be 0: nothing left to do). It is True, on every rank alike, once every row of every rank
    in the group (the default group when None) has finished: one all-reduce, the MIN over ranks of
    "all my rows finished" as a 0/1 integer, so every rank must call it at every step (generate
    does). Until then a rank whose rows have all finished keeps stepping, padding them with eos_id.
    """
    def stop(finished):
        done = torch.tensor([int(bool(finished.all()))], dtype=torch.long, device=finished.device)
        dist.all_reduce(done, op=dist.ReduceOp.MIN, group=group)
        return bool(done.item())
    return stop


def _count_or_minus_one(value):
    """value as an int if it is a count (config.is_count, the rule generate applies), else -1."""
    return operator.index(value) if is_count(value) else -1


def generate_expert_parallel(model, idx, max_new_tokens, *, eos_id=None, group=None, **kwargs):
    """utils.generation.generate on every rank of a process group, the ranks kept in lockstep: each rank
    passes its own prompts idx (B, T) (B and T may differ between ranks) and gets back (B, T + n),
    with the same number n <= max_new_tokens of new tokens on every rank. A row that produced eos_id
    holds eos_id from then on; decoding stops once every row of every rank has finished (see
    lockstep_stop), or after max_new_tokens steps. Each rank's tokens are those the single-process
    model generates for its prompts, padded with eos_id.

    Plain generate(model, ...) keeps the ranks in lockstep too (the layers' decoding_stop); this
    function adds one check: max_new_tokens, eos_id and idx are compared over all ranks together
    (one all-reduce), so that a mismatch or a bad idx on one rank raises a ValueError on every rank
    instead of leaving the others waiting. The other keyword arguments (temperature, top_k,
    generator, use_cache) go to generate unchecked across ranks: they must be valid on every rank.
    """
    _require_group()
    steps, eos = _count_or_minus_one(max_new_tokens), (-2 if eos_id is None else _count_or_minus_one(eos_id))
    idx_ok = int(isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.shape[1] > 0)
    check = torch.tensor([steps, -steps, eos, -eos, -idx_ok], dtype=torch.long, device=rank_device(group))
    dist.all_reduce(check, op=dist.ReduceOp.MAX, group=group)
    high_steps, low_steps, high_eos, low_eos, minus_all_idx_ok = check.tolist()
    if high_steps != -low_steps:
        raise ValueError(f"max_new_tokens must be the same non-negative integer on every rank, got values from "
                         f"{-low_steps} to {high_steps} over the ranks (-1: not a non-negative integer)")
    if high_eos != -low_eos:
        raise ValueError("eos_id must be the same on every rank (an id or None on all)")
    if minus_all_idx_ok == 0:
        mine = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx must be a (batch, tokens) tensor with tokens >= 1 on every rank, and is not on some "
                         f"rank (this rank's: {mine})")
    return generate(model, idx, max_new_tokens, eos_id=eos_id, stop=lockstep_stop(group), **kwargs)


def expert_parallel_gradients(groups=None):
    """The `prepare_gradients` hook of utils.train.train for an expert-parallel model: it makes every
    rank's gradients those of one process training on the whole batch, then clips them. groups: the
    ParallelGroups of expert_data_parallel_groups, or None (the experts split over every process,
    with no copies).

    Each of the P processes back-propagates the mean loss over its share of the tokens plus the full
    aux loss (utils.train.train does). The one-process loss on the whole batch (equal shares) is
    the mean of the P rank losses plus the aux loss once, so:
    - a replicated weight's gradient is averaged over all P processes. Its language-model part is
      the gradient of this rank's mean loss, whose average over the ranks is one process's. Its
      aux-loss part: all P ranks back-propagate the same aux loss, and the backward of the
      all-reduce inside it (sum_over_ranks) adds up their P equal gradients, so each rank gets P
      times the aux loss's gradient through its own share of the routing statistics. Summed over
      the ranks that is P times one process's aux gradient; averaged, exactly one process's. (If
      each rank back-propagated aux_loss / P instead, the sum over ranks would be right.)
    - a local expert's gradient already sums the contributions of every token of its expert-parallel
      group (the reverse all-to-all brought them back), each from a rank-local mean; the copies of
      the expert in the other data-parallel rows saw the other tokens. So it is summed over the
      data-parallel group and divided by P: the average over the copies, divided by expert_size.
    Clipping uses the norm of the whole model's gradients: the replicated ones once, and every
    expert once (the experts of one expert-parallel group, whose copies now hold equal gradients).
    """
    expert_group = None if groups is None else groups.expert
    data_group = None if groups is None or groups.data_size == 1 else groups.data

    def prepare(model, grad_clip):
        world_size = dist.get_world_size()
        local = {id(p) for m in model.modules() if isinstance(m, ExpertParallelMoE)
                 for p in m.local_experts.parameters()}
        for param in model.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            if id(param) not in local:
                dist.all_reduce(param.grad)                   # every process
            elif data_group is not None:
                dist.all_reduce(param.grad, group=data_group)     # the copies of this expert
            param.grad /= world_size
        if grad_clip is None:
            return
        squares = torch.zeros(2, dtype=torch.float64, device=rank_device())   # [replicated, this rank's experts]
        for param in model.parameters():
            squares[int(id(param) in local)] += param.grad.double().pow(2).sum().to(squares.device)
        experts_sq = squares[1:].clone()
        dist.all_reduce(experts_sq, group=expert_group)
        norm = (squares[0] + experts_sq[0]).sqrt().item()
        scale = min(1.0, grad_clip / (norm + 1e-6))          # the rule of torch.nn.utils.clip_grad_norm_
        for param in model.parameters():
            param.grad *= scale
    return prepare


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _checkpoint_entries(model):
    """The tensors of model's state_dict under their names in the single-process model: a list of
    (name, tensor, first, full_shape). For an ExpertParallelMoE at P, "P.moe.X" is "P.X", and its
    local experts "P.local_experts.Y" are rows first .. first + E/W - 1 of "P.experts.Y", whose full
    shape is (E, ...); the experts of a layer that is not expert-parallel have first = 0; first is
    None for every other tensor (full_shape is its own shape then, too)."""
    wrapped = {name: m for name, m in model.named_modules() if isinstance(m, ExpertParallelMoE)}
    plain = [f"{name}.experts." if name else "experts." for name, m in model.named_modules()
             if isinstance(m, MoEFeedForward) and m.experts is not None]
    entries = []
    for name, tensor in model.state_dict().items():
        entry = (name, tensor, 0 if any(name.startswith(p) for p in plain) else None, tuple(tensor.shape))
        for prefix, layer in wrapped.items():
            at = f"{prefix}." if prefix else ""
            if name.startswith(f"{at}moe."):
                entry = (at + name[len(at) + 4:], tensor, None, tuple(tensor.shape))
            elif name.startswith(f"{at}local_experts."):
                entry = (f"{at}experts.{name[len(at) + 14:]}", tensor, layer.first_expert,
                         (layer.moe.num_experts, *tensor.shape[1:]))
        entries.append(entry)
    return entries


def _writes_experts(model):
    """Whether this rank writes its experts: its expert-parallel groups hold global rank 0 (their ranks
    hold every expert once; the other data-parallel copies stay silent). Without a process group: yes."""
    groups = [m.group for m in model.modules() if isinstance(m, ExpertParallelMoE)]
    if not (dist.is_available() and dist.is_initialized()):
        return True
    if not groups:                                       # not expert-parallel: rank 0 writes everything
        return dist.get_rank() == 0
    return all(0 in dist.get_process_group_ranks(g or dist.group.WORLD) for g in groups)


def save_expert_parallel(model, path):
    """Write model, expert-parallel or not, as one safetensors file at `path`: the state_dict of the
    single-process model, every layer's experts stacked in one tensor per weight, expert e at
    index e (safetensors.torch.load_file reads it; so does load_expert_parallel, for any W).

    Every rank must call it (two barriers). No rank gathers the experts: rank 0 writes the header
    (computed from the shapes alone, so every rank knows where each tensor goes) and the replicated
    weights; then every rank of the expert-parallel group of rank 0 writes its own experts' bytes
    at their place in the file (the data-parallel copies of those experts write nothing). The file
    must therefore be on a file system every rank sees (one machine, or a shared one). The tensors
    lie in the file by element size, largest first, then by name (the safetensors library, too,
    puts larger elements first; among equal sizes it orders by dtype), so every tensor starts at
    a multiple of its element size, as readers that map the file into memory expect.
    """
    entries = sorted(_checkpoint_entries(model), key=lambda entry: (-entry[1].element_size(), entry[0]))
    header, offset = {}, 0
    for name, tensor, _, full_shape in entries:
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype must be one of {list(_SAFETENSORS_DTYPES)}, got {tensor.dtype}")
        size = math.prod(full_shape) * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(full_shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                              # safetensors pads the header to 8 bytes
    data_start = 8 + len(raw)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0

    def tensor_bytes(t):
        return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()

    if rank == 0:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(data_start + offset)
            for name, tensor, first, _ in entries:
                if first is None:
                    f.seek(data_start + header[name]["data_offsets"][0])
                    f.write(tensor_bytes(tensor))
    if distributed:
        dist.barrier()                                         # the file exists, at its full size
    if _writes_experts(model):
        with open(path, "r+b") as f:
            for name, tensor, first, _ in entries:
                if first is not None:                          # rows first.. of the stacked tensor
                    per_expert = math.prod(tensor.shape[1:]) * tensor.element_size()
                    f.seek(data_start + header[name]["data_offsets"][0] + first * per_expert)
                    f.write(tensor_bytes(tensor))
    if distributed:
        dist.barrier()                                         # every rank's experts are written


def load_expert_parallel(model, path):
    """Load a checkpoint of save_expert_parallel (or any safetensors file of the single-process model's
    state_dict) into model, expert-parallel over any number of ranks, or not. Each rank reads only
    its own experts, rows first .. first + E/W - 1 of each stacked tensor (safetensors' get_slice
    reads just those bytes), and the replicated weights. No collective: every rank reads alone.

    Only the loading is bounded this way: the model itself must already exist on every rank. The
    course builds it whole on every rank (from a seed) and ExpertParallelMoE then keeps only the
    local experts, so building peaks at the whole model's size; a job whose model does not fit one
    device would build it on PyTorch's meta device and allocate only its own experts.

    Returns {"expert_values": ..., "other_values": ...}, the numbers of values this rank read.
    Raises a ValueError naming the tensors the checkpoint lacks or has in excess, or a tensor whose
    shape or dtype differs from the model's.
    """
    from safetensors import safe_open

    entries = _checkpoint_entries(model)
    read = {"expert_values": 0, "other_values": 0}
    with safe_open(path, framework="pt", device="cpu") as f:
        stored, wanted = set(f.keys()), {name for name, *_ in entries}
        if stored != wanted:
            raise ValueError(f"the checkpoint's tensors must be the model's: missing {sorted(wanted - stored)}, "
                             f"unexpected {sorted(stored - wanted)}")
        for name, tensor, first, full_shape in entries:
            part = f.get_slice(name)
            if tuple(part.get_shape()) != tuple(full_shape):
                raise ValueError(f"{name}: the checkpoint's shape {tuple(part.get_shape())} must be the model's, "
                                 f"{tuple(full_shape)}")
            if part.get_dtype() != _SAFETENSORS_DTYPES.get(tensor.dtype):
                raise ValueError(f"{name}: the checkpoint's dtype {part.get_dtype()} must be the model's, "
                                 f"{_SAFETENSORS_DTYPES.get(tensor.dtype, tensor.dtype)}")
            if first is None:
                values = part[:] if full_shape else f.get_tensor(name)
                read["other_values"] += values.numel()
            else:
                values = part[first:first + tensor.shape[0]]
                read["expert_values"] += values.numel()
            with torch.no_grad():
                tensor.copy_(values)
    return read


def rank_device(group=None):
    """This rank's device: its GPU under the nccl backend, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_under_torchrun():
    """Run by `torchrun --standalone --nproc_per_node=W -m utils.parallel`: every rank builds the same
    layer and batch, runs its share through ExpertParallelMoE, and rank 0 compares the gathered
    outputs with the single-process layer's."""
    dist.init_process_group("gloo")                       # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world_size = dist.get_rank(), dist.get_world_size()
    cfg = {"emb_dim": 16, "num_experts": 4 * world_size, "num_experts_per_tok": 2, "moe_hidden_dim": 8}
    torch.manual_seed(0)
    moe = make_moe(cfg)
    x = torch.randn(world_size, 6, cfg["emb_dim"])
    with torch.no_grad():
        reference = moe(x)
        mine = ExpertParallelMoE(moe)(x[rank:rank + 1])
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        error = (torch.cat(gathered) - reference).abs().max().item()
        print(f"torchrun, {world_size} processes: expert-parallel output equals the single-process layer "
              f"(max difference {error:.1e})" if error < 1e-5 else f"MISMATCH: max difference {error:.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    _check_under_torchrun()
