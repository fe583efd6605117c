"""Shared experts, DeepSeek-V3 routing, aux-loss-free balancing and LatentMoE, checked against
`transformers`' own implementations of Qwen2-MoE, DeepSeek-V3 and Nemotron-H."""
import warnings

import pytest
import torch

from utils.moe_gpt import MoEGPTModel
from utils.moe import LatentMoE, MoEFeedForward, fine_grained, make_moe, moe_layers
from utils.moe_gpt import update_expert_biases
from utils.router import TopKRouter, load_balancing_loss, sequence_balance_loss

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformers
transformers.logging.set_verbosity_error()


def copy_swiglu_experts(ours, theirs):
    """Our stacked SwiGLU experts -> transformers' fused gate_up_proj / down_proj."""
    theirs.gate_up_proj.copy_(torch.cat([ours.w_gate, ours.w_in], dim=1))
    theirs.down_proj.copy_(ours.w_out)


def copy_shared_swiglu(ours, theirs):
    theirs.gate_proj.weight.copy_(ours.w_gate[0])
    theirs.up_proj.weight.copy_(ours.w_in[0])
    theirs.down_proj.weight.copy_(ours.w_out[0])


def output(module, x):
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def test_matches_transformers_qwen2_moe_block_with_gated_shared_expert():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    D, H, Hs, E, k = 32, 24, 40, 8, 2
    torch.manual_seed(0)
    ours = MoEFeedForward({"emb_dim": D, "num_experts": E, "num_experts_per_tok": k, "moe_hidden_dim": H,
                           "expert_type": "swiglu", "norm_topk_prob": False,
                           "num_shared_experts": 1, "shared_expert_hidden_dim": Hs,
                           "shared_expert_gate": True}).eval()
    theirs = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
        hidden_size=D, moe_intermediate_size=H, shared_expert_intermediate_size=Hs, num_experts=E,
        num_experts_per_tok=k, norm_topk_prob=False, hidden_act="silu")).eval()
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.router.gate.weight)
        copy_swiglu_experts(ours.experts, theirs.experts)
        copy_shared_swiglu(ours.shared_expert, theirs.shared_expert)
        theirs.shared_expert_gate.weight.copy_(ours.shared_expert_gate.weight)
        x = torch.randn(2, 9, D)
        assert torch.allclose(ours(x), output(theirs, x), atol=1e-5)


def deepseek_pair(n_group, topk_group, seed=0):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    D, H, E, k, S = 32, 16, 16, 4, 2
    torch.manual_seed(seed)
    ours = MoEFeedForward({"emb_dim": D, "num_experts": E, "num_experts_per_tok": k, "moe_hidden_dim": H,
                           "expert_type": "swiglu", "router_type": "sigmoid", "norm_topk_prob": True,
                           "routed_scaling_factor": 2.5, "n_group": n_group, "topk_group": topk_group,
                           "num_shared_experts": S}).eval()
    theirs = DeepseekV3MoE(DeepseekV3Config(
        hidden_size=D, moe_intermediate_size=H, n_routed_experts=E, num_experts_per_tok=k, n_shared_experts=S,
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=True,
        hidden_act="silu")).eval()
    with torch.no_grad():
        ours.router.expert_bias.copy_(0.3 * torch.randn(E))       # a bias that changes selections
        theirs.gate.weight.copy_(ours.router.gate.weight)
        theirs.gate.e_score_correction_bias.copy_(ours.router.expert_bias)
        copy_swiglu_experts(ours.experts, theirs.experts)
        copy_shared_swiglu(ours.shared_expert, theirs.shared_experts)
    return ours, theirs


@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2), (8, 3)])
def test_matches_transformers_deepseek_v3_moe(n_group, topk_group):
    ours, theirs = deepseek_pair(n_group, topk_group)
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), output(theirs, x), atol=1e-5)


