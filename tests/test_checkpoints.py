"""utils/modern.py and utils/checkpoints.py against transformers, the independent reference.

For each supported family, two small random models of different shapes are built with
transformers, given weights large enough that every mapping mistake shows in the logits, and
saved with save_pretrained (variant "b" in several shards). Our loader must reproduce their
logits (atol 1e-4, float32), their greedy tokens, and each piece (RMSNorm, attention with RoPE
and grouped-query heads, the MoE layer) module by module; what we save must load back in
transformers. Offline: nothing is downloaded.
"""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from utils import checkpoints
from utils.checkpoints import (FP8_LOGIT_RTOL, hf_tensor_map, load_hf_checkpoint, model_from_hf_config,
                               save_hf_checkpoint)
from utils.generation import generate
from utils.hf_to_course import SUPPORTED_MODEL_TYPES, config_from_hf, fp8_block_size
from utils.modern import ModernMoEModel, RMSNorm, apply_rope, rope_cos_sin, rope_inverse_frequencies
from utils.moe import MoEFeedForward

COMMON = {"a": dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64),
          "b": dict(vocab_size=131, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                    num_key_value_heads=1, max_position_embeddings=80)}
FAMILIES = {
    "qwen3_moe": {"a": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=40,
                            head_dim=16),
                  "b": dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24, intermediate_size=56,
                            head_dim=8, norm_topk_prob=True, attention_bias=True, decoder_sparse_step=2,
                            mlp_only_layers=[2], rope_parameters={"rope_type": "default", "rope_theta": 1e6})},
    "olmoe": {"a": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=16),
              "b": dict(num_experts=6, num_experts_per_tok=1, intermediate_size=24, norm_topk_prob=True,
                        clip_qkv=1.5)},
    "mixtral": {"a": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16),
                "b": dict(num_local_experts=5, num_experts_per_tok=2, intermediate_size=20, head_dim=12)},
    "granitemoe": {"a": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16,
                             embedding_multiplier=12.0, attention_multiplier=0.05, residual_multiplier=0.22,
                             logits_scaling=6.0),
                   "b": dict(num_local_experts=6, num_experts_per_tok=3, intermediate_size=24, tie_word_embeddings=True,
                             embedding_multiplier=3.0, attention_multiplier=0.125, residual_multiplier=0.5,
                             logits_scaling=2.0)},
    "qwen2_moe": {"a": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=40,
                            shared_expert_intermediate_size=24),
                  "b": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=8, intermediate_size=32,
                            shared_expert_intermediate_size=40, norm_topk_prob=True, decoder_sparse_step=1,
                            mlp_only_layers=[1])},
}
CASES = [(family, variant) for family in FAMILIES for variant in ("a", "b")]


