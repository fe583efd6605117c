"""What notebook 10 launches on every rank (utils/launch.py): expert-parallel training with the
course's training loop, and one measured exchange per layer config.
"""
import torch
import torch.distributed as dist

from .moe import make_moe
from .moe_gpt import MoEGPTModel
from .parallel import ExpertParallelMoE, rank_device, expert_parallel, expert_parallel_gradients
from .train import train


def train_expert_parallel(rank, world_size, cfg, batches, lr, seed, grad_clip=1.0):
    """For launch: build MoEGPTModel(cfg) from `seed` on every rank, make it expert-parallel, and
    train it with utils.train.train (AdamW, warmup + cosine schedule, clipping, as one process
    would) for one step per batch, each rank on its share (a contiguous slice of sequences) of
    each batch of `batches`, a list of (inputs, targets) token id pairs (B, T). Returns each step's
    language-model loss of the whole batch (the mean of the ranks' losses).
    """
    if batches[0][0].shape[0] % world_size:
        raise ValueError(f"the batch size ({batches[0][0].shape[0]}) must be divisible by the world size ({world_size})")
    device = rank_device()
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
    from `seed` on random tokens (tokens_per_rank on each rank); returns {name: its last_exchange}."""
    report = {}
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        layer = ExpertParallelMoE(make_moe(cfg).to(rank_device()))
        x = torch.randn(world_size, tokens_per_rank, cfg["emb_dim"])[rank:rank + 1].to(rank_device())
        layer(x)
        report[name] = layer.last_exchange
    return report
