import math

import pytest
import torch

from utils.generation import KVCache, generate
from utils.gpt import GELU, GPT_CONFIG_124M, GPTModel, LayerNorm, MultiHeadAttention, validate_gpt_config
from utils.moe_gpt import MoEGPTModel

TINY = {"vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def gpt_param_formula(cfg):
    """Untied GPT-2 parameter count, written out from the architecture."""
    V, C, D, L = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"], cfg["n_layers"]
    F = cfg.get("ffn_hidden_dim") or 4 * D
    attention = 3 * D * D + (3 * D if cfg["qkv_bias"] else 0) + D * D + D
    ffn = D * F + F + F * D + D
    norms = 2 * 2 * D
    return V * D + C * D + L * (attention + ffn + norms) + 2 * D + D * V


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):  # shapes only, no memory
        model = GPTModel(GPT_CONFIG_124M)
    assert n_params(model) == gpt_param_formula(GPT_CONFIG_124M) == 163_009_536


@pytest.mark.parametrize("changes", [{}, {"qkv_bias": False}, {"ffn_hidden_dim": 48}, {"n_layers": 3}])
def test_parameter_count_matches_formula(changes):
    cfg = {**TINY, **changes}
    assert n_params(GPTModel(cfg)) == gpt_param_formula(cfg)


def test_output_shape():
    torch.manual_seed(0)
    model = GPTModel(TINY)
    idx = torch.randint(0, TINY["vocab_size"], (3, 10))
    assert model(idx).shape == (3, 10, TINY["vocab_size"])
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, TINY["context_length"] + 1, dtype=torch.long))


def test_model_is_causal():
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % TINY["vocab_size"]
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_model_with_capacity_limited_moe_is_causal():
    torch.manual_seed(0)
    cfg = {**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_hidden_dim": 16, "capacity_factor": 1.0}
    model = MoEGPTModel(cfg).eval()                           # capacity_priority "position", the default
    idx = torch.randint(0, TINY["vocab_size"], (4, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % TINY["vocab_size"]
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_attention_weights_are_causal_and_normalised():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 32, context_length=16, num_heads=4)
    out, w = mha(torch.randn(2, 9, 32), return_weights=True)
    assert out.shape == (2, 9, 32) and w.shape == (2, 4, 9, 9)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 9))
    assert torch.all(w.triu(diagonal=1) == 0)


def test_layernorm_and_gelu_equal_their_formulas():
    torch.manual_seed(0)
    x = 3.0 * torch.randn(4, 7, 32) + 1.0
    ln = LayerNorm(32)
    with torch.no_grad():
        ln.scale.copy_(torch.rand(32) + 0.5)
        ln.shift.copy_(torch.randn(32))
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    assert torch.allclose(ln(x), ln.scale * (x - mean) / torch.sqrt(var + ln.eps) + ln.shift, atol=1e-5)
    formula = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    assert torch.allclose(GELU()(x), formula, atol=1e-5)


def test_fused_attention_equals_the_explicit_weights_path():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 32, context_length=16, num_heads=4, dropout=0.3)
    x = torch.randn(2, 11, 32)
    mha.eval()                                   # no dropout: both branches compute the same thing
    explicit, _ = mha(x, return_weights=True)
    assert torch.allclose(mha(x), explicit, atol=1e-6)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 5, 32)
    assert torch.equal(mha(changed)[:, :6], mha(x)[:, :6])   # the fused kernel is exactly causal
    mha.train()                                  # dropout on: outputs differ from eval mode ...
    assert not torch.allclose(mha(x), explicit)
    # ... but dropout on the weights, rescaled by 1 / (1 - p), leaves the expected output unchanged:
    with torch.no_grad():                        # 4,000 copies of the batch, each with its own masks
        mean = mha(x.repeat(4000, 1, 1)).view(4000, *x.shape).mean(0)
    assert (mean - explicit).abs().max() < 0.05 * explicit.abs().max()


def test_attention_rejects_sequences_longer_than_its_context():
    mha = MultiHeadAttention(32, 32, context_length=8, num_heads=4)
    for return_weights in (False, True):
        with pytest.raises(ValueError, match="context_length"):
            mha(torch.randn(1, 9, 32), return_weights=return_weights)