def make_reference(family, variant, seed=0):
    """A transformers model of the family with weights of realistic scale (not the 0.02 init,
    under which every logit is near 0 and a swapped matrix could go unnoticed)."""
    cfg = AutoConfig.for_model(family, **COMMON[variant], **FAMILIES[family][variant],
                               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0, 0.2)
            else:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{(family, variant): (reference model, directory)}; variant b (and Mixtral a) is sharded."""
    out = {}
    for family, variant in CASES:
        ref = make_reference(family, variant)
        path = tmp_path_factory.mktemp(f"{family}_{variant}")
        shard = "30KB" if variant == "b" or family == "mixtral" else "1GB"
        ref.save_pretrained(path, max_shard_size=shard)
        out[family, variant] = ref, path
    return out


def tokens(vocab_size, seed=1, shape=(2, 24)):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_the_fixture_checkpoints_are_sharded_where_asked(saved):
    for family, variant in CASES:
        _, path = saved[family, variant]
        sharded = (path / "model.safetensors.index.json").is_file()
        assert sharded == (variant == "b" or family == "mixtral"), (family, variant)
        if sharded:
            assert len(list(path.glob("*.safetensors"))) > 2


@pytest.mark.parametrize("family,variant", CASES)
def test_logits_and_greedy_tokens_equal_transformers(saved, family, variant):
    ref, path = saved[family, variant]
    ours = load_hf_checkpoint(path)
    assert not ours.training
    idx = tokens(ref.config.vocab_size)
    idx[0, 0] = idx[:, 3] = 0                        # token id 0 is a token like any other, also first
    with torch.no_grad():
        expected = ref(idx).logits
        got = ours(idx)
    assert expected.abs().max() > 0.5                # the weights are not near zero
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # pad_token_id=0 is a token of the prompt: without an explicit attention_mask, transformers would
    # infer one from it and mask those prompt tokens as padding. No token here is padding: all ones.
    prompt = idx[:, :8]
    hf_tokens = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 12), hf_tokens)
    assert torch.equal(generate(ours, prompt, 12, use_cache=False), hf_tokens)


def _captured(ref, idx, module_names):
    """Inputs and outputs of the named submodules of `ref` during one forward pass."""
    seen = {}
    modules = dict(ref.named_modules())

    def keep(name):
        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(name, (x, out[0] if isinstance(out, tuple) else out))   # returns None: out unchanged
        return hook

    hooks = [modules[name].register_forward_hook(keep(name), with_kwargs=True) for name in module_names]
    try:
        with torch.no_grad():
            ref(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("family,variant", CASES)
def test_each_piece_equals_the_transformers_module(saved, family, variant):
    """RMSNorm, attention (RoPE, grouped-query heads, q/k norm) and the MoE or dense MLP of every
    block, fed the inputs the transformers module received."""
    ref, path = saved[family, variant]
    ours = load_hf_checkpoint(path)
    idx = tokens(ref.config.vocab_size, shape=(2, 16))
    moe_name = "block_sparse_moe" if family == "granitemoe" else "mlp"     # transformers 5 names
    names = [f"model.layers.{i}.{part}" for i in range(ref.config.num_hidden_layers)
             for part in ("input_layernorm", "self_attn", "post_attention_layernorm", moe_name)]
    seen = _captured(ref, idx, names)
    cos, sin = rope_cos_sin(torch.arange(16), rope_inverse_frequencies(ours.cfg["rotary_dim"], ours.cfg["rope_theta"]))
    with torch.no_grad():
        for i, block in enumerate(ours.trf_blocks):
            pre = f"model.layers.{i}."
            for hf_part, our_module in (("input_layernorm", block.norm1), ("post_attention_layernorm", block.norm2)):
                x, y = seen[pre + hf_part]
                torch.testing.assert_close(our_module(x), y, atol=1e-5, rtol=1e-5)
            x, y = seen[pre + "self_attn"]
            torch.testing.assert_close(block.att(x, cos, sin), y, atol=1e-5, rtol=1e-5)
            x, y = seen[pre + moe_name]
            ff = block.ff(x) if hasattr(block.ff, "router") else block.ff.as_mlp(x)
            torch.testing.assert_close(ff, y, atol=1e-5, rtol=1e-5)


def test_rmsnorm_and_rope_equal_transformers_including_partial_rotary():
    from transformers.models.glm4_moe import modeling_glm4_moe as glm
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen

    torch.manual_seed(0)
    norm = qwen.Qwen3MoeRMSNorm(24, eps=1e-6)
    norm.weight.data.normal_(1, 0.3)
    ours = RMSNorm(24, eps=1e-6)
    ours.weight.data.copy_(norm.weight)
    x = 3 * torch.randn(2, 5, 24)
    torch.testing.assert_close(ours(x), norm(x))
    torch.testing.assert_close(ours(x.bfloat16()), norm(x.bfloat16()))
    for module, factor, theta in ((qwen, 1.0, 1e6), (glm, 0.5, 10000.0), (glm, 0.25, 500.0)):
        config = (qwen.Qwen3MoeConfig if module is qwen else glm.Glm4MoeConfig)(
            hidden_size=64, num_attention_heads=4, head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor})
        rotary = (qwen.Qwen3MoeRotaryEmbedding if module is qwen else glm.Glm4MoeRotaryEmbedding)(config)
        positions = torch.arange(37)
        q, k = torch.randn(2, 4, 37, 16), torch.randn(2, 4, 37, 16)
        cos_ref, sin_ref = rotary(q, positions[None])
        cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(int(16 * factor), theta))
        torch.testing.assert_close(cos, cos_ref[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, sin_ref[0], atol=1e-6, rtol=0)
        q_ref, k_ref = module.apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
        torch.testing.assert_close(apply_rope(q, cos, sin), q_ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(apply_rope(k, cos, sin), k_ref, atol=1e-6, rtol=0)
        if factor < 1:
            assert torch.equal(apply_rope(q, cos, sin)[..., int(16 * factor):], q[..., int(16 * factor):])


@pytest.mark.parametrize("family", SUPPORTED_MODEL_TYPES)
def test_round_trip_through_save_loads_in_transformers(saved, family, tmp_path):
    ref, path = saved[family, "b"]
    ours = load_hf_checkpoint(path)
    out = save_hf_checkpoint(ours, tmp_path / "saved", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set().union(*(load_file(out / f).keys() for f in set(index["weight_map"].values())))
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    idx = tokens(ref.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, ref(idx).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_hf_checkpoint(out)(idx), ours(idx), atol=0, rtol=0)
    # one file when it fits
    single = save_hf_checkpoint(ours, tmp_path / "single")
    assert [f.name for f in single.glob("*.safetensors")] == ["model.safetensors"]
    assert not (single / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("variant", ["a", "b"])
def test_bfloat16_loading_keeps_the_router_in_float32(saved, variant):
    """Loaded in bfloat16, every router still computes float32 logits from float32 weights: fed the
    bfloat16 hidden states the bf16 model's MoE layers receive, it chooses exactly the experts the
    float32 load's router chooses for them. A router with bfloat16 weights, or one computing in
    bfloat16, chooses differently for some of these tokens (checked below: the test can fail)."""
    ref, path = saved["qwen3_moe", variant]
    ours = load_hf_checkpoint(path, dtype="bfloat16")
    full = load_hf_checkpoint(path, dtype="float32")
    assert ours.tok_emb.weight.dtype == torch.bfloat16
    moe = [block.ff for block in ours.trf_blocks if isinstance(block.ff, MoEFeedForward)]
    assert moe and all(ff.experts.w_in.dtype == torch.bfloat16 for ff in moe)
    routers = [ff.router for ff in moe]
    routers32 = [block.ff.router for block in full.trf_blocks if isinstance(block.ff, MoEFeedForward)]
    assert all(r.gate.weight.dtype == torch.float32 for r in routers)
    calls = []                                          # (router input, logits, chosen experts) per MoE layer
    hooks = [r.register_forward_hook(lambda module, args, out: calls.append((args[0], out[0], out[3])))
             for r in routers]
    idx = tokens(ref.config.vocab_size, shape=(64, ref.config.max_position_embeddings))
    try:
        with torch.no_grad():
            ours(idx)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == len(routers)
    would_change = 0
    with torch.no_grad():
        for (x, logits, chosen), router32 in zip(calls, routers32):
            assert x.dtype == torch.bfloat16                 # the layer ran in bfloat16 ...
            assert logits.dtype == torch.float32             # ... its router did not
            logits32, _, _, chosen32, _ = router32(x.float())
            assert torch.equal(logits, logits32)
            assert torch.equal(chosen, chosen32)
            rounded = F.linear(x.float(), router32.gate.weight.bfloat16().float())   # bfloat16 router weights
            picked = rounded.topk(chosen32.shape[-1], dim=-1).indices
            would_change += (picked.sort(-1).values != chosen32.sort(-1).values).any(-1).sum().item()
    assert would_change > 0
    with torch.no_grad():
        diff = (ours(idx[:2]).float() - ref(idx[:2]).logits).abs()
    assert diff.mean() < 0.1 * ref(idx[:2]).logits.abs().mean()
    assert load_hf_checkpoint(path, dtype=torch.float16).tok_emb.weight.dtype == torch.float16


def test_tied_embeddings_share_one_matrix(saved):
    _, path = saved["granitemoe", "b"]
    ours = load_hf_checkpoint(path)
    assert ours.out_head.weight is ours.tok_emb.weight
    names = set()
    for f in path.glob("*.safetensors"):
        names |= set(load_file(f))
    assert "lm_head.weight" not in names


def test_loading_reads_one_checkpoint_tensor_at_a_time(saved, monkeypatch):
    """The weights are allocated once (on the meta device, then to_empty) and the checkpoint is
    copied in tensor by tensor: at most one tensor read from the files is alive at any time."""
    import weakref

    alive, peak = set(), [0]
    real_safe_open = checkpoints.safe_open

    class CountingFile:
        def __init__(self, *args, **kwargs):
            self.file = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            tensor = self.inner.get_tensor(name)
            key = id(tensor)
            alive.add(key)
            weakref.finalize(tensor, alive.discard, key)
            peak[0] = max(peak[0], len(alive))
            return tensor

    monkeypatch.setattr(checkpoints, "safe_open", CountingFile)
    _, path = saved["mixtral", "b"]
    load_hf_checkpoint(path)
    assert peak[0] == 1


def _rewrite(path, edit):
    """Apply edit(name, tensors) to the tensors of every shard of a copied checkpoint."""
    for f in path.glob("*.safetensors"):
        tensors = load_file(f)
        edit(tensors)
        save_file(tensors, f, metadata={"format": "pt"})


def test_bad_checkpoints_give_clear_errors(saved, tmp_path):
    import shutil

    _, path = saved["qwen3_moe", "a"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path / "empty")
    shutil.copy(path / "config.json", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_checkpoint(tmp_path / "empty")

    _, sharded = saved["mixtral", "b"]
    broken = tmp_path / "shard_missing"
    shutil.copytree(sharded, broken)
    next(broken.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        load_hf_checkpoint(broken)

    def copy_with(name, edit_config=None, edit_tensors=None):
        target = tmp_path / name
        shutil.copytree(path, target)
        if edit_config:
            config = json.loads((target / "config.json").read_text())
            edit_config(config)
            (target / "config.json").write_text(json.dumps(config))
        if edit_tensors:
            _rewrite(target, edit_tensors)
        return target

    with pytest.raises(ValueError, match=r"model_type 'deepseek_v3' is not supported; supported: \['granitemoe'"):
        load_hf_checkpoint(copy_with("unsupported", lambda c: c.update(model_type="deepseek_v3")))
    with pytest.raises(ValueError, match="1 tensor.*missing.*layers.1.mlp.experts.3.up_proj"):
        load_hf_checkpoint(copy_with("missing", edit_tensors=lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight")))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate.weight' has shape \(4, 32\), the config asks for \(5, 32\)"):
        load_hf_checkpoint(copy_with("shape", lambda c: c.update(num_experts=5, num_local_experts=5)))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.extra.weight' does not belong"):
        load_hf_checkpoint(copy_with("extra", edit_tensors=lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(2)})))
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        load_hf_checkpoint(copy_with("yarn", lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                                 "rope_theta": 1e6})))
    with pytest.raises(ValueError, match=r"dtype must be one of \['float32', 'bfloat16', 'float16'\], got 'int8'"):
        load_hf_checkpoint(path, dtype="int8")
    with pytest.raises(ValueError, match="has no hf_config"):
        save_hf_checkpoint(ModernMoEModel(config_from_hf(json.loads((path / "config.json").read_text()))), tmp_path / "x")


def test_a_path_to_a_file_asks_for_the_directory(saved, tmp_path):
    _, path = saved["mixtral", "b"]                                  # sharded: it has an index too
    for part in ("config.json", "model.safetensors.index.json", next(path.glob("*.safetensors")).name):
        with pytest.raises(NotADirectoryError, match=r"is a file: the loader needs the model's directory, the one "
                                                     r"that holds config\.json and the \*\.safetensors files; this "
                                                     r"file is part of one: pass its folder, " + re.escape(str(path))):
            load_hf_checkpoint(path / part)
    other = tmp_path / "notes.txt"
    other.write_text("not a model")
    with pytest.raises(NotADirectoryError, match=r"notes\.txt is a file: the loader needs the model's dir") as err:
        load_hf_checkpoint(other)
    assert "pass its folder" not in str(err.value)                   # no hint for a file that is not one of its parts


FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
REFUSED = [{"quant_method": "mxfp4"}, {"quant_method": "gptq", "bits": 4},
           {"quant_method": "bitsandbytes", "load_in_4bit": True}, {}]


@pytest.mark.parametrize("quantization", REFUSED)
def test_an_unsupported_quantization_is_refused_before_any_tensor_is_read(saved, tmp_path, monkeypatch, quantization):
    """A quantisation the loader cannot read (MXFP4, GPTQ, ...) stores packed integers and scales
    that copied into float parameters would give wrong weights: its quantization_config is refused
    first, and no file is opened."""
    import shutil

    _, path = saved["qwen3_moe", "a"]
    target = tmp_path / "quantized"
    shutil.copytree(path, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    opened = []
    real_safe_open = checkpoints.safe_open
    monkeypatch.setattr(checkpoints, "safe_open", lambda *a, **kw: opened.append(a) or real_safe_open(*a, **kw))
    with pytest.raises(ValueError, match=rf"quantization_config \(quant_method {quantization.get('quant_method')!r}\): "
                                         r"this quantisation is not supported"):
        load_hf_checkpoint(target)
    assert opened == []


BASE = dict(model_type="mixtral", vocab_size=10, hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
            max_position_embeddings=32, rms_norm_eps=1e-5, num_local_experts=2, num_experts_per_tok=1,
            intermediate_size=4)


@pytest.mark.parametrize("quantization", REFUSED)
def test_config_from_hf_refuses_a_quantization_other_than_fp8(quantization):
    hf = {**BASE, "quantization_config": quantization}
    message = rf"quant_method {quantization.get('quant_method')!r}\): this quantisation is not supported"
    for build in (config_from_hf, model_from_hf_config):
        with pytest.raises(ValueError, match=message):
            build(hf)
    assert config_from_hf({**BASE, "quantization_config": None})["num_experts"] == 2     # null: not quantised
    assert config_from_hf({**BASE, "quantization_config": FP8}) == config_from_hf(BASE)  # FP8: the same model


@pytest.mark.parametrize("change,message", [
    ({"activation_scheme": "static"}, "activation_scheme must be 'dynamic'"),
    ({"fmt": "e5m2"}, "fmt must be 'e4m3'"),
    ({"scale_fmt": "ue8m0"}, "scale_fmt must be 'float'"),
    ({"weight_block_size": None}, r"quantization_config weight_block_size must be two positive ints \(rows, cols\), e.g. \(128, 128\), got None"),
    ({"weight_block_size": [128]}, "weight_block_size must be two positive ints")])
def test_fp8_layouts_the_loader_does_not_read_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf({**BASE, "quantization_config": {**FP8, **change}})
    assert fp8_block_size({**BASE, "quantization_config": {**FP8, "weight_block_size": [64, 32]}}) == (64, 32)
    assert fp8_block_size(BASE) is None


def fp8_like_transformers(path, target, block):
    """Copy the checkpoint in `path` to `target` in block-scaled FP8, quantised by transformers' own
    Fp8Quantize (the writer is not ours): every attention and expert matrix, each with its
    weight_scale_inv; config.json gets DeepSeek-V3's quantization_config with this block size."""
    import shutil
    from types import SimpleNamespace

    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    shutil.copytree(path, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": {**FP8, "weight_block_size": list(block)}}))
    quantize = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=tuple(block))))

    def edit(tensors):
        for name in [n for n in tensors if checkpoints.is_fp8_linear(n)]:
            out = quantize.convert({name: tensors[name]})
            assert out[name].dtype == torch.float8_e4m3fn, name          # whole blocks: every matrix quantised
            tensors.update(out)
    _rewrite(target, edit)
    return target


