import math

import pytest
import torch

from utils.gpt import GPTModel
from utils.experts import Experts, dispatch_grouped, dispatch_loop, dispatch_sorted, prefers_grouped_mm
from utils.moe import MoEFeedForward, capacity_keep_mask, make_moe, moe_layers
from utils.moe_gpt import MoEGPTModel, upcycle
from utils.router import TopKRouter, load_balancing_loss, router_z_loss
from utils.train import total_aux_loss

# The grouped dispatch needs torch.nn.functional.grouped_mm (recent torch); older ones refuse it.
GROUPED = ("grouped",) if hasattr(torch.nn.functional, "grouped_mm") else ()
MOE = {"emb_dim": 16, "num_experts": 6, "num_experts_per_tok": 2, "moe_hidden_dim": 24}


def make(seed=0, **changes):
    torch.manual_seed(seed)
    return MoEFeedForward({**MOE, **changes})


def test_shape_and_aux_loss():
    moe = make()
    x = torch.randn(3, 5, 16)
    assert moe(x).shape == (3, 5, 16)
    assert moe.aux_loss.shape == () and moe.aux_loss.requires_grad
    stats = moe.last_routing
    assert stats["tokens_per_expert"].sum() == 3 * 5 * 2
    assert stats["topk_idx"].shape == (15, 2)
    counts = torch.bincount(stats["topk_idx"].flatten(), minlength=6)
    assert torch.equal(stats["tokens_per_expert"], counts)
    assert stats["load_imbalance"] == pytest.approx(counts.max().item() / 5.0)   # mean: 30 / 6
    assert stats["dropped_fraction"] == 0.0
    assert 0 < stats["router_entropy"] <= math.log(6) + 1e-6


def test_routing_stats_exact_values():
    from utils.router import routing_stats

    E = 4
    uniform = torch.full((8, E), 1 / E)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)                          # 4 assignments each
    stats = routing_stats(uniform, balanced)
    assert stats["tokens_per_expert"].tolist() == [4, 4, 4, 4]
    assert stats["load_imbalance"] == 1.0 and stats["dropped_fraction"] == 0.0
    assert stats["router_entropy"] == pytest.approx(math.log(E))
    skewed = torch.tensor([[0, 1]] * 6 + [[2, 3]] * 2)                     # counts 6, 6, 2, 2; mean 4
    stats = routing_stats(uniform, skewed)
    assert stats["tokens_per_expert"].tolist() == [6, 6, 2, 2] and stats["load_imbalance"] == 1.5
    collapsed = torch.zeros(8, 1, dtype=torch.long)                        # everything to expert 0
    one_hot = torch.zeros(8, E)
    one_hot[:, 0] = 1
    stats = routing_stats(one_hot, collapsed)
    assert stats["load_imbalance"] == E and stats["router_entropy"] == pytest.approx(0.0, abs=1e-6)
    keep = torch.ones(8, 2, dtype=torch.bool)
    keep[:4, 0] = False                                                    # drop 4 of expert 0's 6
    stats = routing_stats(uniform, skewed, keep)
    assert stats["tokens_per_expert"].tolist() == [2, 6, 2, 2]
    assert stats["load_imbalance"] == 2.0 and stats["dropped_fraction"] == 0.25


@pytest.mark.parametrize("bad, message", [
    ({"num_experts_per_tok": 7}, "num_experts_per_tok"),
    ({"num_experts": 0}, "num_experts"),
    ({"moe_hidden_dim": None}, "moe_hidden_dim"),
    ({"expert_type": "relu"}, "expert_type"),
    ({"moe_dispatch": "fast"}, "moe_dispatch"),
    ({"capacity_factor": 0}, "capacity_factor"),
    ({"aux_loss_coef": -1}, "aux_loss_coef"),
    ({"router_type": "tanh"}, "router_type"),
    ({"n_group": 4}, "n_group"),
    ({"n_group": 3, "topk_group": 4}, "topk_group"),
    ({"n_group": 3, "topk_group": 1, "num_experts_per_tok": 3}, "topk_group"),
    ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
    ({"num_shared_experts": -1}, "num_shared_experts"),
    ({"latent_dim": 0}, "latent_dim"),
    ({"bias_update_rate": -0.1}, "bias_update_rate"),
    ({"topk_group": 2}, "topk_group.*between 1 and n_group \\(1\\)"),
    ({"n_group": 3, "topk_group": 4}, "topk_group.*between 1 and n_group \\(3\\)"),
    ({"latent_dim": 17}, "latent_dim.*between 1 and emb_dim \\(16\\)"),
    ({"capacity_factor": math.inf}, "capacity_factor.*finite"),
    ({"capacity_factor": math.nan}, "capacity_factor.*finite"),
    ({"aux_loss_coef": math.inf}, "aux_loss_coef.*finite"),
    ({"shared_expert_gate": True}, "shared_expert_gate.*num_shared_experts >= 1"),
    ({"shared_expert_gate": 1.0}, "shared_expert_gate.*True or False"),
    ({"shared_expert_hidden_dim": 32}, "shared_expert_hidden_dim.*num_shared_experts >= 1"),
    ({"capacity_factr": 1.0}, "unknown config key.*did you mean 'capacity_factor'"),
    ({"aux_los_coef": 0.1}, "unknown config key.*did you mean 'aux_loss_coef'"),
    ({"norm_topk_prob": "no"}, "norm_topk_prob.*True or False"),
    ({"norm_topk_prob": None}, "norm_topk_prob.*True or False"),
    ({"num_experts": -4}, "num_experts"),
])
def test_bad_configs_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        MoEFeedForward({**MOE, **bad})


