"""Real models as their publishers describe them: the config.json files shipped in
utils/assets/model_configs, the parameter counts and weight formats publishers give, and how to
compare our counts with theirs (each publisher leaves out different parts, and rounds)."""
import json
import pathlib

from .params import count_parameters

MODEL_CONFIGS = pathlib.Path(__file__).with_name("assets") / "model_configs"

# What publishers leave out when they quote "active" parameters. The gpt-oss model card counts the
# output head, not the input embedding. DeepSeek-V3 says "37B activated" (README.md), and in
# README_WEIGHTS.md the sentence DEEPSEEK_V3_WEIGHTS_QUOTE, which a direct count does not reproduce:
# counting both 0.9B matrices gives one matrix more than its 36.7B; leaving the input embedding out
# comes within 0.1B of it and rounds to the headline 37B, so that is the convention used for
# DeepSeek-V3 too (tests/test_params_hf.py checks both). NVIDIA's Nemotron 3 Nano card gives active
# "without embeddings" (3.2B) and with them (3.6B): without the input embedding, the head kept, is the
# count that gives 3.2B. The others count both.
PUBLISHED_ACTIVE_EXCLUDES = {"deepseek-v3": ("embedding",), "gpt-oss-20b": ("embedding",), "gpt-oss-120b": ("embedding",),
                             "nemotron-3-nano-30b-a3b": ("embedding",)}
# README_WEIGHTS.md of github.com/deepseek-ai/DeepSeek-V3, "Main Model Weights", word for word (the
# markdown bold around the number removed).
DEEPSEEK_V3_WEIGHTS_QUOTE = ("Activation parameters: 36.7B (including 0.9B for Embedding and 0.9B for "
                             "the output Head).")
# The format (utils.memory.WEIGHT_FORMATS) each shipped config's model is published in; bfloat16 for
# the others. The configs of Kimi K2 and gpt-oss-120b carry it in their quantization_config (a test
# checks that they agree); the copies of DeepSeek-V3's and gpt-oss-20b's config here lack that field.
SHIPPED_FORMATS = {"deepseek-v3": "fp8", "kimi-k2": "fp8", "gpt-oss-20b": "mxfp4", "gpt-oss-120b": "mxfp4"}


def load_model_config(name):
    """A real model's config.json fields shipped in utils/assets/model_configs (e.g. "deepseek-v3")."""
    path = MODEL_CONFIGS / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_CONFIGS.glob("*.json") if p.stem != "published")
        raise ValueError(f"no model config {name!r}; available: {known}")
    return json.loads(path.read_text())


def published_unit(published):
    """The value of the last digit a publisher writes: "3.3B" -> 0.1B, "37B" -> 1B, "1T" -> 1T
    (trailing zeros are read as rounding: "80B" -> 10B, looser than 1% only where 1% holds anyway)."""
    digits = str(int(published)).rstrip("0")
    return 10 ** (len(str(int(published))) - len(digits))


def within_published_precision(ours, published, rel=0.01, units=1.0):
    """True when `ours` is within 1% of a published figure, or, when the publisher rounds more
    coarsely than 1% ("3.3B", "37B", "1T"), within `units` of the last digit it publishes."""
    return abs(ours - published) <= max(rel * published, units * published_unit(published))


def published_comparison(name):
    """(our total, published total, our active under the publisher's convention, published active)."""
    c = count_parameters(load_model_config(name))
    pub = load_model_config("published")[name]
    active = c["active"] - sum(c["active_components"].get(k, 0) for k in PUBLISHED_ACTIVE_EXCLUDES.get(name, ()))
    return c["total"], pub["published_total"], active, pub["published_active"]