def _dequantized_weights(path):
    """{name: float32 weights} of every FP8 tensor in a checkpoint, by utils.quant, and the block size."""
    from utils.quant import dequantize_fp8_blockwise

    block = tuple(json.loads((path / "config.json").read_text())["quantization_config"]["weight_block_size"])
    tensors = {}
    for f in path.glob("*.safetensors"):
        tensors.update(load_file(f))
    return {name: dequantize_fp8_blockwise(t, tensors[name + "_scale_inv"], block)
            for name, t in tensors.items() if t.dtype == torch.float8_e4m3fn}, block


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe"])
def test_an_fp8_checkpoint_in_the_published_layout_loads(saved, tmp_path, family, monkeypatch):
    """A block-scaled FP8 checkpoint written by transformers' quantiser loads: each weight is its FP8
    numbers times their block's scale, within utils.quant's bound of the unquantised weight; the
    logits move from the unquantised model's by less than the stated tolerance FP8_LOGIT_RTOL (a
    measured one: no bound on the logits is derived), and further than bfloat16 weights move them;
    transformers, loading the same files (it dequantises too, on a CPU), gives the same logits."""
    from transformers.quantizers import quantizer_finegrained_fp8

    from utils.quant import fp8_error_bound, quantize_fp8_blockwise

    ref, path = saved[family, "a"]
    fp8 = fp8_like_transformers(path, tmp_path / "fp8", block=(8, 8))
    ours, full = load_hf_checkpoint(fp8), load_hf_checkpoint(path)
    assert ours.hf_config["quantization_config"]["weight_block_size"] == [8, 8]
    dequantized, block = _dequantized_weights(fp8)
    original = {name: torch.cat(parts, dim) for name, (parts, dim) in hf_tensor_map(full).items()}
    loaded = {name: torch.cat(parts, dim) for name, (parts, dim) in hf_tensor_map(ours).items()}
    assert set(dequantized) == {name for name in loaded if checkpoints.is_fp8_linear(name)}
    for name, weight in loaded.items():
        if name not in dequantized:
            assert torch.equal(weight, original[name])                 # stored in float: read as it is
            continue
        assert torch.equal(weight, dequantized[name])                  # FP8 number x its block's scale
        _, scale_inv = quantize_fp8_blockwise(original[name], block)
        assert ((weight - original[name]).abs() <= fp8_error_bound(original[name], scale_inv, block)).all()

    idx = tokens(ref.config.vocab_size)
    with torch.no_grad():
        exact, got = full(idx), ours(idx)
        rounded = copy_with_weights(full, lambda name, w: w.bfloat16().float() if name in dequantized else w)(idx)
    error, bf16_error = (got - exact).norm() / exact.norm(), (rounded - exact).norm() / exact.norm()
    # e4m3 keeps 3 mantissa bits, bfloat16 7: FP8 weights move the logits further than bf16 ones (not
    # always 16 times further: these random models amplify small changes, a rerouted token most).
    assert bf16_error < error < FP8_LOGIT_RTOL, (error, bf16_error)

    # transformers asks for the accelerate package before it reads any FP8 checkpoint, although on a
    # CPU it only dequantises them, which needs no accelerate (a course dependency it is not).
    monkeypatch.setattr(quantizer_finegrained_fp8, "is_accelerate_available", lambda: True)
    theirs = AutoModelForCausalLM.from_pretrained(fp8, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, got, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe"])
def test_our_fp8_checkpoint_loads_in_transformers(saved, tmp_path, family, monkeypatch):
    """What save_hf_checkpoint writes in FP8, transformers reads (dequantising, on a CPU) to the logits
    we load. Blocks of 8 divide every matrix here: transformers' dequantisation on load infers the
    block size from the shapes (rows // scale rows), which is wrong for partial edge blocks."""
    from transformers.quantizers import quantizer_finegrained_fp8

    ref, path = saved[family, "a"]
    out = save_hf_checkpoint(load_hf_checkpoint(path), tmp_path / "fp8", fp8_block_size=(8, 8))
    monkeypatch.setattr(quantizer_finegrained_fp8, "is_accelerate_available", lambda: True)   # see above
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    idx = tokens(ref.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, load_hf_checkpoint(out)(idx), atol=1e-5, rtol=0)


def copy_with_weights(model, edit):
    """A copy of a loaded model whose checkpoint tensors are edit(name, tensor)."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, (parts, dim) in hf_tensor_map(twin).items():
            new = edit(name, torch.cat(parts, dim))
            for part, piece in zip(parts, new.split([t.shape[dim] for t in parts], dim)):
                part.copy_(piece)
    return twin


@pytest.mark.parametrize("family", SUPPORTED_MODEL_TYPES)
def test_our_fp8_checkpoints_load_back_with_partial_edge_blocks(saved, tmp_path, family):
    """save_hf_checkpoint(..., fp8_block_size) writes the published layout; with blocks of 32 the
    variant-b models (hidden size 48) have partial edge blocks. Loading gives every weight within
    the bound; saving the loaded model without fp8_block_size writes a plain float checkpoint."""
    from utils.quant import fp8_error_bound, quantize_fp8_blockwise

    _, path = saved[family, "b"]
    full = load_hf_checkpoint(path)
    out = save_hf_checkpoint(full, tmp_path / "fp8", max_shard_bytes=20_000, fp8_block_size=(32, 32))
    assert len(list(out.glob("*.safetensors"))) > 1                    # scales may sit in another shard
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {**FP8, "weight_block_size": [32, 32]}
    back = load_hf_checkpoint(out)
    dequantized, _ = _dequantized_weights(out)
    for name, (parts, dim) in hf_tensor_map(back).items():
        weight, original = torch.cat(parts, dim), torch.cat(hf_tensor_map(full)[name][0], dim)
        if name in dequantized:
            _, scale_inv = quantize_fp8_blockwise(original, (32, 32))
            assert torch.equal(weight, dequantized[name])
            assert ((weight - original).abs() <= fp8_error_bound(original, scale_inv, (32, 32))).all()
        else:
            assert torch.equal(weight, original)
    assert any(t.shape[-1] % 32 for t in dequantized.values())          # partial edge blocks occurred
    plain = save_hf_checkpoint(back, tmp_path / "plain")
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())
    idx = tokens(full.cfg["vocab_size"])
    with torch.no_grad():
        assert torch.equal(load_hf_checkpoint(plain)(idx), back(idx))
    assert load_hf_checkpoint(out, dtype="bfloat16").tok_emb.weight.dtype == torch.bfloat16


def test_bad_fp8_checkpoints_give_clear_errors(saved, tmp_path):
    _, path = saved["qwen3_moe", "a"]
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    fp8 = save_hf_checkpoint(load_hf_checkpoint(path), tmp_path / "fp8", fp8_block_size=(8, 8))

    def broken(tag, edit_tensors=None, quantization="keep"):
        import shutil

        target = tmp_path / tag
        shutil.copytree(fp8, target)
        if edit_tensors:
            _rewrite(target, edit_tensors)
        if quantization != "keep":
            config = json.loads((target / "config.json").read_text())
            config["quantization_config"] = quantization
            (target / "config.json").write_text(json.dumps(config))
        return target

    with pytest.raises(ValueError, match=rf"FP8 tensor '{re.escape(name)}' has no '{re.escape(name)}_scale_inv'"):
        load_hf_checkpoint(broken("no_scale", lambda t: t.pop(name + "_scale_inv")))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.experts.1.up_proj.weight_scale_inv' scales a tensor"):
        load_hf_checkpoint(broken("no_weight", lambda t: t.pop(name)))
    with pytest.raises(ValueError, match=r"scale_inv has shape \(1, 1\); a weight of shape \(16, 32\) in blocks of "
                                         r"\(8, 8\) needs \(2, 4\)"):
        load_hf_checkpoint(broken("scale_shape", lambda t: t.update({name + "_scale_inv": torch.ones(1, 1)})))
    with pytest.raises(ValueError, match="is stored in torch.float8_e4m3fn but config.json declares no FP8"):
        load_hf_checkpoint(broken("no_config", quantization=None))
    with pytest.raises(ValueError, match=r"has a '.*_scale_inv' but is stored in torch.float32"):
        load_hf_checkpoint(broken("float_weight", lambda t: t.update({name: t[name].float()})))
    with pytest.raises(ValueError, match=r"fp8_block_size must be None or two positive ints \(rows, cols\), e.g. \(128, 128\), got 128"):
        save_hf_checkpoint(load_hf_checkpoint(path), tmp_path / "bad", fp8_block_size=128)


def test_config_from_hf_refuses_what_the_decoder_does_not_implement():
    base = dict(model_type="mixtral", vocab_size=10, hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
                max_position_embeddings=32, rms_norm_eps=1e-5, num_local_experts=2, num_experts_per_tok=1,
                intermediate_size=4)
    assert config_from_hf(base)["rope_theta"] == 1e6          # Mixtral's default base
    with pytest.raises(ValueError, match="sliding-window attention"):
        config_from_hf({**base, "sliding_window": 16})
    assert config_from_hf({**base, "sliding_window": 32})["context_length"] == 32   # a window that covers it all
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="has no 'rms_norm_eps'"):
        config_from_hf({k: v for k, v in base.items() if k != "rms_norm_eps"})
    with pytest.raises(ValueError, match="model_type None is not supported"):
        config_from_hf({k: v for k, v in base.items() if k != "model_type"})


def test_a_model_built_from_a_config_saves_and_loads(tmp_path):
    """The notebook's offline path: a random model from a config.json dict, written and read back."""
    hf = dict(model_type="granitemoe", vocab_size=50, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
              num_hidden_layers=2, max_position_embeddings=32, rms_norm_eps=1e-6, num_local_experts=4,
              num_experts_per_tok=2, intermediate_size=8, tie_word_embeddings=True, embedding_multiplier=12.0,
              attention_multiplier=0.125, residual_multiplier=0.22, logits_scaling=6.0)
    torch.manual_seed(0)
    model = model_from_hf_config(hf)
    save_hf_checkpoint(model, tmp_path)
    back = load_hf_checkpoint(tmp_path)
    idx = tokens(50)
    with torch.no_grad():
        assert torch.equal(back(idx), model.eval()(idx))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(idx).logits, back(idx), atol=1e-5, rtol=0)