def test_every_reader_of_an_moe_config_refuses_a_misspelt_key():
    from utils.benchmark import DenseEquivalent
    from utils.moe import fine_grained
    from utils.params import moe_layer_costs

    for reader in (MoEFeedForward, DenseEquivalent, moe_layer_costs, lambda cfg: fine_grained(cfg, 2)):
        reader(MOE)
        with pytest.raises(ValueError, match="did you mean 'capacity_factor'"):
            reader({**MOE, "capacity_factr": 1.0})
    gpt = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2}
    with pytest.raises(ValueError, match="qkv_bias.*True or False"):
        GPTModel({**gpt, "qkv_bias": "no"})
    with pytest.raises(ValueError, match="num_experts.*0 \\(dense\\) or a positive integer"):
        MoEGPTModel({**gpt, **MOE, "num_experts": -4})        # silently dense before


@pytest.mark.parametrize("fine", [
    {"latent_dim": 16},                                                  # "projections only"
    {"num_shared_experts": 1, "shared_expert_hidden_dim": 32, "shared_expert_gate": True},
    {"n_group": 3, "topk_group": 3},
    {"capacity_factor": 1e6},
])
def test_edge_configs_are_accepted(fine):
    assert make(**fine)(torch.randn(1, 4, 16)).shape == (1, 4, 16)


def test_edge_configs_compute_what_they_reduce_to():
    x = torch.randn(2, 12, 16)
    # A capacity nobody reaches drops nothing: the dropless layer's output (same initial weights).
    assert torch.equal(make(capacity_factor=1e6)(x), make()(x))
    # Keeping all n_group groups is no restriction at all: ungrouped routing.
    grouped, plain = make(n_group=3, topk_group=3, router_type="sigmoid"), make(router_type="sigmoid")
    with torch.no_grad():
        for m in (grouped, plain):
            m.router.expert_bias.copy_(torch.linspace(-0.5, 0.5, 6))
    assert torch.equal(grouped(x), plain(x))
    assert torch.equal(grouped.last_routing["topk_idx"], plain.last_routing["topk_idx"])
    # ...whereas keeping 1 of 3 groups changes the routing of some tokens.
    restricted = make(n_group=3, topk_group=1, router_type="sigmoid")
    with torch.no_grad():
        restricted.router.expert_bias.copy_(plain.router.expert_bias)
    restricted(x)
    assert not torch.equal(restricted.last_routing["topk_idx"], plain.last_routing["topk_idx"])


def test_the_router_stays_float32_under_autocast_and_follows_float64():
    moe = make()
    x = torch.randn(4, 64, 16)
    logits, *_, topk_idx, _ = moe.router(x.reshape(-1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_logits, *_, auto_idx, _ = moe.router(x.reshape(-1, 16))
        assert moe(x).shape == x.shape
    assert auto_logits.dtype == torch.float32
    assert torch.equal(auto_idx, topk_idx)                                     # no token changes experts
    double = make().double()
    assert double.router.gate.weight.dtype == torch.float64
    assert double.router(x.reshape(-1, 16).double())[0].dtype == torch.float64
    small = make(emb_dim=4, num_experts=3, moe_hidden_dim=5, z_loss_coef=0.1).double()
    inputs = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: small(t).sum() + small.aux_loss, (inputs,))
    half = make().to(torch.bfloat16)                                          # 16 bits: the router keeps float32
    assert half.router.gate.weight.dtype == torch.float32 and half.experts.w_in.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(0, 5, 16), (3, 0, 16)])
def test_an_empty_batch_gives_an_empty_output_and_zero_losses(shape):
    moe = make(seq_aux_loss_coef=0.1, z_loss_coef=0.1, capacity_factor=1.0)
    x = torch.randn(*shape, requires_grad=True)
    y = moe(x)
    assert y.shape == shape and moe.aux_loss.item() == 0.0
    (y.sum() + moe.aux_loss).backward()
    stats = moe.last_routing
    assert stats["tokens_per_expert"].sum() == 0 and stats["load_imbalance"] == 1.0
    assert stats["dropped_fraction"] == 0.0 and stats["router_entropy"] == 0.0
    cfg = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1, **MOE}
    with pytest.raises(ValueError, match="at least one token"):
        MoEGPTModel(cfg)(torch.zeros(2, 0, dtype=torch.long))


