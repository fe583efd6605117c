"""count_parameters on Hugging Face configs: exact against transformers' own models (built on the
meta device, no memory), and against the publishers' numbers under each publisher's convention."""
import json
import math
import pathlib
import warnings

import pytest
import torch

from utils.hf_config import HF_FAMILIES, MLA_FAMILIES, attention_layer_types, text_config
from utils.hf_moe import moe_layer_shape
from utils.memory import (cached_tokens_per_layer, kv_cache_bytes, recurrent_state_bytes, recurrent_state_values,
                          serving_cache_bytes)
from utils.params import count_parameters
from utils.published import (DEEPSEEK_V3_WEIGHTS_QUOTE, PUBLISHED_ACTIVE_EXCLUDES, as_published, load_model_config,
                             published_unit)

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
    """Parameters of transformers' model for a config.json dict, built on the meta device. Kimi K2
    ("kimi_k2") is built as the DeepSeek-V3 it is, Llama 4 from its text_config; the quantization
    settings are dropped (they change how weights are stored, not how many there are)."""
    config_dict = {k: v for k, v in text_config(config_dict).items() if k != "quantization_config"}
    cfg = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def test_repo_copies_match_the_shared_configs():
    if not SHARED_DIR.is_dir():
        pytest.skip("../shared/ is not next to this clone (only the team's checkouts and CI have it)")
    # Every config the team provides in ../shared/ is shipped with the course, unchanged (a learner's
    # clone has no ../shared/), with its published.json entry. The repo has more (MODEL_SOURCES).
    shared_names = sorted(p.stem for p in SHARED_DIR.glob("*.json") if p.stem != "published")
    assert set(shared_names) <= set(MODELS), sorted(set(shared_names) - set(MODELS))
    for name in shared_names:
        assert load(name) == json.loads((SHARED_DIR / f"{name}.json").read_text()), name
    repo_published = load("published")
    for name, entry in json.loads((SHARED_DIR / "published.json").read_text()).items():
        assert repo_published[name] == entry, name


@pytest.mark.parametrize("name", MODELS)
def test_total_equals_transformers_meta_count(name):
    assert count_parameters(load(name))["total"] == meta_count(load(name))


def active_without(counts, parts):
    """Active parameters with the given components (e.g. ("embedding", "lm_head")) left out."""
    return counts["active"] - sum(counts["active_components"].get(part, 0) for part in parts)


@pytest.mark.parametrize("name", MODELS)
def test_matches_published_numbers(name):
    # Each published figure is our count rounded or cut off at the figure's last written digit
    # (as_published): the total as it is, the active count under the publisher's convention.
    counts, pub = count_parameters(load(name)), load("published")[name]
    assert as_published(counts["total"], pub["published_total"]) is not None, (counts["total"], pub)
    active = active_without(counts, PUBLISHED_ACTIVE_EXCLUDES.get(name, ()))
    assert as_published(active, pub["published_active"]) is not None, (active, pub)


def test_qwen3_next_active_figure_leaves_out_both_matrices():
    # The card rounds its total (79.7B -> "80B"; cut off at 1B it would be 79B). Rounded, "3B" is
    # only the count without the input embedding and the output head (3.25B); with one or both
    # of them (3.56B, 3.87B) it would be 4B, and only cutting off would give 3B.
    name = "qwen3-next-80b-a3b"
    counts, pub = count_parameters(load(name)), load("published")[name]
    assert as_published(counts["total"], pub["published_total"]) == "rounded"
    assert round(counts["total"] / 1e9) * 1e9 == pub["published_total"] != math.floor(counts["total"] / 1e9) * 1e9
    ways = {(): "cut off", ("embedding",): "cut off", ("embedding", "lm_head"): "either"}
    assert {parts: as_published(active_without(counts, parts), pub["published_active"]) for parts in ways} == ways
    rounds_to_3b = [parts for parts in ways if round(active_without(counts, parts) / 1e9) * 1e9 == pub["published_active"]]
    assert rounds_to_3b == [("embedding", "lm_head")] == [PUBLISHED_ACTIVE_EXCLUDES[name]]


