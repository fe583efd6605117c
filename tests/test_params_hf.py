"""count_parameters on Hugging Face configs: exact against transformers' own models (built on the
meta device, no memory), and against the publishers' numbers under each publisher's convention."""
import json
import pathlib
import warnings

import pytest
import torch

from utils.params import (DEEPSEEK_V3_WEIGHTS_QUOTE, HF_FAMILIES, MLA_FAMILIES, PUBLISHED_ACTIVE_EXCLUDES,
                          attention_layer_types, cached_tokens_per_layer, count_parameters, kv_cache_bytes,
                          load_model_config, published_comparison)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
transformers.logging.set_verbosity_error()

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "utils" / "assets" / "model_configs"
SHARED_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "model_configs"
MODELS = sorted(p.stem for p in CONFIG_DIR.glob("*.json") if p.stem != "published")
load = load_model_config


def meta_count(config_dict):
    cfg = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def test_repo_copies_match_the_shared_configs():
    if not SHARED_DIR.is_dir():
        pytest.skip("../shared/ is not next to this clone (only the team's checkouts and CI have it)")
    # The repo copies only the models the course uses; ../shared/ may hold more (and more entries
    # in published.json).
    for name in MODELS:
        shared = json.loads((SHARED_DIR / f"{name}.json").read_text())
        assert load(name) == shared, name
    shared_published = json.loads((SHARED_DIR / "published.json").read_text())
    for name, entry in load("published").items():
        assert entry == shared_published[name], name


@pytest.mark.parametrize("name", MODELS)
def test_total_equals_transformers_meta_count(name):
    assert count_parameters(load(name))["total"] == meta_count(load(name))


def within_published_precision(ours, published, rel=0.01):
    """Within 1%, or, when the publisher rounds more coarsely than 1% (e.g. "3.3B" or "37B"),
    within one unit of the last digit it publishes."""
    digits = len(f"{published / 1e9:g}".replace(".", "").lstrip("0"))
    unit = 10 ** (len(str(int(published))) - digits)
    return abs(ours - published) <= max(rel * published, unit)


@pytest.mark.parametrize("name", MODELS)
def test_matches_published_numbers(name):
    total, published_total, active, published_active = published_comparison(name)
    assert abs(total - published_total) <= 0.01 * published_total
    assert within_published_precision(active, published_active), (active, published_active)


def test_deepseek_v3_readme_weights_figure_is_one_matrix_short_of_its_own_convention():
    # README_WEIGHTS.md: 36.7B active "including 0.9B for Embedding and 0.9B for the output Head".
    # Counting both, the model has one such matrix more; without the input embedding it is within
    # 0.1B (the convention PUBLISHED_ACTIVE_EXCLUDES uses for it).
    assert "36.7B" in DEEPSEEK_V3_WEIGHTS_QUOTE
    ds = count_parameters(load("deepseek-v3"))
    embedding, head = ds["active_components"]["embedding"], ds["active_components"]["lm_head"]
    assert round(embedding / 1e9, 1) == round(head / 1e9, 1) == 0.9
    assert ds["active"] - 36.7e9 > 0.8e9
    assert abs(ds["active"] - embedding - 36.7e9) < 0.1e9
    assert PUBLISHED_ACTIVE_EXCLUDES["deepseek-v3"] == ("embedding",)


def test_qwen3_non_embedding_figure():
    # Qwen3-30B-A3B model card: 29.9B non-embedding parameters.
    qw = count_parameters(load("qwen3-30b-a3b"))
    non_embedding = qw["total"] - qw["components"]["embedding"] - qw["components"]["lm_head"]
    assert abs(non_embedding - 29.9e9) < 0.01 * 29.9e9


SMALL = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 5, "num_attention_heads": 4,
         "num_key_value_heads": 2, "tie_word_embeddings": False}
FAMILY_CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96),
    "qwen2_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128,
                      shared_expert_intermediate_size=48, decoder_sparse_step=2, mlp_only_layers=[3]),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128,
                      head_dim=24, attention_bias=True, mlp_only_layers=[0]),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, moe_intermediate_size=16,
                        intermediate_size=128, first_k_dense_replace=2, q_lora_rank=None, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
                        intermediate_size=128, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_group=2, topk_group=1,
                        attention_bias=True),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
                     intermediate_size=128, first_k_dense_replace=1, head_dim=32, use_qk_norm=True,
                     attention_bias=True),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, head_dim=16,
                    attention_bias=True, layer_types=["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=96,
                        interleave_moe_layer_step=2, head_dim=16),
}