@pytest.mark.parametrize("bad, message", [
    ({"emb_dim": 30}, "divisible"),
    ({"n_layers": 0}, "n_layers"),
    ({"vocab_size": -5}, "vocab_size"),
    ({"emb_dim": 32.0}, "emb_dim"),
    ({"drop_rate": 1.0}, "drop_rate"),
    ({"emb_dims": 32}, "unknown config key.*did you mean 'emb_dim'"),
    ({"ffn_hidden_dim": 0}, "ffn_hidden_dim"),
])
def test_bad_configs_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTModel({**TINY, **bad})


def test_missing_key_raises():
    cfg = dict(TINY)
    del cfg["n_heads"]
    with pytest.raises(ValueError, match="n_heads"):
        validate_gpt_config(cfg)


def test_same_seed_same_model():
    torch.manual_seed(123)
    a = GPTModel(TINY)
    torch.manual_seed(123)
    b = GPTModel(TINY)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_generate_greedy_and_sampling():
    torch.manual_seed(0)
    model = GPTModel(TINY)
    idx = torch.tensor([[1, 2, 3]])
    greedy = generate(model, idx, max_new_tokens=20)
    assert greedy.shape == (1, 23) and torch.equal(greedy[:, :3], idx)  # also runs past context_length
    assert torch.equal(greedy, generate(model, idx, max_new_tokens=20))
    s1 = generate(model, idx, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    s2 = generate(model, idx, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2)
    # top_k=1 sampling is greedy decoding
    assert torch.equal(generate(model, idx, 10, temperature=1.0, top_k=1), greedy[:, :13])
    with pytest.raises(ValueError, match="top_k"):
        generate(model, idx, 1, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, idx, 1, temperature=-1.0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_suppressed_ids_are_never_produced(use_cache):
    torch.manual_seed(0)
    model = GPTModel(TINY)
    idx = torch.tensor([[1, 2, 3]])
    greedy = generate(model, idx, 8, use_cache=use_cache)
    banned = sorted(set(greedy[0, 3:].tolist()))                    # every token greedy decoding chose
    out = generate(model, idx, 8, use_cache=use_cache, suppress_ids=banned)
    assert not set(out[0, 3:].tolist()) & set(banned)
    with torch.no_grad():                                            # the first step takes the best allowed token
        logits = model(idx)[0, -1]
    logits[banned] = float("-inf")
    assert out[0, 3].item() == logits.argmax().item()
    sampled = generate(model, idx, 30, temperature=2.0, generator=torch.Generator().manual_seed(0),
                       use_cache=use_cache, suppress_ids=banned)
    assert not set(sampled[0, 3:].tolist()) & set(banned)
    for bad in ([TINY["vocab_size"]], [-1], [1.5]):
        with pytest.raises(ValueError, match="suppress_ids"):
            generate(model, idx, 1, suppress_ids=bad)
    with pytest.raises(ValueError, match="suppress_ids"):
        generate(model, idx, 1, suppress_ids=list(range(TINY["vocab_size"])))


def test_generate_stops_at_eos():
    torch.manual_seed(0)
    model = GPTModel(TINY)
    idx = torch.tensor([[1, 2, 3]])
    first = generate(model, idx, 1)[0, -1].item()
    assert generate(model, idx, 10, eos_id=first).shape == (1, 4)


def test_rows_that_finished_hold_eos_and_the_others_go_on():
    torch.manual_seed(0)
    model = GPTModel(TINY)
    prompts = torch.randint(0, 97, (4, 3))
    free = generate(model, prompts, 12)                                    # no eos: 12 new tokens each
    eos = free[0, 3 + 2].item()                                            # row 0's third new token
    out = generate(model, prompts, 12, eos_id=eos)
    for row, free_row in zip(out, free):
        new, free_new = row[3:].tolist(), free_row[3:].tolist()
        stop = free_new.index(eos) + 1 if eos in free_new else len(free_new)
        assert new[:stop] == free_new[:stop]                               # identical up to its eos
        assert all(t == eos for t in new[stop:])                           # then only eos
    assert out.shape[1] == 3 + 12 or all(eos in r[3:].tolist() for r in out)
    # A stop rule of one's own: stop when any row has finished.
    first_stop = generate(model, prompts, 12, eos_id=eos, stop=lambda finished: bool(finished.any()))
    assert first_stop.shape[1] == 3 + 3 and first_stop[0, -1].item() == eos


def test_generate_refuses_an_empty_prompt_and_restores_train_mode_on_errors():
    torch.manual_seed(0)
    model = GPTModel(TINY).train()
    with pytest.raises(ValueError, match="at least one prompt token"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(2, 0, dtype=torch.long))
    # No sequences at all (an expert-parallel rank with nothing to decode) is fine: nothing comes back.
    assert generate(model, torch.zeros(0, 3, dtype=torch.long), 4).shape == (0, 7)
    bad = torch.tensor([[1, 2, 500]])                                      # 500 >= vocab_size: the model raises
    with pytest.raises(IndexError):
        generate(model, bad, 3)
    assert model.training                                                  # left as it was


def test_both_attentions_hand_contiguous_inputs_to_sdpa_where_the_device_needs_them(monkeypatch):
    # pytorch#181133: on MPS, SDPA gave wrong values for transposed inputs. The rule is tested on
    # the CPU by declaring the CPU such a device and recording what reaches SDPA.
    import utils.gpt
    from utils.modern import GroupedQueryAttention, rope_cos_sin, rope_inverse_frequencies
    from utils.modern import validate_modern_config

    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append(all(t.is_contiguous() for t in (q, k, v)))
        return real(q, k, v, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    cfg = validate_modern_config({"vocab_size": 50, "context_length": 16, "emb_dim": 32, "n_heads": 4,
                                  "n_kv_heads": 2, "n_layers": 1, "ffn_hidden_dim": 64})
    gqa = GroupedQueryAttention(cfg)
    mha = MultiHeadAttention(32, 32, 16, 4)
    x = torch.randn(2, 6, 32)
    cos, sin = rope_cos_sin(torch.arange(6), rope_inverse_frequencies(8, 10000.0))
    mha(x), gqa(x, cos, sin)
    assert seen == [False, False]                    # the CPU needs no copies: the views go as they are
    monkeypatch.setattr(utils.gpt, "CONTIGUOUS_SDPA_DEVICES", ("cpu",))
    seen.clear()
    mha(x), gqa(x, cos, sin)
    assert seen == [True, True]


CACHE_BASE = {**TINY, "context_length": 32}
CACHE_MOE = {**CACHE_BASE, "num_experts": 4, "num_experts_per_tok": 2, "moe_hidden_dim": 32}
CACHE_MODELS = {
    "dense": CACHE_BASE,
    "moe": CACHE_MOE,
    "shared + sigmoid, every 2nd layer": {**CACHE_MOE, "router_type": "sigmoid", "num_shared_experts": 1,
                                          "moe_every_n_layers": 2, "expert_type": "swiglu"},
    "latent": {**CACHE_MOE, "latent_dim": 16, "num_experts": 8, "num_experts_per_tok": 4, "expert_type": "relu2"},
}


@pytest.mark.parametrize("name", CACHE_MODELS)
def test_cached_generation_equals_uncached(name):
    torch.manual_seed(0)
    model = MoEGPTModel(CACHE_MODELS[name]).eval()
    idx = torch.randint(0, 97, (3, 5))
    cached = generate(model, idx, 20, use_cache=True)
    assert torch.equal(cached, generate(model, idx, 20, use_cache=False))
    # prefill, then one token at a time, gives the logits of the full forward pass at every position
    cache = KVCache(model.kv_cache_shape, batch_size=3)
    with torch.no_grad():
        steps = [model(cached[:, :5], cache=cache)] + [model(cached[:, t:t + 1], cache=cache) for t in range(5, 25)]
        full = model(cached)
    assert cache.length == 25
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    # ... and so do chunks of several tokens after a prefix (each chunk causal within itself)
    cache = KVCache(model.kv_cache_shape, batch_size=3)
    with torch.no_grad():
        chunks = [model(cached[:, a:b], cache=cache) for a, b in ((0, 7), (7, 8), (8, 19), (19, 25))]
    assert torch.allclose(torch.cat(chunks, 1), full, atol=1e-5)


def test_cached_generation_beyond_the_context_slides_like_uncached():
    torch.manual_seed(0)
    model = GPTModel(CACHE_BASE).eval()
    for prompt_length in (5, 32, 40):                  # shorter than, equal to, longer than the context
        idx = torch.randint(0, 97, (2, prompt_length))
        cached = generate(model, idx, 40, use_cache=True)
        assert cached.shape == (2, prompt_length + 40)
        assert torch.equal(cached, generate(model, idx, 40, use_cache=False))
    sampled = [generate(model, idx[:, :5], 30, temperature=1.0, top_k=10, use_cache=use,
                        generator=torch.Generator().manual_seed(3)) for use in (True, False)]
    assert torch.equal(*sampled)


def test_kv_cache_size_and_errors():
    torch.manual_seed(0)
    model = GPTModel(CACHE_BASE).eval()
    cache = KVCache(model.kv_cache_shape, batch_size=2)
    D, L, C = CACHE_BASE["emb_dim"], CACHE_BASE["n_layers"], CACHE_BASE["context_length"]
    assert cache.nbytes() == 2 * L * 2 * C * D * 4             # keys and values, every layer, float32
    with torch.no_grad():
        model(torch.zeros(2, 30, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="30 cached"):
            model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="return_weights"):
        model.trf_blocks[0].att(torch.zeros(2, 1, D), return_weights=True, cache=cache)
    with pytest.raises(ValueError, match="dtype"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=KVCache(model.kv_cache_shape, batch_size=2, dtype=torch.bfloat16))
    limited = MoEGPTModel({**CACHE_MOE, "capacity_factor": 1.0})
    with pytest.raises(ValueError, match="capacity_factor"):
        generate(limited, torch.zeros(1, 3, dtype=torch.long), 2)
    assert generate(limited, torch.zeros(1, 3, dtype=torch.long), 2, use_cache=False).shape == (1, 5)


def load_into_hf_gpt2(model):
    """Copy our GPTModel's weights into transformers' GPT2LMHeadModel (a reference we did not write)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
        n_layer=cfg["n_layers"], n_head=cfg["n_heads"], n_inner=cfg["ffn_hidden_dim"],
        activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )).eval()
    sd = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight,
          "transformer.ln_f.weight": model.final_norm.scale, "transformer.ln_f.bias": model.final_norm.shift,
          "lm_head.weight": model.out_head.weight}
    for i, blk in enumerate(model.trf_blocks):
        p = f"transformer.h.{i}."
        att = blk.att
        qkv_bias = [torch.zeros(cfg["emb_dim"]) if l.bias is None else l.bias
                    for l in (att.W_query, att.W_key, att.W_value)]
        sd.update({
            p + "ln_1.weight": blk.norm1.scale, p + "ln_1.bias": blk.norm1.shift,
            # transformers' Conv1D stores weights as (in, out): the transpose of nn.Linear.
            p + "attn.c_attn.weight": torch.cat([att.W_query.weight.T, att.W_key.weight.T, att.W_value.weight.T], 1),
            p + "attn.c_attn.bias": torch.cat(qkv_bias),
            p + "attn.c_proj.weight": att.out_proj.weight.T, p + "attn.c_proj.bias": att.out_proj.bias,
            p + "ln_2.weight": blk.norm2.scale, p + "ln_2.bias": blk.norm2.shift,
            p + "mlp.c_fc.weight": blk.ff.layers[0].weight.T, p + "mlp.c_fc.bias": blk.ff.layers[0].bias,
            p + "mlp.c_proj.weight": blk.ff.layers[2].weight.T, p + "mlp.c_proj.bias": blk.ff.layers[2].bias,
        })
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k for k in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_logits_match_transformers_gpt2(qkv_bias):
    torch.manual_seed(0)
    cfg = {**TINY, "qkv_bias": qkv_bias, "ffn_hidden_dim": 80}
    model = GPTModel(cfg).eval()
    for p in model.parameters():  # non-trivial norms too, not just ones and zeros
        torch.nn.init.normal_(p, std=0.2)
    hf = load_into_hf_gpt2(model)
    idx = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
