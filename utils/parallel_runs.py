"""What notebook 10 launches on every rank (utils/launch.py): expert-parallel training with the
course's training loop (over expert x data-parallel groups too), one measured exchange per layer
config, a checkpoint saved over some ranks and loaded over others, and decoding in lockstep.
"""
import torch
import torch.distributed as dist

from .moe import make_moe
from .moe_gpt import MoEGPTModel
from .parallel import (ExpertParallelMoE, expert_data_parallel_groups, expert_parallel, expert_parallel_gradients,
                       generate_expert_parallel, load_expert_parallel, rank_device, save_expert_parallel)
from .train import train


def train_expert_parallel(rank, world_size, cfg, batches, lr, seed, grad_clip=1.0, expert_size=None, dedup=False):
    """For launch: build MoEGPTModel(cfg) from `seed` on every rank, make it expert-parallel, and
    train it with utils.train.train (AdamW, warmup + cosine schedule, clipping, as one process
    would) for one step per batch, each rank on its share (a contiguous slice of sequences) of
    each batch of `batches`, a list of (inputs, targets) token id pairs (B, T). expert_size: the
    size of the expert-parallel groups (expert_data_parallel_groups: the layout expert_size x
    world_size / expert_size; None: all world_size ranks split the experts, no copies); dedup:
    ExpertParallelMoE's. Returns each step's language-model loss of the whole batch (the mean of
    the ranks' losses).
    """
    if batches[0][0].shape[0] % world_size:
        raise ValueError(f"the batch size ({batches[0][0].shape[0]}) must be divisible by the world size ({world_size})")
    device = rank_device()
    groups = None if expert_size is None else expert_data_parallel_groups(expert_size)
    torch.manual_seed(seed)
    model = expert_parallel(MoEGPTModel(cfg).to(device), None if groups is None else groups.expert, dedup=dedup)
    share = batches[0][0].shape[0] // world_size
    mine = [(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]) for x, y in batches]
    history = train(model, mine, None, max_steps=len(mine), peak_lr=lr, seed=seed, device=device,
                    grad_clip=grad_clip, prepare_gradients=expert_parallel_gradients(groups), verbose=False)
    losses = torch.tensor(history["batch_loss"], dtype=torch.float64, device=device)
    dist.all_reduce(losses)
    return (losses / world_size).tolist()


def train_in_layouts(rank, world_size, cfg, batches, lr, seed, expert_sizes, grad_clip=1.0):
    """For launch: train_expert_parallel once for each expert-parallel size in expert_sizes (the
    layouts expert_size x world_size / expert_size), in one launch, with deduplicated dispatch where
    the size is above 1. Returns {expert_size: each step's loss of the whole batch}."""
    return {size: train_expert_parallel(rank, world_size, cfg, batches, lr, seed, grad_clip, size, size > 1)
            for size in expert_sizes}


@torch.no_grad()
def measure_exchange(rank, world_size, configs, tokens_per_rank, seed=0, dedup=False):
    """For launch: for each {name: MoE layer config}, one forward pass of an ExpertParallelMoE built
    from `seed` (with `dedup`) on random tokens (tokens_per_rank on each rank); returns {name: its
    last_exchange}, with "topk_idx", the (tokens_per_rank, k) experts this rank's tokens chose."""
    report = {}
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        layer = ExpertParallelMoE(make_moe(cfg).to(rank_device()), dedup=dedup)
        x = torch.randn(world_size, tokens_per_rank, cfg["emb_dim"])[rank:rank + 1].to(rank_device())
        layer(x)
        report[name] = {**layer.last_exchange, "topk_idx": layer.moe.last_routing["topk_idx"].cpu()}
    return report


def measure_exchange_with_and_without_dedup(rank, world_size, configs, tokens_per_rank, seed=0):
    """For launch: measure_exchange without and with deduplication, in one launch (the same layers and
    tokens for both): {False: its report without dedup, True: with}."""
    return {dedup: measure_exchange(rank, world_size, configs, tokens_per_rank, seed, dedup) for dedup in (False, True)}


@torch.no_grad()
def reshard_checkpoint(rank, world_size, cfg, path, batch, expert_sizes, seed=0):
    """For launch: build MoEGPTModel(cfg) from `seed`, expert-parallel over all world_size ranks, and
    save it to `path` (save_expert_parallel); then, for each expert_size, build a model from another
    seed, expert-parallel over groups of expert_size ranks, and load the checkpoint into it.
    Each rank runs its share of `batch` (B, T) token ids, B divisible by world_size. Returns
    {"saved": the saved model's logits, expert_size: {"before": the logits of the model built from
    the other seed, before loading, "logits": after loading, "read": load's report,
    "local_experts": the values of this rank's experts}}.

    Every rank builds each model whole (from its seed) before wrapping it, so building peaks at
    the whole model; what is bounded is the loading, each rank reading only its experts."""
    share = batch.shape[0] // world_size
    mine = batch[rank * share:(rank + 1) * share].to(rank_device())
    torch.manual_seed(seed)
    model = expert_parallel(MoEGPTModel(cfg).to(rank_device())).eval()
    save_expert_parallel(model, path)
    report = {"saved": model(mine).cpu()}
    for expert_size in expert_sizes:
        groups = expert_data_parallel_groups(expert_size)
        torch.manual_seed(seed + 1)                          # other weights, until the checkpoint is loaded
        other = expert_parallel(MoEGPTModel(cfg).to(rank_device()), groups.expert).eval()
        before = other(mine).cpu()
        read = load_expert_parallel(other, path)
        report[expert_size] = {"before": before, "logits": other(mine).cpu(), "read": read,
                               "local_experts": sum(p.numel() for m in other.modules() if isinstance(m, ExpertParallelMoE)
                                                    for p in m.local_experts.parameters())}
    return report


@torch.no_grad()
def decode_in_lockstep(rank, world_size, cfg, seed, prompts, max_new_tokens, eos_id, dedup=True, checkpoint=None):
    """For launch: build MoEGPTModel(cfg) from `seed`, expert-parallel over all ranks (with `dedup`),
    load `checkpoint` into it if given (load_expert_parallel: a trained model), and decode
    prompts[rank] (B_r, T_r) greedily with generate_expert_parallel (B_r may be 0).
    Returns {"tokens": (B_r, T_r + n), "forward_passes": how many times the first MoE layer ran,
    "batch_sizes": the set of batch sizes it saw}."""
    torch.manual_seed(seed)
    model = expert_parallel(MoEGPTModel(cfg).to(rank_device()), dedup=dedup)
    if checkpoint is not None:
        load_expert_parallel(model, checkpoint)
    seen = []
    model.trf_blocks[0].ff.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    tokens = generate_expert_parallel(model, prompts[rank].to(rank_device()), max_new_tokens, eos_id=eos_id)
    return {"tokens": tokens.cpu(), "forward_passes": len(seen), "batch_sizes": sorted(set(seen))}
