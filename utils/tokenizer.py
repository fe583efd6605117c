"""The GPT-2 byte-pair-encoding tokenizer, built offline from a ranks file in this repo.

`tiktoken.get_encoding("gpt2")` downloads its vocabulary on first use. The course must work
without network, so we ship the same ranks (`assets/gpt2.tiktoken`, 50,256 byte sequences and
their merge ranks, MIT licence, from the `openai-whisper==20250625` sdist) and check their
SHA-256 against the hash tiktoken itself expects for `r50k_base` (the GPT-2 ranks).
"""
import base64
import functools
import hashlib
import pathlib

import tiktoken

RANKS_PATH = pathlib.Path(__file__).with_name("assets") / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256

# GPT-2's pre-tokenizer: text is first cut into words, numbers, punctuation runs and spaces;
# BPE merges then happen only inside each piece. (Regex as published with GPT-2 / tiktoken.)
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


def load_ranks(path=RANKS_PATH, expected_sha256=RANKS_SHA256):
    """Read a `.tiktoken` file (one `base64(token_bytes) rank` per line) into {bytes: rank}."""
    data = pathlib.Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise ValueError(f"{path}: sha256 {digest} does not match the GPT-2 ranks ({expected_sha256})")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The GPT-2 tokenizer as a `tiktoken.Encoding` (n_vocab 50257, <|endoftext|> = 50256).

    Allow the special token when encoding with `enc.encode(text, allowed_special={END_OF_TEXT})`.
    """
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=load_ranks(),
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
        explicit_n_vocab=50257,
    )