def test_bias_changes_selection_but_not_gate_values():
    torch.manual_seed(0)
    router = TopKRouter(16, 8, 2, router_type="sigmoid", norm_topk_prob=False)
    x = torch.randn(50, 16)
    _, scores, _, idx0, w0 = router(x)
    assert torch.equal(w0, scores.gather(1, idx0))
    with torch.no_grad():
        router.expert_bias[3] = 10.0                               # expert 3 now always selected
    _, scores1, _, idx1, w1 = router(x)
    assert torch.all((idx1 == 3).any(-1))
    assert torch.equal(scores1, scores)                             # affinities untouched
    assert torch.equal(w1, scores.gather(1, idx1))                  # gates = unbiased scores


def test_group_limited_routing_stays_in_the_best_groups():
    E, G, G_k, k = 16, 4, 2, 4
    torch.manual_seed(0)
    router = TopKRouter(16, E, k, router_type="sigmoid", n_group=G, topk_group=G_k)
    with torch.no_grad():
        router.expert_bias.copy_(0.2 * torch.randn(E))
    x = torch.randn(200, 16)
    _, _, _, idx, _ = router(x)
    # The groups' scores, computed here independently: per token and group of 4 experts, the sum
    # of the two largest biased affinities sigmoid(x W^T) + bias.
    biased = torch.sigmoid(x @ router.gate.weight.detach().T) + router.expert_bias
    n_outside = 0
    for token in range(200):
        group_scores = [sorted(biased[token, g * 4:(g + 1) * 4].tolist())[-2:] for g in range(G)]
        group_scores = [sum(pair) for pair in group_scores]
        best = set(sorted(range(G), key=lambda g: group_scores[g])[-G_k:])
        assert {e // 4 for e in idx[token].tolist()} <= best
        allowed = [e for e in range(E) if e // 4 in best]
        expected = sorted(allowed, key=lambda e: biased[token, e].item())[-k:]
        assert sorted(idx[token].tolist()) == sorted(expected)          # the k best inside those groups
        n_outside += any(e // 4 not in best for e in biased[token].topk(k).indices.tolist())
    assert n_outside > 20                     # without the group limit, many tokens would leave them


def test_aux_loss_free_bias_update():
    torch.manual_seed(0)
    moe = MoEFeedForward({"emb_dim": 16, "num_experts": 4, "num_experts_per_tok": 1, "moe_hidden_dim": 8,
                          "router_type": "sigmoid", "bias_update_rate": 0.01, "aux_loss_coef": 0.0})
    model = torch.nn.Sequential(moe)
    moe(torch.randn(1, 40, 16))
    load = moe.last_routing["tokens_per_expert"].float()
    update_expert_biases(model)
    expected = 0.01 * torch.sign(load.mean() - load)
    assert torch.equal(moe.router.expert_bias, expected)
    assert moe.aux_loss.item() == 0.0


def test_expert_bias_gets_no_gradient_and_does_not_change_the_gates_gradient():
    # With a bias that changes selections: the bias must stay out of the autograd graph, and the
    # router's gradient may depend on which experts were selected, but not on the bias itself.
    # Adding the same constant to every expert's bias changes no selection; if the gates were
    # computed from the biased scores, the renormalised gates and their gradient would change.
    cfg = {"emb_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_hidden_dim": 8,
           "router_type": "sigmoid", "norm_topk_prob": True, "bias_update_rate": 0.01, "aux_loss_coef": 0.0}
    torch.manual_seed(0)
    x = torch.randn(2, 20, 16)
    bias = 0.2 * torch.randn(8)
    results = []
    for shift in (0.0, 0.7):
        torch.manual_seed(1)
        moe = MoEFeedForward(cfg)
        with torch.no_grad():
            moe.router.expert_bias.copy_(bias + shift)
        moe.router.expert_bias.requires_grad_(True)          # let autograd report any use of it
        y = moe(x)
        (y.pow(2).sum() + moe.aux_loss).backward()
        assert moe.router.expert_bias.grad is None
        results.append((moe.last_routing["topk_idx"], y.detach(), moe.router.gate.weight.grad))
    (idx0, y0, g0), (idx1, y1, g1) = results
    unbiased = MoEFeedForward(cfg)
    unbiased(x)
    assert not torch.equal(unbiased.last_routing["topk_idx"], idx0)     # the bias does change selections
    assert torch.equal(idx0, idx1) and torch.allclose(y0, y1, atol=1e-6)
    assert g0.abs().sum() > 0 and torch.allclose(g0, g1, atol=1e-6)


def test_sequence_balance_loss():
    E, k, T = 4, 1, 8
    probs = torch.full((2 * T, E), 1 / E)
    balanced = (torch.arange(2 * T) % E).unsqueeze(1)
    assert sequence_balance_loss(probs, balanced, batch_size=2).item() == pytest.approx(1.0)
    one_hot = torch.zeros(2 * T, E)
    one_hot[:, 0] = 1
    assert sequence_balance_loss(one_hot, torch.zeros(2 * T, k, dtype=torch.long), 2).item() == pytest.approx(E)


def test_sequence_balance_loss_sees_collapsed_sequences_in_a_balanced_batch():
    # E=4, k=2: sequence 0 sends every token to experts 0 and 1, sequence 1 to experts 2 and 3.
    # Over the batch every expert gets a quarter of the assignments and a quarter of the
    # probability, so the batch-level Switch loss is 1, perfectly balanced. Within each sequence
    # two experts get everything: f = E/k = 2 for each, P = 1/2 each, so the loss is E/k = 2.
    E, k, T = 4, 2, 6
    idx = torch.cat([torch.tensor([[0, 1]]).repeat(T, 1), torch.tensor([[2, 3]]).repeat(T, 1)])   # (2T, k)
    probs = torch.zeros(2 * T, E)
    probs[:T, :2] = probs[T:, 2:] = 0.5
    assert load_balancing_loss(probs, idx).item() == pytest.approx(1.0)
    assert sequence_balance_loss(probs, idx, batch_size=2).item() == pytest.approx(E / k)
    # Treated as a single sequence of 2T tokens, the same routing is balanced.
    assert sequence_balance_loss(probs, idx, batch_size=1).item() == pytest.approx(1.0)


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_fine_grained_keeps_expert_matrices_constant(expert_type):
    cfg = {"emb_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_hidden_dim": 32, "expert_type": expert_type}
    fine = fine_grained(cfg, 4)
    assert (fine["num_experts"], fine["num_experts_per_tok"], fine["moe_hidden_dim"]) == (16, 8, 8)
    a, b = MoEFeedForward(cfg), MoEFeedForward(fine)
    matrices = lambda m: sum(p.numel() for p in m.experts.parameters() if p.dim() == 3)
    active = lambda m: m.top_k * sum(p[0].numel() for p in m.experts.parameters() if p.dim() == 3)
    assert matrices(a) == matrices(b) and active(a) == active(b)
    extra = 16 * (16 - 4) + (16 * (16 - 4) if expert_type == "gelu" else 0)   # router rows (+ output biases)
    assert count(b) - count(a) == extra
    with pytest.raises(ValueError, match="m must"):
        fine_grained(cfg, 3)


def test_shared_experts_equal_one_wide_mlp_and_are_always_active():
    torch.manual_seed(0)
    cfg = {"emb_dim": 16, "num_experts": 4, "num_experts_per_tok": 1, "moe_hidden_dim": 8, "num_shared_experts": 2}
    moe = MoEFeedForward(cfg)
    assert moe.shared_expert.w_in.shape == (1, 16, 16)
    x = torch.randn(1, 5, 16)
    routed_only = MoEFeedForward({**cfg, "num_shared_experts": 0})
    routed_only.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("shared")})
    # The shared expert written out as one GELU MLP of width 2 * 8 from its weight tensors:
    w_in, b_in, w_out, b_out = (getattr(moe.shared_expert, n)[0] for n in ("w_in", "b_in", "w_out", "b_out"))
    by_hand = torch.nn.functional.gelu(x @ w_in.T + b_in, approximate="tanh") @ w_out.T + b_out
    assert torch.allclose(moe(x) - routed_only(x), by_hand, atol=1e-6)
    assert by_hand.abs().min() > 0                                         # it acts on every token


def nemotron_pair(latent, seed=0):
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    D, H, Hs, E, k = 32, 24, 48, 16, 4
    torch.manual_seed(seed)
    cfg = {"emb_dim": D, "num_experts": E, "num_experts_per_tok": k, "moe_hidden_dim": H, "expert_type": "relu2",
           "router_type": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.0, "n_group": 4,
           "topk_group": 2, "num_shared_experts": 1, "shared_expert_hidden_dim": Hs, "latent_dim": latent}
    ours = make_moe(cfg).eval()
    theirs = NemotronHMoE(NemotronHConfig(
        hidden_size=D, moe_intermediate_size=H, moe_shared_expert_intermediate_size=Hs, n_routed_experts=E,
        num_experts_per_tok=k, n_group=4, topk_group=2, routed_scaling_factor=2.0, norm_topk_prob=True,
        mlp_hidden_act="relu2", mlp_bias=False, moe_latent_size=latent)).eval()
    with torch.no_grad():
        ours.router.expert_bias.copy_(0.3 * torch.randn(E))
        theirs.gate.weight.copy_(ours.router.gate.weight)
        theirs.gate.e_score_correction_bias.copy_(ours.router.expert_bias)
        theirs.experts.up_proj.copy_(ours.experts.w_in)
        theirs.experts.down_proj.copy_(ours.experts.w_out)
        theirs.shared_experts.up_proj.weight.copy_(ours.shared_expert.w_in[0])
        theirs.shared_experts.down_proj.weight.copy_(ours.shared_expert.w_out[0])
        if latent:
            theirs.fc1_latent_proj.weight.copy_(ours.down_proj.weight)
            theirs.fc2_latent_proj.weight.copy_(ours.up_proj.weight)
    return ours, theirs


@pytest.mark.parametrize("latent", [8, None])
def test_latent_moe_matches_transformers_nemotron_h(latent):
    ours, theirs = nemotron_pair(latent)
    assert isinstance(ours, LatentMoE if latent else MoEFeedForward)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), output(theirs, x), atol=1e-5)