def test_transformers_is_the_reference_version():
    assert int(transformers.__version__.split(".")[0]) >= 5


REAL_CONFIGS = ["granite-3.1-1b-a400m", "granite-3.1-3b-a800m", "mixtral-8x7b", "mixtral-8x22b", "olmoe-1b-7b",
                "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "qwen3-235b-a22b", "qwen3-coder-480b-a35b"]


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_configs_build_the_parameters_notebook_08_counts(name):
    """The published config.json of every supported real model builds (on the meta device: shapes
    only) a decoder with exactly the parameter count utils.params counts from the config, and
    every tensor name the loader expects has the shape of the published per-expert layout."""
    from utils.params import count_parameters
    from utils.published import load_model_config

    hf = load_model_config(name)
    model = model_from_hf_config(hf, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count_parameters(hf)["total"]
    names = checkpoints.hf_tensor_map(model)
    E = model.cfg["num_experts"]
    expert_names = [n for n in names if ".experts." in n or "input_linear" in n]
    assert len(expert_names) == sum(isinstance(b.ff, MoEFeedForward) for b in model.trf_blocks) * (
        1 if hf["model_type"] == "granitemoe" else 3 * E)


def test_swapped_expert_matrices_are_caught(saved, monkeypatch):
    """The equality checks above can fail: exchanging Mixtral's w1 and w3 changes the logits."""
    ref, path = saved["mixtral", "a"]
    monkeypatch.setattr(checkpoints, "_MIXTRAL_NAMES", (("w3", "w_gate"), ("w1", "w_in"), ("w2", "w_out")))
    idx = tokens(ref.config.vocab_size)
    with torch.no_grad():
        assert (load_hf_checkpoint(path)(idx) - ref(idx).logits).abs().max() > 0.1


def test_saving_over_a_checkpoint_is_refused(saved, tmp_path):
    _, path = saved["olmoe", "a"]
    model = load_hf_checkpoint(path)
    save_hf_checkpoint(model, tmp_path / "out", max_shard_bytes=10_000)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        save_hf_checkpoint(model, tmp_path / "out")


def test_load_tokenizer_reads_tokenizer_json_and_download_asks_only_for_what_it_loads(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["To be, or not to be: that is the question."] * 20,
                                  trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    ours = checkpoints.load_tokenizer(tmp_path)
    ids = ours.encode("not to be")
    assert ids == tokenizer.encode("not to be").ids and ours.decode(ids) == "not to be"
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        checkpoints.load_tokenizer(tmp_path / "nowhere")

    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)) or kw["local_dir"])
    assert checkpoints.download_hf_checkpoint("ibm-granite/granite-3.1-1b-a400m-base", tmp_path) == tmp_path
    assert calls == [("ibm-granite/granite-3.1-1b-a400m-base",
                      {"local_dir": tmp_path, "allow_patterns": ["*.json", "*.safetensors"]})]
