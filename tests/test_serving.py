import pytest
import torch

from utils.generation import KVCache
from utils.moe import moe_layers
from utils.moe_gpt import MoEGPTModel
from utils.memory import WEIGHT_FORMATS, format_of_config, stored_weight_bytes
from utils.params import count_parameters
from utils.published import SHIPPED_FORMATS, load_model_config
from utils.serving import decode_step_weight_bytes, expected_experts_touched, experts_touched_per_step

TINY = {"vocab_size": 50, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_hidden_dim": 8}


def test_expected_experts_touched_matches_a_simulation_of_uniform_routing():
    torch.manual_seed(0)
    E, k, B = 16, 3, 5
    picks = torch.rand(20000, B, E).argsort(-1)[..., :k]           # each token: k distinct experts, uniform
    simulated = torch.tensor([p.unique().numel() for p in picks.reshape(20000, -1)]).float().mean()
    assert expected_experts_touched(E, k, B) == pytest.approx(simulated.item(), rel=0.01)
    assert expected_experts_touched(E, k, 1) == pytest.approx(k)
    assert expected_experts_touched(E, E, 7) == E


@pytest.mark.parametrize("args", [(0, 1, 1), (8, 9, 1), (8, 2, 0), (8.0, 2, 1), (8, True, 1)])
def test_expected_experts_touched_rejects_bad_input(args):
    with pytest.raises(ValueError):
        expected_experts_touched(*args)


def test_experts_touched_per_step_counts_what_each_decode_step_routes():
    torch.manual_seed(0)
    model = MoEGPTModel(TINY).train()
    tokens = torch.randint(0, 50, (3, 12))
    touched = experts_touched_per_step(model, tokens, prompt_len=5)
    assert touched.shape == (7, 2) and model.training                 # 7 decode steps, 2 MoE layers; mode restored
    # The same count from the routing of one full pass: a decode step routes what the full pass routes
    # at that position (the cache makes them equal).
    model.eval()
    with torch.no_grad():
        model(tokens)
    full = [layer.last_routing["topk_idx"].view(3, 12, 2) for layer in moe_layers(model)]
    expected = torch.tensor([[f[:, t].unique().numel() for f in full] for t in range(5, 12)])
    assert torch.equal(touched, expected)
    assert torch.equal(experts_touched_per_step(model, tokens[:1], 5), torch.full((7, 2), 2))   # batch 1: k


def test_experts_touched_per_step_rejects_bad_input():
    model = MoEGPTModel(TINY)
    with pytest.raises(ValueError, match="prompt_len"):
        experts_touched_per_step(model, torch.zeros(2, 6, dtype=torch.long), 6)
    with pytest.raises(ValueError, match="context_length"):
        experts_touched_per_step(model, torch.zeros(2, 17, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="no MoE layers"):
        experts_touched_per_step(MoEGPTModel({**TINY, "num_experts": 0}), torch.zeros(1, 4, dtype=torch.long), 2)


def test_stored_bytes_equal_the_model_tensors():
    model = MoEGPTModel(TINY)
    assert stored_weight_bytes(TINY, "float32") == sum(p.numel() * p.element_size() for p in model.parameters())
    assert stored_weight_bytes(TINY, "bfloat16") * 2 == stored_weight_bytes(TINY, "float32")
    with pytest.raises(ValueError, match="fmt"):
        stored_weight_bytes(TINY, "int3")


def test_decode_step_bytes_go_from_active_to_total():
    counts = count_parameters(TINY)
    comps = counts["components"]
    at_one = decode_step_weight_bytes(TINY, 1, "float32")
    assert at_one["total"] == 4 * (counts["active"] - comps["embedding"])        # k experts, no embedding table
    everything = decode_step_weight_bytes(TINY, 1, "float32", experts_touched=8)
    assert everything["total"] == 4 * (counts["total"] - comps["embedding"])
    large = decode_step_weight_bytes(TINY, 10_000, "float32")
    assert large["total"] == pytest.approx(everything["total"])
    assert at_one["experts"] + at_one["other"] == at_one["total"]
    with pytest.raises(ValueError, match="experts_touched"):
        decode_step_weight_bytes(TINY, 1, experts_touched=9)


def test_a_tied_head_is_read_from_the_embedding():
    cfg = load_model_config("olmoe-1b-7b")
    tied = {**cfg, "tie_word_embeddings": True}
    V, D = cfg["vocab_size"], cfg["hidden_size"]
    untied_read = decode_step_weight_bytes(cfg, 1)["total"]
    assert decode_step_weight_bytes(tied, 1)["total"] == untied_read                 # the same matrix, read once
    assert stored_weight_bytes(cfg) - stored_weight_bytes(tied) == 2 * V * D


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_a_decode_step_reads_every_weight_transformers_builds_but_the_embedding_table(tied, use_bias):
    """ERNIE 4.5 with use_bias keeps a bias in lm_head, so with a tied head lm_head holds ONLY that
    bias (vocab_size values) while its weight is the embedding matrix. The shared matrix must still
    be read, once, as the head. Oracle: transformers' own model (meta device), whose parameters()
    lists a tied matrix once."""
    import transformers

    hf = transformers.AutoConfig.for_model(
        "ernie4_5_moe", vocab_size=1000, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, moe_num_experts=6, moe_k=2, moe_intermediate_size=16, intermediate_size=96,
        moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2, use_bias=use_bias,
        tie_word_embeddings=tied)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert (head.weight is embedding.weight) == tied and (head.bias is not None) == use_bias
    stored = sum(p.numel() for p in model.parameters())              # a tied matrix counted once
    read = stored if tied else stored - embedding.weight.numel()      # tied: the matrix is read as the head
    config = hf.to_dict()
    every_expert = decode_step_weight_bytes(config, 1, "float32", experts_touched=6)
    assert every_expert["total"] == 4 * read
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert experts == count_parameters(config)["components"]["routed_experts"]
    one_sequence = decode_step_weight_bytes(config, 1, "float32")["total"]         # k = 2 of the 6 experts
    assert one_sequence == pytest.approx(4 * (read - experts + experts * 2 / 6))


def test_shipped_formats_agree_with_the_configs_that_declare_them():
    declared = 0
    for name in SHIPPED_FORMATS:
        cfg = load_model_config(name)
        if cfg.get("quantization_config"):
            declared += 1
            assert format_of_config(cfg) == SHIPPED_FORMATS[name]
    assert declared >= 2                                               # kimi-k2 and gpt-oss-120b carry the field
    assert format_of_config(load_model_config("mixtral-8x7b")) == "bfloat16"
    with pytest.raises(ValueError, match="quant_method"):
        format_of_config({"quantization_config": {"quant_method": "awq"}})
    assert set(SHIPPED_FORMATS.values()) <= set(WEIGHT_FORMATS)


def test_shipped_sizes_match_what_the_publishers_state():
    """gpt-oss with MXFP4 experts: the vLLM project's announcement gives 63 GB (120b) and 14 GB (20b); the
    counts here give 65 and 14 GB. DeepSeek-V3 in FP8: its 671B parameters at about one byte each."""
    gpt_oss = stored_weight_bytes(load_model_config("gpt-oss-120b"), "mxfp4")
    assert 60e9 < gpt_oss < 68e9
    assert 13e9 < stored_weight_bytes(load_model_config("gpt-oss-20b"), "mxfp4") < 15e9
    deepseek = load_model_config("deepseek-v3")
    assert stored_weight_bytes(deepseek, "fp8") == pytest.approx(count_parameters(deepseek)["total"], rel=0.01)


def test_kv_cache_of_the_decode_loop_is_the_models_dtype():
    model = MoEGPTModel(TINY).to(torch.bfloat16)
    touched = experts_touched_per_step(model, torch.randint(0, 50, (2, 6)), 3)
    assert touched.shape == (3, 2)
    assert KVCache(model.kv_cache_shape, 1).nbytes() == 2 * 2 * 16 * 16 * 4
