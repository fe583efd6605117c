"""utils/modern.py on its own: config checks, the grouped-query KV cache, cached generation.
(tests/test_checkpoints.py checks every piece against transformers.)"""
import pytest
import torch

from utils.generation import KVCache, generate
from utils.modern import ModernMoEModel

SMALL = dict(vocab_size=50, context_length=32, emb_dim=32, n_heads=4, n_layers=2, n_kv_heads=2,
             num_experts=4, num_experts_per_tok=2, moe_hidden_dim=16)


def test_grouped_query_cache_is_smaller_by_the_group_size():
    model = ModernMoEModel(SMALL)
    gqa = KVCache(model.kv_cache_shape, batch_size=3)
    mha = KVCache(ModernMoEModel({**SMALL, "n_kv_heads": 4}).kv_cache_shape, batch_size=3)
    assert gqa.keys[0].shape == (3, 2, 32, 8)
    assert mha.nbytes() == 2 * gqa.nbytes()


@pytest.mark.parametrize("extra", [{}, {"qk_norm": "head", "head_dim": 12, "rotary_dim": 6},
                                   {"qk_norm": "full", "clip_qkv": 0.5, "moe_every_n_layers": 2, "ffn_hidden_dim": 24},
                                   {"num_shared_experts": 1, "shared_expert_gate": True, "dense_layers": [0],
                                    "ffn_hidden_dim": 24, "tie_embeddings": True}])
def test_cached_generation_equals_uncached_and_prefix_logits_agree(extra):
    torch.manual_seed(0)
    model = ModernMoEModel({**SMALL, **extra}).eval()
    idx = torch.randint(0, 50, (2, 7))
    assert torch.equal(generate(model, idx, 30), generate(model, idx, 30, use_cache=False))  # slides past 32
    full = model(torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(1)))
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.kv_cache_shape, 2)
    pieces = [model(chunk, cache=cache) for chunk in ids.split([7, 1, 12], dim=1)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad,message", [
    ({"n_kv_heads": 3}, r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
    ({"rotary_dim": 7}, "rotary_dim'] must be even and at most head_dim"),
    ({"qk_norm": "layer"}, r"qk_norm'] must be one of \(None, 'head', 'full'\)"),
    ({"dense_layers": [2]}, r"dense_layers'] must list block indices in 0 .. 1"),
    ({"moe_every_n_layers": 2}, "ffn_hidden_dim'] is needed"),
    ({"n_kv_head": 2}, "did you mean 'n_kv_heads'"),
    ({"tie_embeddings": 1}, "tie_embeddings'] must be True or False"),
    ({"emb_dim": 30}, r"emb_dim \(30\) must be divisible by n_heads \(4\), or set head_dim"),
])
def test_bad_configs_name_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        ModernMoEModel({**SMALL, **bad})
