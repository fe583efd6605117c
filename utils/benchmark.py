"""Speed as ratios: forward+backward time of several layers on the same input, in one process.

Absolute seconds depend on the machine and on whatever else it is doing; the ratio between two
layers measured side by side (interleaved, median of repeats) is what carries over.
"""
import statistics
import time

import torch
import torch.nn as nn

from .moe import Experts, validate_moe_config


class DenseEquivalent(nn.Module):
    """The dense MLP with the same active FLOPs per token as an MoE config: one expert of the same
    type with hidden size num_experts_per_tok * moe_hidden_dim. x: (..., D) -> (..., D)."""

    def __init__(self, cfg):
        super().__init__()
        cfg = validate_moe_config(cfg)
        hidden = cfg["num_experts_per_tok"] * cfg["moe_hidden_dim"]
        self.mlp = Experts(1, cfg["emb_dim"], hidden, cfg["expert_type"])

    def forward(self, x):
        return self.mlp([x])[0]


def _forward_backward(module, x):
    x = x.detach().requires_grad_(True)
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    module.zero_grad(set_to_none=True)


def time_forward_backward(modules, x, repeats=15, warmup=3):
    """Median seconds of one forward+backward pass for each module on the same x.

    modules: {name: nn.Module}. The modules are run in turn within every repeat, so a slow
    moment of the machine affects all of them alike.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = {name: [] for name in modules}
    for i in range(warmup + repeats):
        for name, module in modules.items():
            start = time.perf_counter()
            _forward_backward(module, x)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def ratios(times, baseline):
    """Each time divided by times[baseline]."""
    return {name: t / times[baseline] for name, t in times.items()}
