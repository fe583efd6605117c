"""Decoding: the MoE layer's decode path for few tokens, and batches of prompts of different
lengths (left padding with an attention_mask), for the GPT, the MoE GPT and the modern model."""
import pytest
import torch

from utils.experts import Experts, dispatch_few, dispatch_loop, dispatch_sorted
from utils.generation import KVCache, generate
from utils.gpt import GPTModel, padded_attention_mask
from utils.modern import ModernMoEModel
from utils.moe import MoEFeedForward, moe_layers
from utils.moe_gpt import MoEGPTModel

MOE = {"emb_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_hidden_dim": 24}
GPT = {"vocab_size": 50, "context_length": 24, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0}
MODERN = dict(vocab_size=50, context_length=24, emb_dim=32, n_heads=4, n_layers=2, n_kv_heads=2,
              num_experts=4, num_experts_per_tok=2, moe_hidden_dim=16)


def _assignments(topk_idx, topk_weight):
    N, k = topk_idx.shape
    return torch.arange(N * k) // k, topk_idx.reshape(-1), topk_weight.reshape(-1)


@pytest.mark.parametrize("expert_type", ["gelu", "swiglu", "relu2"])
@pytest.mark.parametrize("tokens", [1, 2, 3])
def test_decode_dispatch_equals_the_reference_dispatch(expert_type, tokens):
    torch.manual_seed(0)
    experts = Experts(8, 16, 24, expert_type)
    x = torch.randn(tokens, 16)
    topk_idx = torch.stack([torch.randperm(8)[:3] for _ in range(tokens)])
    if tokens == 3:
        topk_idx[1] = topk_idx[0]                         # two tokens share all their experts
    topk_weight = torch.rand(tokens, 3)
    with torch.no_grad():
        expected = dispatch_loop(x, *_assignments(topk_idx, topk_weight), experts)
        torch.testing.assert_close(dispatch_few(x, topk_idx, topk_weight, experts), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(dispatch_sorted(x, *_assignments(topk_idx, topk_weight), experts), expected,
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("tokens", [1, 2])
def test_decode_dispatch_sums_bfloat16_outputs_in_float32(tokens):
    torch.manual_seed(0)
    experts = Experts(8, 16, 24).to(torch.bfloat16)
    x = torch.randn(tokens, 16, dtype=torch.bfloat16)
    topk_idx, topk_weight = torch.tensor([[5, 2, 7], [2, 0, 5]])[:tokens], torch.rand(tokens, 3)
    with torch.no_grad():
        ours = dispatch_few(x, topk_idx, topk_weight, experts)
        reference = dispatch_loop(x, *_assignments(topk_idx, topk_weight), experts)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, reference, atol=1e-2, rtol=0)


def test_the_layer_takes_the_decode_path_only_for_few_tokens_without_autograd(monkeypatch):
    import utils.moe
    calls = []
    monkeypatch.setattr(utils.moe, "dispatch_few", lambda *args: calls.append(1) or dispatch_few(*args))
    torch.manual_seed(0)
    moe = MoEFeedForward(MOE).eval()
    for shape, path in (((1, 1, 16), "few"), ((4, 1, 16), "few"), ((5, 1, 16), "sorted"), ((1, 12, 16), "sorted")):
        x = torch.randn(shape)
        assert moe.serves_few(torch.zeros(shape[0] * shape[1], 2, dtype=torch.long), grad_enabled=False) == (path == "few")
        calls.clear()
        with torch.no_grad():
            moe(x)
        assert len(calls) == (path == "few"), shape                  # the forward pass takes the decode path
        with torch.no_grad():
            moe.dispatch = dispatch_sorted
            fast = moe(x)
            moe.dispatch = dispatch_loop                      # not the default: never replaced by the decode path
            reference = moe(x)
            moe.dispatch = dispatch_sorted
        torch.testing.assert_close(fast, reference, atol=1e-6, rtol=0)
    x = torch.randn(1, 1, 16, requires_grad=True)
    assert not moe.serves_few(torch.zeros(1, 2, dtype=torch.long), grad_enabled=True)
    calls.clear()
    moe(x).sum().backward()                                   # with autograd: the general path, gradients flow
    assert x.grad is not None and moe.aux_loss is not None and not calls
    capped = MoEFeedForward({**MOE, "capacity_factor": 1.0}).eval()
    assert not capped.serves_few(torch.zeros(1, 2, dtype=torch.long), grad_enabled=False)


def test_without_autograd_the_balancing_losses_are_skipped():
    moe = MoEFeedForward(MOE)
    x = torch.randn(2, 3, 16)
    moe(x)
    assert moe.aux_loss is not None and moe.aux_loss.requires_grad
    with torch.no_grad():
        moe(x)
    assert moe.aux_loss is None and moe.last_routing["topk_idx"].shape == (6, 2)


def test_padded_attention_mask_is_causal_over_real_tokens_and_never_empty():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    visible = padded_attention_mask(mask, start=1, T=3)               # 1 cached position, 3 new ones
    assert visible.shape == (2, 1, 3, 4)
    assert visible[0, 0].tolist() == [[False, True, False, False],    # a padding token sees itself only
                                      [False, False, True, False],
                                      [False, False, True, True]]
    assert torch.equal(visible[1, 0], torch.ones(3, 4, dtype=torch.bool).tril(diagonal=1))
    assert visible.any(-1).all()


def _left_padded(prompts, pad_id=0):
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return idx, mask


@pytest.mark.parametrize("build", [lambda: GPTModel(GPT), lambda: MoEGPTModel({**GPT, **{k: v for k, v in MOE.items()
                                                                                          if k != "emb_dim"}}),
                                   lambda: ModernMoEModel(MODERN)], ids=["gpt", "moe-gpt", "modern"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_left_padded_batch_decodes_each_prompt_as_it_decodes_alone(build, use_cache):
    torch.manual_seed(0)
    model = build().eval()
    prompts = [[3, 14, 15, 9, 2, 6, 5], [35], [8, 9, 7, 9]]
    idx, mask = _left_padded(prompts, pad_id=49)
    new = 22                                                          # 7 + 22 > 24: the window slides too
    batch = generate(model, idx, new, attention_mask=mask, use_cache=use_cache)
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), new, use_cache=use_cache)
        assert batch[row, idx.shape[1]:].tolist() == alone[0, len(prompt):].tolist(), row
    # Without the mask the padding would be read as text: at least one row changes.
    unmasked = generate(model, idx, new, use_cache=use_cache)
    assert not torch.equal(unmasked, batch)


def test_padded_logits_equal_each_prompts_own_logits_with_and_without_a_cache():
    torch.manual_seed(0)
    model = ModernMoEModel(MODERN).eval()
    prompts = [[3, 14, 15, 9, 2], [35, 11]]
    idx, mask = _left_padded(prompts)
    with torch.no_grad():
        full = model(idx, attention_mask=mask)
        cache = KVCache(model.kv_cache_shape, 2)
        prefill = model(idx[:, :3], cache=cache, attention_mask=mask[:, :3])
        rest = model(idx[:, 3:], cache=cache, attention_mask=mask)
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt]))
            torch.testing.assert_close(full[row, -len(prompt):], alone[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.cat([prefill, rest], 1)[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mask,message", [
    (torch.tensor([[1, 0, 1]]), "pad on the left"),
    (torch.tensor([[1, 1, 0]]), "pad on the left"),
    (torch.tensor([[0, 2, 1]]), "0 \\(padding\\) or 1"),
    (torch.tensor([[1, 1]]), "must have idx's shape"),
])
def test_bad_attention_masks_are_refused(mask, message):
    model = GPTModel(GPT)
    with pytest.raises(ValueError, match=message):
        generate(model, torch.tensor([[1, 2, 3]]), 2, attention_mask=mask)


def test_padding_needs_dropless_moe_layers_and_wrong_mask_shapes_are_refused():
    model = MoEGPTModel({**GPT, "num_experts": 4, "num_experts_per_tok": 2, "moe_hidden_dim": 8,
                         "capacity_factor": 1.0})
    with pytest.raises(ValueError, match="needs dropless MoE layers"):
        generate(model, torch.tensor([[1, 2, 3]]), 2, attention_mask=torch.tensor([[0, 1, 1]]), use_cache=False)
    assert generate(model, torch.tensor([[1, 2, 3]]), 2, attention_mask=torch.ones(1, 3), use_cache=False).shape == (1, 5)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        GPTModel(GPT)(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2))
    assert len(moe_layers(model)) == 2


@pytest.mark.parametrize("extra", [{"latent_dim": 8}, {"num_shared_experts": 1, "shared_expert_gate": True},
                                   {"router_type": "sigmoid", "routed_scaling_factor": 2.5, "n_group": 2,
                                    "topk_group": 1, "expert_type": "swiglu"}])
def test_the_decode_path_equals_the_reference_in_every_layer_variant(extra):
    from utils.moe import make_moe
    torch.manual_seed(0)
    layer = make_moe({**MOE, **extra}).eval()
    for tokens in (1, 3):                                      # 3 tokens x top-2 = 6 choices <= 8 experts
        x = torch.randn(tokens, 1, 16)
        layer.dispatch = dispatch_sorted
        assert layer.serves_few(torch.zeros(tokens, 2, dtype=torch.long), grad_enabled=False)
        with torch.no_grad():
            fast = layer(x)
            layer.dispatch = dispatch_loop
            reference = layer(x)
        torch.testing.assert_close(fast, reference, atol=1e-6, rtol=0)