@pytest.mark.parametrize("family", HF_FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_every_family_matches_transformers(family, tied):
    # A small config built by transformers' own config class (all its fields and defaults filled in).
    cfg = AutoConfig.for_model(model_type=family, **{**SMALL, "tie_word_embeddings": tied}, **FAMILY_CONFIGS[family])
    as_dict = cfg.to_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert count_parameters(as_dict)["total"] == sum(p.numel() for p in model.parameters())


def test_qwen2_moe_with_no_shared_expert_width_still_counts_its_gate():
    # shared_expert_intermediate_size=0 gives empty shared-expert matrices, but transformers still
    # builds each MoE layer's shared_expert_gate, Linear(hidden_size, 1).
    kwargs = {**FAMILY_CONFIGS["qwen2_moe"], "shared_expert_intermediate_size": 0}
    cfg = AutoConfig.for_model(model_type="qwen2_moe", **SMALL, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    ours = count_parameters(cfg.to_dict())
    assert ours["total"] == sum(p.numel() for p in model.parameters())
    shared = sum(p.numel() for name, p in model.named_parameters() if ".shared_expert" in name)
    assert ours["components"]["shared_experts"] == shared > 0


def test_active_counts_top_k_of_routed_experts():
    c = count_parameters(load("mixtral-8x7b"))
    routed = c["components"]["routed_experts"]
    assert c["active_components"]["routed_experts"] * 4 == routed   # top-2 of 8
    assert c["total"] - c["active"] == routed * 3 // 4


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        count_parameters({"model_type": "bert"})
    cfg = load("mixtral-8x7b")
    del cfg["num_local_experts"]
    with pytest.raises(ValueError, match="num_local_experts"):
        count_parameters(cfg)
    with pytest.raises(ValueError, match="available"):
        load_model_config("gpt-5")


# ----------------------------------------------------------------------------------------------
# KV cache: kv_cache_bytes against the cache transformers itself fills during a prefill.

# Settings that make some layers keep fewer tokens than a prompt of LONG tokens; no layer_types
# given, so each family's own default (what a config.json without the field gets) is exercised.
WINDOWED = {
    "mixtral": dict(sliding_window=4),                                      # every layer slides
    "qwen2_moe": dict(use_sliding_window=True, sliding_window=4, max_window_layers=3),  # layers 0, 2
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=4),           # every layer slides
    "gpt_oss": dict(sliding_window=4),                                      # layers 0, 2, 4
    "llama4_text": dict(attention_chunk_size=4),                            # all but layer 3 (NoPE)
}
LONG, BATCH = 11, 2


def prefill_cache(cfg, length, batch=BATCH):
    """(bytes of every key/value tensor in the cache after one forward pass over a random prompt
    of shape (batch, length), the cache's first layer keys)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        cache = model(torch.randint(0, cfg.vocab_size, (batch, length)), use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return held, cache.layers[0].keys


def raw_config(family, **extra):
    """A config.json-like dict: only the fields we set, no layer_types."""
    kwargs = {k: v for k, v in FAMILY_CONFIGS[family].items() if k != "layer_types"}
    return {"model_type": family, **SMALL, **kwargs, **extra}


@pytest.mark.parametrize("family", [f for f in HF_FAMILIES if f not in MLA_FAMILIES])
@pytest.mark.parametrize("length", [3, LONG])
def test_kv_cache_equals_transformers_cache_after_prefill(family, length):
    raw = raw_config(family, **WINDOWED.get(family, {}))
    cfg = AutoConfig.for_model(**raw)
    held, _ = prefill_cache(cfg, length)
    assert kv_cache_bytes(raw, length, BATCH, "float32") == held
    assert kv_cache_bytes(cfg.to_dict(), length, BATCH, "float32") == held
    if family in WINDOWED and length == LONG:                  # the windows really cut the cache
        all_full = {**raw, "layer_types": ["full_attention"] * raw["num_hidden_layers"]}
        assert held < kv_cache_bytes(all_full, length, BATCH, "float32")


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_mla_cache_is_the_latent_and_rope_key(family):
    # Serving engines (vLLM, SGLang) cache MLA's compressed latent and the shared rotary key; that
    # is what kv_cache_bytes counts. Recent transformers caches the same two tensors; transformers
    # 5.0 cached keys and values expanded per head. Whichever this transformers does, its cache must
    # have exactly that size.
    raw = raw_config(family, num_key_value_heads=SMALL["num_attention_heads"])   # as in DeepSeek's configs
    cfg = AutoConfig.for_model(**raw)
    L, nh = raw["num_hidden_layers"], raw["num_attention_heads"]
    latent, rope = raw["kv_lora_rank"], raw["qk_rope_head_dim"]
    ours = kv_cache_bytes(raw, LONG, BATCH, "float32")
    assert ours == BATCH * LONG * L * (latent + rope) * 4
    held, keys = prefill_cache(cfg, LONG)
    if keys.shape[1] == 1 and keys.shape[-1] == latent:       # one "head" holding the latent
        assert held == ours
    else:                                                     # per head: key (nope + rope) and value
        per_head = raw["qk_nope_head_dim"] + rope + raw["v_head_dim"]
        assert held == BATCH * LONG * L * nh * per_head * 4


@pytest.mark.parametrize("name", MODELS)
def test_shipped_configs_cache_what_transformers_caches(name):
    # transformers' cache, built from the shipped config, fed 8192 tokens in every layer: each layer
    # keeps what cached_tokens_per_layer says (gpt-oss-20b's config.json has no layer_types).
    raw, length = load(name), 8192
    cache = DynamicCache(config=AutoConfig.for_model(**raw))
    kept = []
    for layer in cache.layers:
        x = torch.zeros(1, 1, length, 1)
        layer.update(x, x)
        kept.append(layer.keys.shape[-2])
    assert cached_tokens_per_layer(raw, length) == kept
    assert len(kept) == raw["num_hidden_layers"]


def test_gpt_oss_alternates_sliding_and_full_layers_without_layer_types():
    raw = load("gpt-oss-20b")
    assert "layer_types" not in raw
    assert attention_layer_types(raw) == AutoConfig.for_model(**raw).layer_types
    assert attention_layer_types(raw)[:2] == ["sliding_attention", "full_attention"]


def test_kv_cache_errors_name_the_field():
    gpt_oss = raw_config("gpt_oss", sliding_window=None)
    with pytest.raises(ValueError, match="sliding_window"):
        kv_cache_bytes(gpt_oss, 100)
    with pytest.raises(ValueError, match="layer_types"):
        kv_cache_bytes(raw_config("mixtral", layer_types=["full_attention"]), 100)
    with pytest.raises(ValueError, match="layer_types"):
        kv_cache_bytes(raw_config("olmoe", layer_types=["linear_attention"] * SMALL["num_hidden_layers"]), 100)
    with pytest.raises(ValueError, match="attention_chunk_size"):
        kv_cache_bytes(raw_config("llama4_text", attention_chunk_size=1), 100)
