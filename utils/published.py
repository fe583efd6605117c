"""Real models as their publishers describe them: the config.json files shipped in
utils/assets/model_configs, the parameter counts and weight formats publishers give, and how to
compare our counts with theirs (each publisher leaves out different parts, and rounds)."""
import json
import math
import numbers
import pathlib

MODEL_CONFIGS = pathlib.Path(__file__).with_name("assets") / "model_configs"

# What publishers leave out when they quote "active" parameters. The gpt-oss model card counts the
# output head, not the input embedding. DeepSeek-V3 says "37B activated" (README.md), and in
# README_WEIGHTS.md the sentence DEEPSEEK_V3_WEIGHTS_QUOTE, which a direct count does not reproduce:
# counting both 0.9B matrices gives one matrix more than its 36.7B; leaving the input embedding out
# comes within 0.1B of it and rounds to the headline 37B, so that is the convention used for
# DeepSeek-V3 too (tests/test_params_hf.py checks both). NVIDIA's Nemotron 3 Nano card gives active
# "without embeddings" (3.2B) and with them (3.6B): without the input embedding, the head kept, is the
# count that gives 3.2B. Qwen3-Next's card gives "80B total, 3B activated" next to "79B non-embedding":
# its 3B leaves out the input embedding and the output head (3.25B rounds to 3B; with them it is
# 3.87B, which only cutting off would turn into 3B, and the card rounds its 79.7B total to 80B). The
# others are compared counting both, as the course does; for several of them (Kimi K2 among them)
# another convention fits the published figure too (as_published; notebook 08's table marks them).
PUBLISHED_ACTIVE_EXCLUDES = {"deepseek-v3": ("embedding",), "gpt-oss-20b": ("embedding",), "gpt-oss-120b": ("embedding",),
                             "nemotron-3-nano-30b-a3b": ("embedding",), "qwen3-next-80b-a3b": ("embedding", "lm_head")}
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
    (trailing zeros are read as rounding: "80B" -> 10B, looser than 1% only where 1% holds anyway).
    `published` must be a positive whole number of parameters (3.3e9, not 3.3)."""
    if not (isinstance(published, numbers.Real) and math.isfinite(published) and published >= 1
            and published == round(published)):
        raise ValueError(f"a published figure must be a positive whole number of parameters, got {published!r}")
    written = str(round(published))
    return 10 ** (len(written) - len(written.rstrip("0")))


def as_published(ours, published):
    """How a published figure, written to its last digit u (published_unit), can come from our count:
    "rounded" (ours within u/2 of it), "cut off" (ours with the digits after u dropped: published <=
    ours < published + u), "either" (both fit, so the figure cannot tell which), or None (neither).
    `ours` must be a finite, non-negative count; `published` as for published_unit."""
    u = published_unit(published)
    if not (isinstance(ours, numbers.Real) and math.isfinite(ours) and ours >= 0):
        raise ValueError(f"our count must be a finite, non-negative number, got {ours!r}")
    rounded, cut_off = abs(ours - published) <= u / 2, published <= ours < published + u
    return "either" if rounded and cut_off else "rounded" if rounded else "cut off" if cut_off else None