def test_the_sequence_wise_loss_joins_the_layer_aux_loss():
    # Written out here from DeepSeek-V3's definition, independently of utils.moe.
    moe = make(aux_loss_coef=0.0, seq_aux_loss_coef=0.3)
    B, T, E, k = 2, 10, 6, 2
    x = torch.randn(B, T, 16)
    moe(x)
    with torch.no_grad():
        probs = torch.softmax(x.reshape(-1, 16) @ moe.router.gate.weight.T, -1).view(B, T, E)
        chosen = moe.last_routing["topk_idx"].view(B, T, k)
        per_sequence = []
        for b in range(B):
            f = torch.stack([(chosen[b] == e).sum() for e in range(E)]).float() * E / (k * T)
            per_sequence.append((f * probs[b].mean(0)).sum())
        expected = 0.3 * torch.stack(per_sequence).mean()
    assert moe.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    moe.aux_loss.backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0                    # it trains the router


def test_gpt_module_does_not_import_the_moe_module():
    import ast
    import inspect

    import utils.gpt
    tree = ast.parse(inspect.getsource(utils.gpt))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and not any("moe" in name for name in imported), imported


def test_moe_every_n_layers_beyond_n_layers_raises():
    cfg = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 3, **MOE}
    assert len(moe_layers(MoEGPTModel({**cfg, "moe_every_n_layers": 3}))) == 1
    with pytest.raises(ValueError, match="moe_every_n_layers.*between 1 and n_layers \\(3\\)"):
        MoEGPTModel({**cfg, "moe_every_n_layers": 4})


def test_gpt_module_reads_no_moe_or_modern_key():
    """utils/gpt.py knows only the dense GPT: no MoE or modern-decoder config key appears in its
    code (the MoE model validates its keys, layers answer generate's questions themselves)."""
    import inspect

    import utils.gpt
    from utils.config import GPT_OPTIONAL_KEYS, GPT_REQUIRED_KEYS, MOE_OPTIONAL_KEYS
    from utils.modern import MODERN_OPTIONAL_KEYS

    source = inspect.getsource(utils.gpt)
    foreign = (set(MOE_OPTIONAL_KEYS) | set(MODERN_OPTIONAL_KEYS)) - set(GPT_OPTIONAL_KEYS) - set(GPT_REQUIRED_KEYS)
    assert foreign and not [key for key in foreign if f'"{key}"' in source or f"'{key}'" in source]
    assert "capacity_factor" not in source


def test_gpt_model_leaves_moe_to_the_moe_module():
    # GPTModel builds dense blocks, or the blocks it is given (the import rule: the test above).
    gpt = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2}
    cfg = {**gpt, **MOE}
    with pytest.raises(ValueError, match="unknown config key.*num_experts"):
        GPTModel(cfg)                                   # MoE keys are for MoEGPTModel
    torch.manual_seed(0)
    a = MoEGPTModel(cfg)
    torch.manual_seed(0)
    b = GPTModel(gpt, feedforward=lambda layer: make_moe(a.cfg))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_unknown_key_in_gpt_config_raises():
    cfg = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2, **MOE}
    MoEGPTModel(cfg)
    with pytest.raises(ValueError, match="unknown config key"):
        MoEGPTModel({**cfg, "num_expert": 4})


def test_renormalised_softmax_equals_softmax_over_topk_logits():
    torch.manual_seed(0)
    router = TopKRouter(16, 8, 3, norm_topk_prob=True)
    x = torch.randn(20, 16)
    logits, scores, probs, idx, weight = router(x)
    assert torch.allclose(weight, torch.softmax(logits.gather(1, idx), dim=-1), atol=1e-6)
    assert torch.allclose(weight.sum(-1), torch.ones(20))


def test_router_runs_in_float32():
    router = TopKRouter(16, 4, 2).to(torch.bfloat16)
    logits, scores, probs, _, weight = router(torch.randn(5, 16, dtype=torch.bfloat16))
    assert logits.dtype == scores.dtype == probs.dtype == weight.dtype == torch.float32


def test_unnormalised_gates_are_the_top_k_probabilities():
    torch.manual_seed(0)
    router = TopKRouter(16, 8, 2, norm_topk_prob=False)
    _, _, probs, idx, weight = router(torch.randn(10, 16))
    assert torch.equal(weight, probs.gather(1, idx))
    assert torch.all(weight.sum(-1) < 1)


