import hashlib
import inspect
import shutil

import pytest
import tiktoken
import tiktoken_ext.openai_public

from utils.data import load_corpus
from utils.tokenizer import END_OF_TEXT, RANKS_PATH, RANKS_SHA256, get_tokenizer, load_ranks

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
SAMPLES = [
    "Hello, world!",
    "To be, or not to be: that is the question.",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "for i in range(10):\n    print(i ** 2)  # squares",
    "Unicode: naïve café, 東京, emoji 🚀, Ελληνικά",
    "numbers 1234567 3.14159 -42 and contractions: don't, we'll, they've, I'm",
]


def test_known_ids():
    enc = get_tokenizer()
    assert enc.encode("Hello, world!") == [15496, 11, 995, 0]
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.encode(END_OF_TEXT, allowed_special={END_OF_TEXT}) == [50256]


def test_ranks_hash_is_tiktokens_own_r50k_hash():
    # The hash we verify is the one tiktoken itself expects for the GPT-2 (r50k_base) ranks.
    assert RANKS_SHA256 in inspect.getsource(tiktoken_ext.openai_public.r50k_base)
    assert hashlib.sha256(RANKS_PATH.read_bytes()).hexdigest() == RANKS_SHA256


def test_same_ids_as_tiktokens_own_gpt2_encoding(tmp_path, monkeypatch):
    # Let tiktoken build its own r50k_base (= GPT-2) encoding from our file, offline, by placing the
    # file in its cache under the name it would download to; tiktoken checks the hash itself.
    cache_name = hashlib.sha1(R50K_URL.encode()).hexdigest()
    shutil.copy(RANKS_PATH, tmp_path / cache_name)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    reference = tiktoken.get_encoding("r50k_base")
    ours = get_tokenizer()
    corpus_text = "".join(d["text"][:3000] for d in load_corpus())
    for text in SAMPLES + [corpus_text]:
        assert ours.encode(text) == reference.encode(text)
    assert ours.encode(END_OF_TEXT, allowed_special="all") == reference.encode(END_OF_TEXT, allowed_special="all")
    assert ours.n_vocab == reference.n_vocab


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(text):
    enc = get_tokenizer()
    assert enc.decode(enc.encode(text)) == text


def test_wrong_hash_is_rejected(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(RANKS_PATH.read_bytes() + b"\n")
    with pytest.raises(ValueError, match="sha256"):
        load_ranks(bad)