def test_hybrid_totals_and_the_multi_token_prediction_layer():
    # Nemotron 3 Super: 120.6B without its multi-token-prediction (MTP) layer, "about 123.6B" with it
    # (published.json); transformers does not build the MTP layer, count_parameters reports it apart.
    sup = count_parameters(load("nemotron-3-super-120b-a12b"))
    assert abs(sup["total"] - 120.6e9) < 0.001 * 120.6e9
    assert round((sup["total"] + sup["mtp"]) / 1e8) == 1236
    assert "123.6B" in load("published")["nemotron-3-super-120b-a12b"]["what_the_publisher_counts"]
    # Nemotron 3 Nano: 3.2B active without embeddings, 3.6B with them (both in its card).
    nano = count_parameters(load("nemotron-3-nano-30b-a3b"))
    assert round(nano["active"] / 1e8) == 36
    assert round((nano["active"] - nano["active_components"]["embedding"]) / 1e8) == 32
    assert nano["mtp"] == 0 and "recurrent" in nano["components"]
    # Super's latent MoE: experts work in moe_latent_size, a quarter of hidden_size.
    assert sup["components"]["latent_proj"] > 0 and "latent_proj" not in nano["components"]


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
    # Granite MoE's µP multipliers scale activations, not parameters.
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, attention_bias=True,
                       embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
                       attention_multiplier=0.015625),
    "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, head_dim=16),
    "ernie4_5_moe": dict(moe_num_experts=6, moe_k=2, moe_intermediate_size=16, intermediate_size=96,
                         moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=3, use_bias=True),
    "qwen3_next": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=80,
                       shared_expert_intermediate_size=32, mlp_only_layers=[1], head_dim=16, attention_bias=True,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                       linear_value_head_dim=12, linear_conv_kernel_dim=4),
    # Nemotron 3 Super's kind: Mamba-2, attention, latent MoE with relu^2 experts, a dense MLP layer.
    "nemotron_h": dict(hybrid_override_pattern="M*EM-", mamba_num_heads=8, mamba_head_dim=8, n_groups=2,
                       ssm_state_size=8, conv_kernel=4, n_routed_experts=6, num_experts_per_tok=2,
                       moe_intermediate_size=16, moe_shared_expert_intermediate_size=40, moe_latent_size=24,
                       intermediate_size=56, head_dim=16, use_bias=True, mlp_bias=True),
}
# More shapes of the same families: what the larger or other members of each family configure.
VARIANTS = {
    "nemotron_h without latent (Nano)": ("nemotron_h", dict(moe_latent_size=None, use_bias=False, mlp_bias=False,
                                                         use_conv_bias=False, hybrid_override_pattern="MEM*E")),
    "qwen3_next every 2nd layer attends": ("qwen3_next", dict(full_attention_interval=2, decoder_sparse_step=2,
                                                             mlp_only_layers=[])),
    "ernie4_5_moe every 2nd layer from 0": ("ernie4_5_moe", dict(moe_layer_start_index=0, moe_layer_end_index=-1,
                                                                moe_layer_interval=2, moe_num_shared_experts=0,
                                                                use_bias=False)),
    "granitemoe no biases": ("granitemoe", dict(attention_bias=False)),
    # Newer Nemotron config.json files list the layers with the older names "mamba" and "attention".
    "nemotron_h legacy layer names, MTP": ("nemotron_h", dict(
        layers_block_type=["mamba", "attention", "moe", "mamba", "mlp"], num_nextn_predict_layers=1,
        mtp_layers_block_type=["attention", "moe"])),
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


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tied", [False, True])
def test_family_variants_match_transformers(variant, tied):
    family, extra = VARIANTS[variant]
    kwargs = {**SMALL, **FAMILY_CONFIGS[family], **extra, "tie_word_embeddings": tied}
    cfg = AutoConfig.for_model(model_type=family, **kwargs)
    assert count_parameters(cfg.to_dict())["total"] == meta_count(cfg.to_dict())
    assert count_parameters({"model_type": family, **kwargs})["total"] == meta_count(cfg.to_dict())


@pytest.mark.parametrize("tie_top, tie_text", [(False, None), (True, None), (False, True), (True, False)])
def test_llama4_config_with_a_text_config_counts_what_transformers_builds(tie_top, tie_text):
    # Llama 4's config.json nests the language model under text_config; AutoModelForCausalLM builds
    # Llama4ForCausalLM from it alone (its own tie_word_embeddings, not the top-level one).
    text = {**SMALL, **FAMILY_CONFIGS["llama4_text"]}
    del text["tie_word_embeddings"]
    if tie_text is not None:
        text["tie_word_embeddings"] = tie_text
    raw = {"model_type": "llama4", "text_config": text, "tie_word_embeddings": tie_top}
    cfg = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert count_parameters(raw)["total"] == sum(p.numel() for p in model.parameters())


def test_legacy_layer_names_are_read_as_transformers_reads_them():
    family, extra = VARIANTS["nemotron_h legacy layer names, MTP"]
    raw = {"model_type": family, **SMALL, **FAMILY_CONFIGS[family], **extra}
    assert attention_layer_types(raw) == AutoConfig.for_model(**raw).layers_block_type
    assert count_parameters(raw)["mtp"] > 0
    with pytest.raises(ValueError, match="layers_block_type"):
        count_parameters({**raw, "layers_block_type": ["mamba", "transformer"]})


def test_published_unit_reads_the_last_digit():
    assert [published_unit(x) for x in (3.3e9, 37e9, 1e12, 120.6e9, 400e6, 20.91e9)] == [1e8, 1e9, 1e12, 1e8, 1e8, 1e7]
    for bad in (0, -3e9, 0.5, 3.25, float("nan"), float("inf"), "3B", None):
        with pytest.raises(ValueError, match="published figure"):
            published_unit(bad)


def test_as_published_tells_rounded_from_cut_off():
    # "1.3B": rounded it stands for 1.25B-1.35B, cut off for 1.3B up to (not including) 1.4B.
    assert [as_published(x, 1.3e9) for x in (1.26e9, 1.335e9, 1.36e9, 1.24e9, 1.4e9)] == [
        "rounded", "either", "cut off", None, None]
    assert as_published(79.674e9, 80e9) == "rounded"               # "80B" read to 10B
    with pytest.raises(ValueError, match="our count"):
        as_published(-1, 1.3e9)
    with pytest.raises(ValueError, match="our count"):
        as_published(float("nan"), 1.3e9)
    with pytest.raises(ValueError, match="published figure"):
        as_published(1.3e9, 0)


def test_moe_layer_shape_reads_the_experts():
    sup = moe_layer_shape(load("nemotron-3-super-120b-a12b"))
    assert sup == {"hidden_size": 4096, "num_experts": 512, "top_k": 22, "expert_hidden": 2688,
                   "dispatch_width": 1024, "moe_layers": 40}
    mix = moe_layer_shape(load("mixtral-8x7b"))
    assert (mix["num_experts"], mix["top_k"], mix["dispatch_width"], mix["moe_layers"]) == (8, 2, 4096, 32)


def test_kimi_k2_is_counted_as_the_deepseek_v3_it_is():
    kimi = load("kimi-k2")
    assert kimi["model_type"] == "kimi_k2" and kimi["architectures"] == ["DeepseekV3ForCausalLM"]
    assert count_parameters(kimi) == count_parameters({**kimi, "model_type": "deepseek_v3"})


def traced_active(model, token=3):
    """Parameters one token touches in a transformers model, traced: a parameter counts when the
    token's logits depend on it (it is in the autograd graph, or it is a frozen parameter of the
    router such as ERNIE's selection bias); in stacked experts only the experts the router chose
    for the token count (recorded from the experts module's top_k_index argument)."""
    chosen = {}

    def remember(module, args, kwargs):
        chosen[module] = args[1] if len(args) > 1 else kwargs["top_k_index"]

    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    hooks = [m.register_forward_pre_hook(remember, with_kwargs=True) for m in experts]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    logits = model(torch.tensor([[token]])).logits
    grads = dict(zip([n for n, _ in named], torch.autograd.grad(logits.sum(), [p for _, p in named],
                                                                allow_unused=True)))
    for hook in hooks:
        hook.remove()
    expert_params = {id(p): module for module in experts for p in module.parameters()}
    touched = 0
    for name, p in model.named_parameters():
        if id(p) in expert_params:
            used = chosen[expert_params[id(p)]].unique().numel()
            touched += used * p[0].numel()
        elif not p.requires_grad or grads[name] is not None:
            touched += p.numel()
    return touched


# Families whose experts module receives the chosen indices (Llama 4 runs every expert on a
# zero-weighted input instead, and gpt-oss passes them under another name; both are plain top-k).
TRACEABLE = [f for f in HF_FAMILIES if f not in ("llama4_text", "gpt_oss")]


@pytest.mark.parametrize("family", TRACEABLE)
def test_active_equals_a_trace_of_one_token(family):
    mla = {"num_key_value_heads": SMALL["num_attention_heads"]} if family in MLA_FAMILIES else {}  # as MLA runs
    cfg = AutoConfig.for_model(model_type=family, **{**SMALL, **mla}, **FAMILY_CONFIGS[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert count_parameters(cfg.to_dict())["active"] == traced_active(model)


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
    for name, field in [("nemotron-3-super-120b-a12b", "mamba_num_heads"), ("qwen3-next-80b-a3b", "linear_key_head_dim"),
                        ("granite-3.1-1b-a400m", "num_local_experts")]:
        cfg = load(name)
        del cfg[field]
        with pytest.raises(ValueError, match=field):
            count_parameters(cfg)
    with pytest.raises(ValueError, match="hybrid_override_pattern"):
        count_parameters({**load("nemotron-3-nano-30b-a3b"), "hybrid_override_pattern": "MEX"})


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
    of shape (batch, length), the first attention layer's keys, values held as recurrent state by
    the Mamba-2 / linear-attention layers)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        cache = model(torch.randint(0, cfg.vocab_size, (batch, length)), use_cache=True).past_key_values
    attention = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
    held = sum(t.numel() * t.element_size() for layer in attention for t in (layer.keys, layer.values))
    states = sum(t.numel() for layer in cache.layers for name in ("conv_states", "recurrent_states")
                 for t in getattr(layer, name, {}).values() if t is not None)   # (older transformers keeps
                                                                                 # None for MoE/MLP layers)
    return held, attention[0].keys, states


def raw_config(family, **extra):
    """A config.json-like dict: only the fields we set, no layer_types."""
    kwargs = {k: v for k, v in FAMILY_CONFIGS[family].items() if k != "layer_types"}
    return {"model_type": family, **SMALL, **kwargs, **extra}


@pytest.mark.parametrize("family", [f for f in HF_FAMILIES if f not in MLA_FAMILIES])
@pytest.mark.parametrize("length", [3, LONG])
def test_kv_cache_equals_transformers_cache_after_prefill(family, length):
    raw = raw_config(family, **WINDOWED.get(family, {}))
    cfg = AutoConfig.for_model(**raw)
    held, _, _ = prefill_cache(cfg, length)
    assert kv_cache_bytes(raw, length, BATCH, "float32") == held
    assert kv_cache_bytes(cfg.to_dict(), length, BATCH, "float32") == held
    if family in WINDOWED and length == LONG:                  # the windows really cut the cache
        all_full = {**raw, "layer_types": ["full_attention"] * raw["num_hidden_layers"]}
        assert held < kv_cache_bytes(all_full, length, BATCH, "float32")


@pytest.mark.parametrize("family", ["qwen3_next", "nemotron_h"])
def test_recurrent_state_equals_transformers_cache_and_does_not_grow(family):
    raw = raw_config(family)
    cfg = AutoConfig.for_model(**raw)
    layers = attention_layer_types(raw)
    assert "linear_attention" in layers and "full_attention" in layers
    for length in (3, LONG):
        _, _, states = prefill_cache(cfg, length)
        assert recurrent_state_values(raw, BATCH) == states > 0
    assert recurrent_state_bytes(raw, BATCH) == 4 * states
    assert recurrent_state_values(raw_config("mixtral"), BATCH) == 0
    assert serving_cache_bytes(raw, LONG, BATCH, "float32") == (kv_cache_bytes(raw, LONG, BATCH, "float32")
                                                               + recurrent_state_bytes(raw, BATCH))


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
    held, keys, _ = prefill_cache(cfg, LONG)
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
    cache = DynamicCache(config=AutoConfig.for_model(**text_config(raw)))
    kept = []
    for layer in cache.layers:
        if type(layer).__name__ in ("LinearAttentionLayer", "DummyLayer"):   # Mamba-2, DeltaNet, MoE/MLP: no keys
            kept.append(0)
            continue
        x = torch.zeros(1, 1, length, 1)
        layer.update(x, x)
        kept.append(layer.keys.shape[-2])
    assert cached_tokens_per_layer(raw, length) == kept
    assert len(kept) == len(attention_layer_types(raw))


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


def transformers_moe_layer(config):
    """The MoE layer of a config.json as transformers builds and runs it, read from its modules, not
    from any reading of the config: the model is built on the meta device for the shapes, and one
    router is built for real, with random weights, to see what it computes. Returns the course's
    keys for it and the indices of the MoE layers."""
    config = {k: v for k, v in config.items() if k not in ("architectures", "auto_map")}
    hf = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    routers = [(name, module) for name, module in model.named_modules() if type(module).__name__.endswith("TopKRouter")]
    layers = [int(name.split("model.layers.")[1].split(".")[0]) for name, _ in routers]
    name, router = routers[0]
    block = model.get_submodule(name.rsplit(".", 1)[0])
    E, D = router.weight.shape
    experts = block.experts
    hidden = experts.down_proj.shape[-1]
    gated = tuple(experts.gate_up_proj.shape) == (E, 2 * hidden, D)        # SiLU(x W_gate) * (x W_up)
    probe = torch.linspace(-4, 4, 33)
    assert gated and torch.allclose(experts.act_fn(probe), torch.nn.functional.silu(probe))
    # The router, run: which probabilities its k weights are, and whether they are renormalised.
    torch.manual_seed(0)
    live = type(router)(hf)
    with torch.no_grad():
        live.weight.normal_(0, D ** -0.5)                  # logits of order 1: no weight is ~1 by itself
        outputs = live(torch.randn(256, D))
    # The three outputs by what they are (their order differs between transformers releases):
    chosen = next(t for t in outputs if not t.is_floating_point()).long()              # (256, k) expert ids
    logits = next(t for t in outputs if t.is_floating_point() and t.shape[-1] == E)    # (256, E)
    weights = next(t for t in outputs if t.is_floating_point() and t is not logits)    # (256, k)
    k = chosen.shape[-1]
    picked = torch.softmax(logits.float(), dim=-1).gather(1, chosen)
    renormalised = bool(torch.allclose(weights.float().sum(-1), torch.ones(256), atol=1e-5))
    expected = picked / picked.sum(-1, keepdim=True) if renormalised else picked
    torch.testing.assert_close(weights.float(), expected, atol=1e-5, rtol=1e-5)   # softmax probabilities
    shared = getattr(block, "shared_expert", None)
    shared_width = sum(p.numel() for p in shared.parameters()) // (3 * D) if shared is not None else 0
    keys = {"router_type": "softmax", "num_experts": E, "num_experts_per_tok": k, "moe_hidden_dim": hidden,
            "norm_topk_prob": renormalised, "expert_type": "swiglu", "num_shared_experts": int(shared_width > 0),
            "shared_expert_hidden_dim": shared_width or None,
            "shared_expert_gate": getattr(block, "shared_expert_gate", None) is not None and shared_width > 0}
    return keys, layers


LOADER_CONFIGS = ["granite-3.1-1b-a400m", "granite-3.1-3b-a800m", "mixtral-8x7b", "mixtral-8x22b", "olmoe-1b-7b",
                  "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "qwen3-235b-a22b", "qwen3-coder-480b-a35b"]


@pytest.mark.parametrize("name", LOADER_CONFIGS)
def test_cheat_sheet_keys_agree_with_the_loader_of_notebook_11(name):
    """course_moe_keys (notebook 08's cheat-sheet) and config_from_hf (notebook 11's loader, which
    takes its MoE keys from course_moe_keys) against an independent oracle: what transformers builds
    and computes for the config. E and the widths come from its tensors' shapes, k, renormalisation
    and softmax scoring from running its router, the shared expert and its gate from its modules,
    and the MoE layers from where its routers are."""
    from utils.checkpoints import model_from_hf_config
    from utils.hf_to_course import config_from_hf, course_moe_keys
    from utils.moe import MoEFeedForward

    config = load_model_config(name)
    expected, moe_layers = transformers_moe_layer(config)
    keys, loader = course_moe_keys(config), config_from_hf(config)
    assert {key: keys[key] for key in expected} == expected
    assert {key: loader[key] for key in expected} == expected
    ours = model_from_hf_config(config, device="meta")
    assert [i for i, block in enumerate(ours.trf_blocks) if isinstance(block.ff, MoEFeedForward)] == moe_layers


def test_cheat_sheet_keys_of_deepseek_and_nemotron_match_transformers_configs():
    from utils.hf_to_course import course_moe_keys

    for name, expected in (("deepseek-v3", dict(router_type="sigmoid", routed_scaling_factor=2.5, n_group=8, topk_group=4,
                                                num_shared_experts=1, balancing="bias", expert_type="swiglu")),
                           ("nemotron-3-super-120b-a12b", dict(router_type="sigmoid", routed_scaling_factor=5.0,
                                                               latent_dim=1024, expert_type="relu2", balancing="bias"))):
        config = load_model_config(name)
        keys = course_moe_keys(config)
        assert {k: keys[k] for k in expected} == expected
        hf = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("architectures", "auto_map")})
        assert keys["routed_scaling_factor"] == hf.routed_scaling_factor and keys["n_group"] == hf.n_group
        assert keys["num_experts"] == hf.n_routed_experts and keys["norm_topk_prob"] == hf.norm_topk_prob
    with pytest.raises(ValueError, match="not in the cheat-sheet"):
        course_moe_keys({"model_type": "glm4_moe"})