@pytest.mark.parametrize("expert_type", ["gelu", "swiglu", "relu2"])
def test_loop_sorted_and_grouped_dispatch_agree_in_outputs_and_gradients(expert_type):
    x = torch.randn(4, 7, 16).abs()
    outs, grads = [], []
    for dispatch in ("loop", "sorted", *GROUPED):
        moe = make(expert_type=expert_type, moe_dispatch=dispatch)
        # Make expert 5 unreachable: with positive inputs, experts 0-4 get positive logits and
        # expert 5 gets 0, so it never makes the top 2.
        with torch.no_grad():
            moe.router.gate.weight.abs_()
            moe.router.gate.weight[5] = 0.0
        xi = x.clone().requires_grad_(True)
        y = moe(xi)
        (y.pow(2).sum() + moe.aux_loss).backward()
        assert moe.last_routing["tokens_per_expert"][5] == 0
        outs.append(y)
        grads.append([xi.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in moe.parameters()])
    for out, grad in zip(outs[1:], grads[1:]):
        assert torch.allclose(outs[0], out, atol=1e-6)
        for g_loop, g_other in zip(grads[0], grad):
            assert torch.allclose(g_loop, g_other, atol=1e-5)


def test_dispatch_functions_handle_no_assignments():
    experts = Experts(3, 8, 12)
    x = torch.randn(4, 8)
    empty = torch.zeros(0, dtype=torch.long)
    for dispatch in (dispatch_loop, dispatch_sorted, *(dispatch_grouped for _ in GROUPED)):
        assert torch.equal(dispatch(x, empty, empty, torch.zeros(0), experts), torch.zeros(4, 8))


def test_moe_with_one_expert_is_a_dense_mlp():
    moe = make(num_experts=1, num_experts_per_tok=1)
    x = torch.randn(2, 3, 16)
    e = moe.experts
    dense = torch.nn.functional.gelu(x @ e.w_in[0].T + e.b_in[0], approximate="tanh") @ e.w_out[0].T + e.b_out[0]
    assert torch.allclose(moe(x), dense, atol=1e-5)


def test_matches_transformers_mixtral_sparse_moe_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    D, H, E, k = 32, 48, 8, 2
    ours = make(seed=1, emb_dim=D, moe_hidden_dim=H, num_experts=E, num_experts_per_tok=k,
                expert_type="swiglu", norm_topk_prob=True).eval()
    theirs = MixtralSparseMoeBlock(MixtralConfig(hidden_size=D, intermediate_size=H, num_local_experts=E,
                                                 num_experts_per_tok=k, router_jitter_noise=0.0)).eval()
    # Experts 6 and 7 receive no tokens: with positive inputs and router weights, experts 0-5 get
    # positive logits, expert 6 gets 0 and expert 7 a negative one, so they never make the top 2.
    with torch.no_grad():
        ours.router.gate.weight.abs_()
        ours.router.gate.weight[6] = 0.0
        ours.router.gate.weight[7] = -ours.router.gate.weight[7]
        theirs.gate.weight.copy_(ours.router.gate.weight)
        # transformers fuses gate and up projections: the first half of gate_up_proj is the gate.
        theirs.experts.gate_up_proj.copy_(torch.cat([ours.experts.w_gate, ours.experts.w_in], dim=1))
        theirs.experts.down_proj.copy_(ours.experts.w_out)
    x = torch.randn(3, 10, D).abs()
    with torch.no_grad():
        expected = theirs(x)
        expected = expected[0] if isinstance(expected, tuple) else expected
        for dispatch in ("sorted", "loop"):
            ours.dispatch = {"sorted": dispatch_sorted, "loop": dispatch_loop}[dispatch]
            assert torch.allclose(ours(x), expected, atol=1e-5), dispatch
            load = ours.last_routing["tokens_per_expert"]
            assert load[6:].tolist() == [0, 0] and load.sum() == 3 * 10 * k, dispatch


def test_load_balancing_loss_values_and_transformers_convention():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    E, k = 4, 2
    uniform = torch.full((8, E), 1 / E)
    idx = torch.tensor([[0, 1], [2, 3]] * 4)
    assert load_balancing_loss(uniform, idx) == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0, 0, 0]]).repeat(8, 1)
    assert load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)) == pytest.approx(E)
    # transformers normalises the counts by tokens, not by assignments: its value is k times ours.
    logits = torch.randn(50, E)
    probs = torch.softmax(logits, -1)
    ours = load_balancing_loss(probs, torch.topk(probs, k, -1).indices)
    assert load_balancing_loss_func((logits,), E, k) == pytest.approx(k * ours.item(), rel=1e-5)


@pytest.mark.parametrize("E, k", [(8, 1), (8, 2), (6, 3)])
def test_load_balancing_loss_maximum_is_E_over_k(E, k):
    N = 10
    collapsed_idx = torch.arange(k).repeat(N, 1)                        # every token -> experts 0..k-1
    collapsed_probs = torch.zeros(N, E)
    collapsed_probs[:, :k] = 1 / k
    assert load_balancing_loss(collapsed_probs, collapsed_idx).item() == pytest.approx(E / k)
    torch.manual_seed(0)
    for _ in range(20):                                                  # nothing exceeds it
        probs = torch.softmax(3 * torch.randn(N, E), -1)
        assert load_balancing_loss(probs, torch.topk(probs, k, -1).indices) <= E / k + 1e-6


