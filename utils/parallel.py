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
from .moe import Experts, MoEFeedForward, combine, dispatch_sorted, make_moe
from .moe_gpt import MoEGPTModel
from .train import train


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
    replicated (their gradients must be summed over ranks, as data parallelism does). The
    load-balancing and z losses are computed over all ranks' tokens, as the single-process layer
    would; `aux_loss` holds that global value on every rank.

    The wrapped layer keeps its router, shared expert and projections; its `experts` are deleted
    (this rank's share is copied into `local_experts`). After each forward pass the wrapped layer's
    `last_routing` describes this rank's tokens, and `last_exchange` holds what this rank
    exchanged: the rows it sent to each rank and received from each in the dispatch (the combine
    sends them back the other way), and the bytes of token vectors that left this rank in both
    exchanges together (rows to other ranks in the dispatch, plus results returned to other ranks
    in the combine; as many bytes arrive).

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
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("no process group: call torch.distributed.init_process_group first, "
                               "or run the code through utils.launch.launch (or torchrun)")
        if moe.capacity_factor is not None:
            raise ValueError(f"capacity_factor must be None (dropless) for ExpertParallelMoE, got {moe.capacity_factor}")
        if moe.seq_aux_loss_coef > 0:
            raise ValueError("seq_aux_loss_coef must be 0: the sequence-wise loss is not implemented across ranks")
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
        moe.aux_loss = None                      # the losses of this layer are self.aux_loss from now on
        self.aux_loss = None
        self.last_exchange = None

    def decoding_stop(self):
        """The stop rule utils.gpt.generate uses for a model holding this layer: every rank keeps
        stepping until every rank's rows have finished (lockstep_stop over this layer's group)."""
        return lockstep_stop(self.group)

    def forward(self, x):
        """x: (B, T, D) -> (B, T, D); B or T may be 0 (and differ between ranks)."""
        moe, W, E_r = self.moe, self.world_size, self.experts_per_rank
        if x.dim() != 3:
            raise ValueError(f"x must be a (batch, tokens, emb_dim) tensor, got shape {tuple(x.shape)}")
        B, T, D = x.shape
        flat = x.reshape(B * T, D)                                            # (N, D), N may be 0
        route = moe.router(flat)
        token_idx, expert_idx, gates, _ = moe.assignments(route, B, T)        # (A,) each, A = N * k
        order = torch.argsort(expert_idx, stable=True)                        # by expert, hence by rank
        token_idx, sorted_experts, gates = token_idx[order], expert_idx[order], gates[order]
        # How many rows go to each rank, and to each expert there: (W, E_r).
        send_matrix = torch.bincount(sorted_experts, minlength=W * E_r).view(W, E_r)
        recv_matrix = torch.empty_like(send_matrix)
        dist.all_to_all_single(recv_matrix, send_matrix, group=self.group)   # row w: what rank w sends us
        send_counts, recv_counts = send_matrix.sum(1).tolist(), recv_matrix.sum(1).tolist()

        vectors = moe.to_experts(flat).index_select(0, token_idx)             # (A, d) grouped by destination
        # Without _in_graph, a rank whose input needs no grad and that receives no rows would build
        # no autograd node for the exchanges and skip their backward all-to-alls, while the other
        # ranks wait in them (a hang under NCCL, "Connection closed by peer" under gloo). With it,
        # both AllToAll nodes are in the graph on every rank whenever grad is enabled.
        vectors = _in_graph(vectors)
        received = AllToAll.apply(vectors, send_counts, recv_counts, self.group)   # (R, d)
        # Received rows come by source rank, and within each by expert: label them with local experts.
        local_ids = torch.arange(E_r, device=x.device).repeat(W)               # (W * E_r,)
        row_expert = local_ids.repeat_interleave(recv_matrix.reshape(-1))      # (R,)
        rows = torch.arange(len(row_expert), device=x.device)
        results = dispatch_sorted(received, rows, row_expert, torch.ones_like(row_expert, dtype=received.dtype),
                                  self.local_experts)                           # (R, d), same row order
        returned = AllToAll.apply(results, recv_counts, send_counts, self.group)   # (A, d), order of `vectors`

        routed = combine(returned, token_idx, gates, B * T, returned.dtype)   # (N, d), as dispatch_sorted sums
        out = moe.add_shared_expert(flat, moe.from_experts(routed))
        # The single-process losses, with every token count and sum added up over the ranks.
        self.aux_loss = moe.balancing_loss(route, B, sum_over_ranks=self.sum_over_ranks)
        moe._routing = (route.probs.detach(), route.topk_idx.detach(), None)   # for moe.last_routing
        width = vectors.shape[1] * vectors.element_size()
        off_rank = sum(c for w, c in enumerate(send_counts) if w != self.rank) + \
            sum(c for w, c in enumerate(recv_counts) if w != self.rank)
        self.last_exchange = {"sent_rows": send_counts, "received_rows": recv_counts, "bytes_sent": off_rank * width}
        return out.reshape(B, T, D)

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
    """A `stop` for utils.gpt.generate under expert parallelism: every rank must run the same number
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
    """utils.gpt.generate on every rank of a process group, the ranks kept in lockstep: each rank
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
    from .gpt import generate

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("no process group: call torch.distributed.init_process_group first, "
                           "or run the code through utils.launch.launch (or torchrun)")
    steps, eos = _count_or_minus_one(max_new_tokens), (-2 if eos_id is None else _count_or_minus_one(eos_id))
    idx_ok = int(isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.shape[1] > 0)
    device = idx.device if isinstance(idx, torch.Tensor) else torch.device("cpu")
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    check = torch.tensor([steps, -steps, eos, -eos, -idx_ok], dtype=torch.long, device=device)
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


def _expert_ranks(topk_idx, num_experts, world_size):
    """The rank holding each chosen expert when num_experts experts are split evenly and in order
    over world_size ranks: topk_idx (any shape) -> the same shape. Checks the arguments."""
    for name, value in (("num_experts", num_experts), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
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
        squares = torch.zeros(2, dtype=torch.float64, device=_rank_device())   # [replicated, this rank's experts]
        for param in model.parameters():
            squares[int(id(param) in local)] += param.grad.double().pow(2).sum().to(squares.device)
        experts_sq = squares[1:].clone()
        dist.all_reduce(experts_sq, group=group)
        norm = (squares[0] + experts_sq[0]).sqrt().item()
        scale = min(1.0, grad_clip / (norm + 1e-6))          # the rule of torch.nn.utils.clip_grad_norm_
        for param in model.parameters():
            param.grad *= scale
    return prepare


def train_expert_parallel(rank, world_size, cfg, batches, lr, seed, grad_clip=1.0):
    """For launch: build MoEGPTModel(cfg) from `seed` on every rank, make it expert-parallel, and
    train it with utils.train.train (AdamW, warmup + cosine schedule, clipping, as one process
    would) for one step per batch, each rank on its share (a contiguous slice of sequences) of
    each batch of `batches`, a list of (inputs, targets) token id pairs (B, T). Returns each step's
    language-model loss of the whole batch (the mean of the ranks' losses).
    """
    if batches[0][0].shape[0] % world_size:
        raise ValueError(f"the batch size ({batches[0][0].shape[0]}) must be divisible by the world size ({world_size})")
    device = _rank_device()
    torch.manual_seed(seed)
    model = expert_parallel(MoEGPTModel(cfg).to(device))
    share = batches[0][0].shape[0] // world_size
    mine = [(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]) for x, y in batches]
    history = train(model, mine, None, max_steps=len(mine), peak_lr=lr, seed=seed, device=device,
                    grad_clip=grad_clip, prepare_gradients=expert_parallel_gradients(), verbose=False)
    losses = torch.tensor(history["batch_loss"], dtype=torch.float64, device=device)
    dist.all_reduce(losses)
    return (losses / world_size).tolist()


@torch.no_grad()
def measure_exchange(rank, world_size, configs, tokens_per_rank, seed=0):
    """For launch: for each {name: MoE layer config}, one forward pass of an ExpertParallelMoE built
    from `seed` on random tokens (tokens_per_rank on each rank); returns {name: its last_exchange,
    plus "width": values per token vector sent and "value_bytes": bytes per value}."""
    report = {}
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        layer = ExpertParallelMoE(make_moe(cfg).to(_rank_device()))
        x = torch.randn(world_size, tokens_per_rank, cfg["emb_dim"])[rank:rank + 1].to(_rank_device())
        layer(x)
        width = cfg.get("latent_dim") or cfg["emb_dim"]
        report[name] = {**layer.last_exchange, "width": width, "value_bytes": x.element_size()}
    return report


def _rank_device():
    """This rank's device: its GPU under the nccl backend, else the CPU."""
    if dist.get_backend() == "nccl":
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
