"""Speed as ratios: several calls (forward+backward passes of layers on the same input, generation
runs, ...) timed side by side in one process.

Absolute seconds depend on the machine and on whatever else it is doing; the ratio between two
layers measured side by side (interleaved in a rotating order, median of repeats) is what carries
over. On a GPU the clock is read only after the device has finished its queued work.
"""
import statistics
import time

import torch
import torch.nn as nn

from .config import validate_moe_config
from .experts import Experts


class DenseEquivalent(nn.Module):
    """The dense MLP with the same active FLOPs per token as an MoE config: one expert of the same
    type with hidden size num_experts_per_tok * moe_hidden_dim. x: (..., D) -> (..., D)."""

    def __init__(self, cfg):
        super().__init__()
        cfg = validate_moe_config(cfg)
        hidden = cfg["num_experts_per_tok"] * cfg["moe_hidden_dim"]
        self.mlp = Experts(1, cfg["emb_dim"], hidden, cfg["expert_type"])

    def forward(self, x):
        return self.mlp.as_mlp(x)


def synchronize(device):
    """Wait until `device` (CUDA or Apple MPS) has finished its queued work; CPU work is already done.

    GPU kernels run asynchronously: without this, the clock would measure how long it took to
    queue the work, not to do it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _forward_backward(module, x):
    x = x.detach().requires_grad_(True)
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    module.zero_grad(set_to_none=True)


def time_calls(calls, repeats=15, warmup=3, device="cpu"):
    """Median seconds of each call in `calls` ({name: function of no arguments}).

    The calls run in turn within every repeat, so a slow moment of the machine affects all of them
    alike; the turn order rotates by one each repeat, so no call always runs first (right after the
    others' memory traffic, or after a pause). `device`: where the calls queue their work.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not calls:
        raise ValueError("calls is empty: give at least one {name: function}")
    names = list(calls)
    times = {name: [] for name in names}
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_forward_backward(modules, x, repeats=15, warmup=3):
    """Median seconds of one forward+backward pass for each module ({name: nn.Module}) on the same x,
    timed side by side by time_calls."""
    return time_calls({name: (lambda m=module: _forward_backward(m, x)) for name, module in modules.items()},
                      repeats, warmup, x.device)


def ratios(times, baseline):
    """Each time divided by times[baseline]."""
    return {name: t / times[baseline] for name, t in times.items()}