def test_z_loss():
    logits = torch.zeros(3, 4)
    assert router_z_loss(logits) == pytest.approx(math.log(4) ** 2)


def test_capacity_priority_orders():
    # 4 tokens of one sequence, k=2, 2 experts, capacity 3.
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    # GShard: all first choices (0, 0, 0, 1) fit, then second choices in token order.
    keep = capacity_keep_mask(idx, num_experts=2, capacity=3, priority="gshard")
    assert keep.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    # Position: token by token, both choices of a token before the next token.
    keep = capacity_keep_mask(idx, num_experts=2, capacity=3, priority="position")
    assert keep.tolist() == [[True, True], [True, True], [True, True], [False, False]]
    # Position counts per sequence: two copies of the sequence each get the full capacity.
    batch = torch.stack([idx, idx])                                       # (B=2, T=4, k=2)
    assert torch.equal(capacity_keep_mask(batch, 2, 3, "position"), torch.stack([keep, keep]))
    # GShard counts over the whole batch: expert 0 is full after the first sequence's first choices,
    # and the second sequence's first choice of expert 1 comes before the first sequence's second
    # choices, of which only one still fits.
    assert capacity_keep_mask(batch, 2, 3, "gshard").tolist() == [
        [[True, True], [True, False], [True, False], [True, False]],
        [[False, False], [False, False], [False, False], [True, False]]]
    with pytest.raises(ValueError, match="priority"):
        capacity_keep_mask(idx, 2, 3, "random")


@pytest.mark.parametrize("priority", ["position", "gshard"])
def test_capacity_factor_drops_and_dropped_tokens_get_zero_output(priority):
    B, T = 2, 16
    x = torch.randn(B, T, 16)
    dropless = make()(x)
    roomy = make(capacity_factor=100.0, capacity_priority=priority)
    assert torch.allclose(roomy(x), dropless, atol=1e-6) and roomy.last_routing["dropped_fraction"] == 0
    tight = make(num_experts_per_tok=1, capacity_factor=0.5, capacity_priority=priority)
    y = tight(x)
    stats = tight.last_routing
    idx = stats["topk_idx"].view(B, T)
    if priority == "position":                                            # per sequence
        cap = tight.capacity(T)
        assert cap == math.ceil(0.5 * 16 * 1 / 6) == 2
        # Counted by hand: in each sequence, an expert keeps the first `cap` tokens that chose it.
        dropped = []
        for seq in idx.tolist():
            seen = [0] * 6
            for e in seq:
                dropped.append(seen[e] >= cap)
                seen[e] += 1
        zero = y.reshape(B * T, 16).abs().sum(-1) == 0
        assert zero.tolist() == dropped and any(dropped)
    else:                                                                  # per batch
        cap = tight.capacity(B * T)
        assert cap == math.ceil(0.5 * 32 * 1 / 6) == 3
        assert stats["tokens_per_expert"].max() <= cap
    assert stats["dropped_fraction"] > 0
    assert stats["dropped_fraction"] == pytest.approx(1 - stats["tokens_per_expert"].sum().item() / 32)
    zero_rows = (y.reshape(32, 16).abs().sum(-1) == 0).float().mean().item()
    assert zero_rows == pytest.approx(stats["dropped_fraction"])  # k=1: a dropped token outputs 0


