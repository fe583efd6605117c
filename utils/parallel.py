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
rank has a GPU); here, `ExpertParallelMoE` wraps an MoEFeedForward or LatentMoE;
`generate_expert_parallel` decodes on every rank, all ranks stepping together until all are done.
PyTorch's own launcher works too: `torchrun --standalone --nproc_per_node=2 -m utils.parallel` runs a
check of the layer against the single-process one.

Shapes: W = world size, E = experts, E_r = E / W experts per rank, N = local tokens, k = top-k,
A = N * k assignments, d = the experts' dimension (emb_dim, or latent_dim in a LatentMoE).
"""
import operator

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


class ExpertParallelMoE(nn.Module):
    """An MoEFeedForward or LatentMoE whose routed experts are split evenly over the ranks of a process
    group (the default group when None): rank r keeps experts r*E/W .. (r+1)*E/W - 1 only.

    forward(x): (B, T, D) -> (B, T, D), the layer's own signature. Each rank passes its own tokens;
    the outputs, and the gradients of inputs and expert weights, equal those of the single-process
    layer run on all ranks' tokens together. The router, shared expert and latent projections are
    replicated (their gradients must be summed over ranks, as data parallelism does).

    The wrapped layer runs as it is, with two of its parts replaced (see MoEFeedForward): its
    `dispatch` becomes `exchange` below, and its `sum_over_ranks` an all-reduce, so that its
    balancing and z losses, in `moe.aux_loss`, are those of all ranks' tokens on every rank. Its
    `experts` are dropped (this rank's share is copied into `local_experts`). After each forward
    pass the wrapped layer's `last_routing` describes this rank's tokens, and `last_exchange` holds
    what this rank exchanged: the rows it sent to each rank and received from each in the dispatch
    (the combine sends them back the other way), the bytes of token vectors that left this rank in
    both exchanges together (rows to other ranks in the dispatch, plus results returned to other
    ranks in the combine; as many bytes arrive), and the width (values per row) and value_bytes
    (bytes per value) of the rows.

    Ranks may hold different numbers of tokens (a different B or T), none at all (B = 0 or T = 0:
    the output is empty), or receive no rows (collapsed routing): every rank still takes part in
    both all-to-alls of the forward pass, and, when grad is enabled, of the backward pass. So that
    the backward exchanges happen on every rank whatever requires grad there, the tensors entering
    them are made part of the autograd graph whenever torch.is_grad_enabled(), a rule every rank
    decides alike (_in_graph). As with data parallelism, every rank must then call backward on a
    loss that uses this layer's output and aux_loss (or no rank may).
    """

    def __init__(self, moe, group=None):
        super().__init__()
        if not isinstance(moe, MoEFeedForward):
            raise ValueError(f"moe must be an MoEFeedForward or LatentMoE, got {type(moe).__name__}")
        _require_group()
        if moe.capacity_factor is not None:
            raise ValueError(f"capacity_factor must be None (dropless) for ExpertParallelMoE, got {moe.capacity_factor}")
        if moe.bias_update_rate > 0:
            raise ValueError("bias_update_rate must be 0: the bias updates would need the global expert loads, "
                             "and each rank's copy of the router would drift apart")
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        E = moe.num_experts
        if E % self.world_size:
            raise ValueError(f"num_experts ({E}) must be divisible by the world size ({self.world_size}): "
                             f"every rank holds the same number of experts")
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

    def exchange(self, x, token_idx, expert_idx, gate, experts=None):
        """The wrapped layer's dispatch, across ranks: x (N, d) in the experts' space; token_idx,
        expert_idx, gate (A,) this rank's assignments -> (N, d), the gate-weighted sum of each
        token's expert outputs, as dispatch_sorted computes it in one process. The experts that
        run here are self.local_experts (`experts`, the wrapped layer's, is None)."""
        W, E_r = self.world_size, self.experts_per_rank
        order = torch.argsort(expert_idx, stable=True)                        # by expert, hence by rank
        token_idx, sorted_experts, gate = token_idx[order], expert_idx[order], gate[order]
        # How many rows go to each rank, and to each expert there: (W, E_r).
        send_matrix = torch.bincount(sorted_experts, minlength=W * E_r).view(W, E_r)
        recv_matrix = torch.empty_like(send_matrix)
        dist.all_to_all_single(recv_matrix, send_matrix, group=self.group)   # row w: what rank w sends us
        send_counts, recv_counts = send_matrix.sum(1).tolist(), recv_matrix.sum(1).tolist()

        # Without _in_graph, a rank whose input needs no grad and that receives no rows would build
        # no autograd node for the exchanges and skip their backward all-to-alls, while the other
        # ranks wait in them (a hang under NCCL, "Connection closed by peer" under gloo). With it,
        # both AllToAll nodes are in the graph on every rank whenever grad is enabled.
        vectors = _in_graph(x.index_select(0, token_idx))                    # (A, d) grouped by destination
        received = AllToAll.apply(vectors, send_counts, recv_counts, self.group)   # (R, d)
        # Received rows come by source rank, and within each by expert: label them with local experts.
        local_ids = torch.arange(E_r, device=x.device).repeat(W)               # (W * E_r,)
        row_expert = local_ids.repeat_interleave(recv_matrix.reshape(-1))      # (R,)
        rows = torch.arange(len(row_expert), device=x.device)
        results = dispatch_sorted(received, rows, row_expert, torch.ones_like(row_expert, dtype=received.dtype),
                                  self.local_experts)                           # (R, d), same row order
        returned = AllToAll.apply(results, recv_counts, send_counts, self.group)   # (A, d), order of `vectors`

        width = vectors.shape[1] * vectors.element_size()
        off_rank = sum(c for w, c in enumerate(send_counts) if w != self.rank) + \
            sum(c for w, c in enumerate(recv_counts) if w != self.rank)
        self.last_exchange = {"sent_rows": send_counts, "received_rows": recv_counts, "bytes_sent": off_rank * width,
                              "width": vectors.shape[1], "value_bytes": vectors.element_size()}
        return combine(returned, token_idx, gate, x.shape[0], returned.dtype)   # (N, d)

    def sum_over_ranks(self, t):
        """t summed over the ranks of the group, with autograd (the gradient of the sum reaches
        every rank's t). Every rank calls it alike: _in_graph keeps its backward on every rank."""
        return AllReduceSum.apply(_in_graph(t), self.group)


def expert_parallel(model, group=None):
    """Replace every MoE layer of a course model, in place, by its ExpertParallelMoE; return the model."""
    for block in model.trf_blocks:
        if isinstance(block.ff, MoEFeedForward):
            block.ff = ExpertParallelMoE(block.ff, group)
    return model


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


def expert_parallel_gradients(group=None):
    """The `prepare_gradients` hook of utils.train.train for an expert-parallel model: it makes every
    rank's gradients those of one process training on the whole batch, then clips them.

    Each rank's loss is the mean over its share of the tokens. A replicated weight's gradient is
    averaged over the ranks. A local expert's gradient already sums the contributions of every
    rank's tokens (the reverse all-to-all brought them back), each computed from a rank-local mean,
    so it is divided by W. Clipping uses the norm of all gradients of all ranks: the replicated
    ones once, every rank's own experts added up over the ranks.
    """
    def prepare(model, grad_clip):
        world_size = dist.get_world_size(group)
        local = {id(p) for m in model.modules() if isinstance(m, ExpertParallelMoE)
                 for p in m.local_experts.parameters()}
        for param in model.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            if id(param) not in local:
                dist.all_reduce(param.grad, group=group)
            param.grad /= world_size
        if grad_clip is None:
            return
        squares = torch.zeros(2, dtype=torch.float64, device=rank_device(group))   # [replicated, this rank's experts]
        for param in model.parameters():
            squares[int(id(param) in local)] += param.grad.double().pow(2).sum().to(squares.device)
        experts_sq = squares[1:].clone()
        dist.all_reduce(experts_sq, group=group)
        norm = (squares[0] + experts_sq[0]).sqrt().item()
        scale = min(1.0, grad_clip / (norm + 1e-6))          # the rule of torch.nn.utils.clip_grad_norm_
        for param in model.parameters():
            param.grad *= scale
    return prepare


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