def test_latent_moe_shapes_and_parameters():
    D, l, H, E = 32, 8, 24, 6
    cfg = {"emb_dim": D, "num_experts": E, "num_experts_per_tok": 2, "moe_hidden_dim": H, "expert_type": "relu2",
           "latent_dim": l}
    latent, plain = LatentMoE(cfg), LatentMoE({**cfg, "latent_dim": None})
    assert latent.experts.w_in.shape == (E, H, l)
    assert count(latent) == D * E + E * 2 * l * H + 2 * D * l
    assert count(plain) == D * E + E * 2 * D * H
    assert latent(torch.randn(2, 3, D)).shape == (2, 3, D)
    model = MoEGPTModel({"vocab_size": 20, "context_length": 8, "emb_dim": D, "n_heads": 4, "n_layers": 2, **cfg})
    assert all(isinstance(m, LatentMoE) for m in moe_layers(model)) and len(moe_layers(model)) == 2


@pytest.mark.parametrize("shared", [{"num_shared_experts": 2}, {"num_shared_experts": 1, "shared_expert_hidden_dim": 40}])
def test_fine_grained_keeps_the_shared_experts_width(shared):
    from utils.config import shared_expert_hidden

    cfg = {"emb_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_hidden_dim": 32, **shared}
    fine = fine_grained(cfg, 4)
    width = shared_expert_hidden({**cfg, "shared_expert_hidden_dim": cfg.get("shared_expert_hidden_dim")})
    assert width in (64, 40) and shared_expert_hidden(fine) == width
    a, b = MoEFeedForward(cfg), MoEFeedForward(fine)
    assert a.shared_expert.w_in.shape == b.shared_expert.w_in.shape == (1, width, 16)
    assert count(a.shared_expert) == count(b.shared_expert)