def test_gshard_capacity_lets_a_later_token_change_an_earlier_one():
    # 4 experts, top-2, capacity factor 1.0 on 2 tokens: each expert takes ceil(2 * 2 / 4) = 1.
    # The router's logits are the input itself. Token 0 picks experts 0 then 1. If the last token
    # picks expert 1 first, GShard serves that first choice before token 0's second choice and
    # token 0 loses expert 1; if it picks experts 2 and 3, token 0 keeps both.
    outputs = {}
    for priority in ("gshard", "position"):
        moe = make(emb_dim=4, num_experts=4, num_experts_per_tok=2, capacity_factor=1.0, capacity_priority=priority)
        with torch.no_grad():
            moe.router.gate.weight.copy_(torch.eye(4))
        first = torch.tensor([3.0, 2.0, 0.0, 0.0])
        a = moe(torch.stack([first, torch.tensor([0.0, 3.0, 2.0, 0.0])])[None])
        assert moe.last_routing["topk_idx"].tolist() == [[0, 1], [1, 2]]
        b = moe(torch.stack([first, torch.tensor([0.0, 0.0, 3.0, 2.0])])[None])
        assert moe.last_routing["topk_idx"].tolist() == [[0, 1], [2, 3]]
        outputs[priority] = a[0, 0], b[0, 0]
    assert not torch.allclose(*outputs["gshard"])                          # token 0 changed
    assert torch.equal(*outputs["position"])                               # token 0 did not


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("k, capacity_factor", [(2, 1.0), (1, 0.5), (3, 1.25)])
def test_position_capacity_is_causal(seed, k, capacity_factor):
    B, T = 3, 12
    moe = make(seed=seed, num_experts_per_tok=k, capacity_factor=capacity_factor)
    assert moe.capacity_priority == "position"                           # the default
    torch.manual_seed(100 + seed)
    x = torch.randn(B, T, 16)
    y = moe(x)
    assert moe.last_routing["dropped_fraction"] > 0                       # the capacity binds
    for b in range(B):
        changed = x.clone()
        changed[b, -1] = torch.randn(16)
        z = moe(changed)
        # Unchanged up to float rounding: an expert's batch has one row more or less, and fused
        # kernels (GELU) may round a tensor's last elements differently. A dropped assignment
        # would move an output by ~0.1, not 1e-6.
        assert torch.allclose(z[:, :-1], y[:, :-1], rtol=0, atol=1e-6)   # earlier positions: unchanged
        others = [i for i in range(B) if i != b]
        assert torch.allclose(z[others], y[others], rtol=0, atol=1e-6)   # other sequences: unchanged


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("every", [1, 2])
def test_gpt_with_moe_layers(every):
    cfg = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 4,
           **MOE, "moe_every_n_layers": every}
    torch.manual_seed(0)
    model = MoEGPTModel(cfg)
    dense = MoEGPTModel({k: v for k, v in cfg.items() if k in
                      ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")})
    layers = moe_layers(model)
    assert len(layers) == 4 // every
    D, H, E = 16, 24, 6
    per_moe = E * (D * H + H + H * D + D) + D * E
    per_ffn = count(dense.trf_blocks[0].ff)
    assert count(model) == count(dense) + len(layers) * (per_moe - per_ffn)
    logits = model(torch.randint(0, 50, (2, 8)))
    assert logits.shape == (2, 8, 50)
    assert total_aux_loss(model) > 0


def test_load_recorder():
    from utils.data import create_dataloader
    from utils.moe_gpt import LoadRecorder
    from utils.train import train

    cfg = {"vocab_size": 30, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2, **MOE}
    torch.manual_seed(0)
    model = MoEGPTModel(cfg)
    ids = torch.arange(300) % 30
    recorder = LoadRecorder()
    loader = create_dataloader(ids, 4, 8, seed=0)
    train(model, loader, loader, max_steps=3, eval_every=3, device="cpu", verbose=False, after_step=recorder)
    assert recorder.loads().shape == (3, 2, 6) and torch.all(recorder.loads().sum(-1) == 4 * 8 * 2)


def test_gelu_expert_biases_start_like_the_dense_feedforwards():
    from utils.gpt import FeedForward

    D, H = 64, 256
    torch.manual_seed(0)
    dense = FeedForward({"emb_dim": D, "ffn_hidden_dim": H}).layers
    expert = Experts(1, D, H, "gelu")
    # nn.Linear draws its bias from uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)); so must the experts.
    for ours, theirs, fan_in in ((expert.b_in[0], dense[0].bias, D), (expert.b_out[0], dense[2].bias, H)):
        bound = 1 / math.sqrt(fan_in)
        for b in (ours.detach(), theirs.detach()):
            assert b.abs().max() <= bound and b.abs().max() > 0.9 * bound
            assert b.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)   # uniform's std
            assert b.mean().abs() < 0.2 * bound


def test_router_parameters_stay_float32_when_the_model_is_cast():
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("meta", torch.bfloat16)):
        moe = cast(make())
        assert moe.router.gate.weight.dtype == moe.router.expert_bias.dtype == torch.float32
        assert moe.experts.w_in.dtype == moe.experts.b_out.dtype != torch.float32
        assert moe.router.gate.weight.device == moe.experts.w_in.device        # .to(device) still moves them
    moe = make()
    weight = moe.router.gate.weight.detach().clone()
    moe.to(torch.bfloat16)
    assert torch.equal(moe.router.gate.weight, weight)                           # not even rounded on the way
    assert isinstance(moe.router.gate.weight, torch.nn.Parameter)
    assert moe.float().experts.w_in.dtype == torch.float32


