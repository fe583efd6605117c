import pytest
import torch

from utils.gpt import GPT_CONFIG_124M
from utils.moe import MoEFeedForward, fine_grained
from utils.moe_gpt import MoEGPTModel
from utils.params import count_parameters, parameter_breakdown

BASE = {"vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 4}
MOE = {**BASE, "num_experts": 6, "num_experts_per_tok": 2, "moe_hidden_dim": 24}
COURSE_CONFIGS = {
    "dense": BASE,
    "dense, qkv bias, wide ffn": {**BASE, "qkv_bias": True, "ffn_hidden_dim": 80},
    "moe gelu": MOE,
    "moe swiglu every 2nd layer": {**MOE, "expert_type": "swiglu", "moe_every_n_layers": 2},
    "fine-grained + shared": {**fine_grained(MOE, 2), "num_shared_experts": 2},
    "gated shared expert": {**MOE, "expert_type": "swiglu", "num_shared_experts": 1, "shared_expert_hidden_dim": 40,
                            "shared_expert_gate": True},
    "deepseek-style routing": {**MOE, "router_type": "sigmoid", "n_group": 3, "topk_group": 2, "num_shared_experts": 1},
    "latent relu2": {**MOE, "expert_type": "relu2", "latent_dim": 8, "num_shared_experts": 1,
                     "shared_expert_hidden_dim": 48},
}


@pytest.mark.parametrize("name", COURSE_CONFIGS)
def test_course_counts_match_the_modules(name):
    cfg = COURSE_CONFIGS[name]
    analytic = count_parameters(cfg)
    torch.manual_seed(0)
    model = MoEGPTModel(cfg)
    assert analytic["total"] == sum(p.numel() for p in model.parameters())
    assert analytic == parameter_breakdown(model)


def traced_active(model, token=5):
    """Parameters one token touches, traced through autograd: a parameter counts when the token's
    output depends on it (it is in the autograd graph); for stacked experts, only the experts whose
    slice receives a gradient count. Embedding tables are counted in full, the convention of
    "active parameters". (Graph membership, not gradient values, decides for the other weights: with
    a single token, attention's softmax is constant, so query and key weights get a zero gradient
    although the token uses them.)"""
    model.eval()
    params = list(model.parameters())
    embeddings = {id(p) for table in (model.tok_emb, model.pos_emb) for p in table.parameters()}
    routed = {id(p) for m in model.modules() if isinstance(m, MoEFeedForward) for p in m.experts.parameters()}
    grads = torch.autograd.grad(model(torch.tensor([[token]])).sum(), params, allow_unused=True)
    touched = 0
    for p, g in zip(params, grads):
        if id(p) in embeddings:
            touched += p.numel()
        elif id(p) in routed:
            used = g.reshape(p.shape[0], -1).abs().sum(-1) > 0
            touched += int(used.sum()) * p[0].numel()
        elif g is not None:
            touched += p.numel()
    return touched


@pytest.mark.parametrize("name", [n for n in COURSE_CONFIGS if "relu2" not in n])
def test_active_count_equals_traced_parameters(name):
    # (relu2 experts are left out: an inactive ReLU unit gets an exactly-zero gradient, so tracing
    # by gradients would undercount what the token actually multiplied.)
    torch.manual_seed(0)
    model = MoEGPTModel(COURSE_CONFIGS[name])
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)  # no exactly-zero weights or biases
    assert traced_active(model) == count_parameters(COURSE_CONFIGS[name])["active"]


def test_gpt2_124m_and_dense_active_equals_total():
    c = count_parameters(GPT_CONFIG_124M)
    assert c["total"] == c["active"] == 163_009_536
    assert c["components"]["embedding"] == 50257 * 768 + 1024 * 768


def test_moe_active_counts_k_of_e_experts():
    c = count_parameters(MOE)
    per_expert = 2 * 32 * 24 + 24 + 32
    assert c["components"]["routed_experts"] == 4 * 6 * per_expert
    assert c["active_components"]["routed_experts"] == 4 * 2 * per_expert
    assert c["total"] - c["active"] == 4 * 4 * per_expert


@pytest.mark.parametrize("kind", ["gelu", "swiglu", "relu2"])
def test_the_mlp_formula_counts_the_experts_module(kind):
    from utils.counting import mlp_parameters
    from utils.experts import Experts

    experts = Experts(3, 32, 24, kind)                       # the course's GELU experts have biases
    assert 3 * mlp_parameters(kind, 32, 24, biases=kind == "gelu") == sum(p.numel() for p in experts.parameters())
    with pytest.raises(ValueError, match="expert_type must be one of"):
        mlp_parameters("tanh", 32, 24)


def test_bad_course_config():
    with pytest.raises(ValueError, match="unknown config key"):
        count_parameters({**MOE, "n_experts": 4})


from utils.memory import kv_cache_bytes, weight_bytes  # noqa: E402
from utils.params import moe_layer_costs  # noqa: E402


@pytest.mark.parametrize("cfg", [
    {"emb_dim": 32, "num_experts": 6, "num_experts_per_tok": 2, "moe_hidden_dim": 24},
    {"emb_dim": 32, "num_experts": 6, "num_experts_per_tok": 2, "moe_hidden_dim": 24, "expert_type": "swiglu",
     "num_shared_experts": 1, "shared_expert_gate": True},
    {"emb_dim": 32, "num_experts": 8, "num_experts_per_tok": 3, "moe_hidden_dim": 24, "expert_type": "relu2",
     "latent_dim": 8, "num_shared_experts": 1, "shared_expert_hidden_dim": 40},
])
def test_moe_layer_costs_match_the_module(cfg):
    from torch.utils.flop_counter import FlopCounterMode

    from utils.moe import make_moe

    costs = moe_layer_costs(cfg)
    layer = make_moe(cfg)
    assert costs["params"] == sum(p.numel() for p in layer.parameters())
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(1, 10, 32))
    assert counter.get_total_flops() == 10 * costs["flops_per_token"]
    dim = cfg.get("latent_dim") or 32
    assert costs["bytes_per_token"] == 2 * cfg["num_experts_per_tok"] * dim * 2


# (The Hugging Face families' KV caches are compared with transformers' own caches in test_params_hf.py.)
def test_kv_cache_of_a_course_model_equals_the_keys_and_values_it_computes():
    cfg = {**BASE, "n_layers": 3}
    model = MoEGPTModel(cfg)
    x = torch.randn(2, 7, 32)
    kv_values = sum(blk.att.W_key(x).numel() + blk.att.W_value(x).numel() for blk in model.trf_blocks)
    assert kv_cache_bytes(cfg, context_length=7, batch_size=2, dtype="float32") == 4 * kv_values


def test_weight_bytes():
    assert weight_bytes(10, "float32") == 40 and weight_bytes(10) == 20 and weight_bytes(10, "float8") == 10
    with pytest.raises(ValueError, match="dtype"):
        weight_bytes(10, "int3")
