import pytest
import torch

from utils.benchmark import DenseEquivalent, ratios, time_forward_backward
from utils.moe import MoEFeedForward

CFG = {"emb_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_hidden_dim": 8}


@pytest.mark.parametrize("expert_type", ["gelu", "swiglu"])
def test_dense_equivalent_has_the_active_expert_parameters(expert_type):
    cfg = {**CFG, "expert_type": expert_type}
    dense = DenseEquivalent(cfg)
    moe = MoEFeedForward(cfg)
    per_expert_matrices = sum(p[0].numel() for p in moe.experts.parameters() if p.dim() == 3)
    dense_matrices = sum(p.numel() for p in dense.parameters() if p.dim() == 3)
    assert dense_matrices == cfg["num_experts_per_tok"] * per_expert_matrices
    assert dense(torch.randn(2, 3, 16)).shape == (2, 3, 16)


def test_benchmark_runs_every_module_and_reports_ratios():
    torch.manual_seed(0)
    modules = {"dense": DenseEquivalent(CFG), "sorted": MoEFeedForward(CFG),
               "loop": MoEFeedForward({**CFG, "moe_dispatch": "loop"})}
    times = time_forward_backward(modules, torch.randn(2, 8, 16), repeats=2, warmup=1)
    assert set(times) == set(modules) and all(t > 0 for t in times.values())
    r = ratios(times, "dense")
    assert r["dense"] == 1.0 and r["sorted"] == pytest.approx(times["sorted"] / times["dense"])
    assert all(p.grad is None for m in modules.values() for p in m.parameters())  # left clean
    with pytest.raises(ValueError, match="repeats"):
        time_forward_backward(modules, torch.randn(2, 8, 16), repeats=0)