def test_bfloat16_layer_is_close_to_the_float32_layer_and_trains():
    torch.manual_seed(0)
    moe32 = make(num_experts=8, num_experts_per_tok=2, expert_type="swiglu")
    moe16 = make(num_experts=8, num_experts_per_tok=2, expert_type="swiglu").to(torch.bfloat16)
    x = torch.randn(16, 128, 16).to(torch.bfloat16)
    y16 = moe16(x)
    y32 = moe32(x.float())                           # the same (rounded) input in float32
    assert y16.dtype == torch.bfloat16
    assert torch.equal(moe16.last_routing["topk_idx"], moe32.last_routing["topk_idx"])   # same choices
    err = (y16.float() - y32).norm(dim=-1) / y32.norm(dim=-1)
    assert err.max() < 0.03                                            # bfloat16 rounding only, every token
    for dispatch in (dispatch_loop, dispatch_sorted):                  # the combine sums in float32
        moe16.dispatch = dispatch
        assert torch.equal(moe16(x), y16)
    # One optimizer step: the float32 router and the bfloat16 experts both get gradients and move.
    optimizer = torch.optim.AdamW(moe16.parameters(), lr=1e-2)
    before = moe16.router.gate.weight.detach().clone()
    (moe16(x).float().pow(2).mean() + moe16.aux_loss).backward()
    assert moe16.router.gate.weight.grad.dtype == torch.float32 and moe16.experts.w_in.grad.dtype == torch.bfloat16
    optimizer.step()
    assert not torch.equal(moe16.router.gate.weight, before) and moe16.router.gate.weight.dtype == torch.float32


def test_aux_loss_free_bias_update_survives_bfloat16():
    from utils.moe_gpt import update_expert_biases

    moe = make(router_type="sigmoid", bias_update_rate=0.001, aux_loss_coef=0.0)
    with torch.no_grad():
        moe.router.expert_bias.fill_(0.6)
    model = torch.nn.Sequential(moe).to(torch.bfloat16)
    moe(torch.randn(2, 12, 16, dtype=torch.bfloat16))
    load = moe.last_routing["tokens_per_expert"].float()
    assert not torch.all(load == load.mean())
    update_expert_biases(model)
    expected = torch.tensor(0.6) + 0.001 * torch.sign(load.mean() - load)
    assert torch.equal(moe.router.expert_bias, expected)             # bfloat16 would round 0.601 back to 0.6


@pytest.mark.parametrize("dispatch", [dispatch_loop, dispatch_sorted])   # dispatch_grouped: the same combine
def test_bfloat16_combine_is_summed_in_float32(dispatch):
    torch.manual_seed(0)
    E = k = 8
    experts = Experts(E, 16, 32, "gelu").to(torch.bfloat16)
    x = torch.randn(64, 16).to(torch.bfloat16)
    token_idx = torch.arange(64).repeat_interleave(k)
    expert_idx = torch.arange(E).repeat(64)
    weight = torch.rand(64 * k)
    out = dispatch(x, token_idx, expert_idx, weight, experts)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        y = torch.stack(experts([x] * E), dim=1).double()                  # (N, E, D) bfloat16 outputs
        exact = (y * weight.view(64, k, 1).double()).sum(1)
    # Summed in float32 and rounded once, every entry is within half a bfloat16 step of the exact
    # sum; rounding every product and partial sum to bfloat16 misses that by several steps.
    half_step = 0.5 * torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(exact.abs()))
    assert torch.all((out.double() - exact).abs() <= half_step * 1.001)


UPCYCLE_DENSE = {"vocab_size": 50, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
                 "ffn_hidden_dim": 48}
UPCYCLE_MOE = {**UPCYCLE_DENSE, "num_experts": 4, "num_experts_per_tok": 2, "moe_hidden_dim": 48}


def trained_a_little(model, steps=3):
    """Move the weights off their initialisation, so that copies are told apart from fresh ones."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        ids = torch.randint(0, 50, (2, 16))
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("every", [1, 2])
def test_upcycled_model_computes_the_dense_function(every):
    torch.manual_seed(0)
    dense = trained_a_little(GPTModel(UPCYCLE_DENSE)).eval()
    torch.manual_seed(1)
    moe = upcycle(dense, {**UPCYCLE_MOE, "moe_every_n_layers": every}).eval()
    assert len(moe_layers(moe)) == 2 // every
    ids = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        assert torch.allclose(moe(ids), dense(ids), atol=1e-5)
    for block, dense_block in zip(moe.trf_blocks, dense.trf_blocks):
        if isinstance(block.ff, MoEFeedForward):
            w = dense_block.ff.layers[0].weight
            assert all(torch.equal(block.ff.experts.w_in[e], w) for e in range(4))
            assert block.ff.router.gate.weight.abs().sum() > 0           # a new router, not zeros
    # the copies are independent parameters: training the MoE leaves the dense model alone
    before = dense.trf_blocks[0].ff.layers[0].weight.clone()
    trained_a_little(moe.train())
    assert torch.equal(dense.trf_blocks[0].ff.layers[0].weight, before)


def test_upcycled_router_gets_no_language_model_gradient_until_experts_differ():
    torch.manual_seed(0)
    dense = trained_a_little(GPTModel(UPCYCLE_DENSE))
    torch.manual_seed(1)
    moe = upcycle(dense, {**UPCYCLE_MOE, "aux_loss_coef": 0.0})
    ids = torch.randint(0, 50, (4, 16))
    loss = torch.nn.functional.cross_entropy(moe(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    layer = moe_layers(moe)[0]
    assert layer.router.gate.weight.grad.abs().max() < 1e-6                # identical experts: gates do not matter
    grads = layer.experts.w_in.grad
    assert grads.abs().amax((1, 2)).min() > 0 and not torch.allclose(grads[0], grads[1])   # ... but tokens do
    with torch.no_grad():
        layer.experts.w_in[0].mul_(1.5)                                    # experts differ: the router learns
    moe.zero_grad()
    torch.nn.functional.cross_entropy(moe(ids).flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    assert layer.router.gate.weight.grad.abs().max() > 1e-4


@pytest.mark.parametrize("change, message", [
    ({"expert_type": "swiglu"}, "expert_type"),
    ({"moe_hidden_dim": 64}, "moe_hidden_dim"),
    ({"num_shared_experts": 1}, "num_shared_experts"),
    ({"latent_dim": 16}, "latent_dim"),
    ({"num_experts": 0}, "num_experts"),
    ({"n_heads": 4, "emb_dim": 64}, "emb_dim"),
    ({"vocab_size": 51}, "vocab_size"),
    ({"n_layers": 1}, "n_layers"),
    ({"qkv_bias": True}, "qkv_bias"),
    ({"norm_topk_prob": False}, "norm_topk_prob"),
    ({"routed_scaling_factor": 2.0}, "routed_scaling_factor"),
    ({"capacity_factor": 1.0}, "capacity_factor"),
])
def test_upcycle_rejects_configs_that_do_not_fit_the_dense_model(change, message):
    dense = GPTModel(UPCYCLE_DENSE)
    with pytest.raises(ValueError, match=message):
        upcycle(dense, {**UPCYCLE_MOE, **change})


def test_upcycle_needs_a_dense_model():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="dense GPTModel"):
        upcycle(MoEGPTModel(UPCYCLE_MOE), UPCYCLE_MOE)


def test_upcycle_keeps_the_dense_models_dtype():
    cfg = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1}
    torch.manual_seed(0)
    dense = GPTModel(cfg).to(torch.bfloat16)
    moe = upcycle(dense, {**cfg, "num_experts": 4, "num_experts_per_tok": 2, "moe_hidden_dim": 64})
    assert moe.tok_emb.weight.dtype == torch.bfloat16 and moe_layers(moe)[0].experts.w_in.dtype == torch.bfloat16
    assert moe_layers(moe)[0].router.gate.weight.dtype == torch.float32      # the router stays float32
    idx = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert torch.allclose(moe(idx).float(), dense(idx).float(), atol=0.1)


def test_grouped_matmuls_are_chosen_only_for_bfloat16_on_recent_gpus(monkeypatch):
    import utils.moe
    experts = Experts(2, 16, 24)
    assert not prefers_grouped_mm(torch.zeros(2, 16), experts)             # a CPU keeps the sorted dispatch
    assert not prefers_grouped_mm(torch.zeros(2, 16, dtype=torch.bfloat16), experts)
    if torch.cuda.is_available():
        from utils.experts import GROUPED_MM_CAPABILITIES
        recent = torch.cuda.get_device_capability() in GROUPED_MM_CAPABILITIES and torch.version.hip is None
        assert prefers_grouped_mm(torch.zeros(2, 16, dtype=torch.bfloat16, device="cuda"), experts) == recent
        assert not prefers_grouped_mm(torch.zeros(2, 16, dtype=torch.bfloat16, device="cuda"), Experts(2, 16, 20))
        assert not prefers_grouped_mm(torch.zeros(2, 16, device="cuda"), experts)
    if not GROUPED:
        return
    # Where the rule says yes, the default dispatch hands over to the grouped one (same result).
    calls = []
    monkeypatch.setattr(utils.moe, "prefers_grouped_mm", lambda x, experts: True)
    monkeypatch.setattr(utils.moe, "dispatch_grouped", lambda *args: calls.append(1) or dispatch_grouped(*args))
    moe = make()
    x = torch.randn(2, 5, 16)
    y = moe(x)
    moe.dispatch = dispatch_loop
    assert calls == [1] and torch.allclose(y, moe(x), atol=1e-6)


def test_the_grouped_dispatch_is_refused_clearly_where_torch_lacks_grouped_mm(monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "grouped_mm", raising=False)
    with pytest.raises(ValueError, match="moe_dispatch'\\] 'grouped' needs torch.nn.functional.grouped_mm"):
        make(moe_dispatch="grouped")
    with pytest.raises(ValueError, match="needs torch.nn.functional.grouped_mm"):
        dispatch_grouped(torch.zeros(2, 16), *(torch.zeros(0, dtype=torch.long),) * 2, torch.zeros(0), Experts(2, 16, 8))
