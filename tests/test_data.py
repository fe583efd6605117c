import pytest
import torch

from utils.data import (DOMAINS, CompactVocab, SlidingWindowDataset, create_dataloader, encode_documents,
                        load_corpus, load_token_splits, split_documents)
from utils.tokenizer import END_OF_TEXT_ID, get_tokenizer


def test_corpus_has_both_domains_and_is_small():
    docs = load_corpus()
    sizes = {d: sum(len(doc["text"]) for doc in docs if doc["domain"] == d) for d in DOMAINS}
    assert all(size > 300_000 for size in sizes.values()), sizes
    assert sum(sizes.values()) < 2_000_000
    assert not any("gutenberg" in doc["text"].lower() for doc in docs)


def test_split_keeps_every_character_and_both_domains():
    docs = load_corpus()
    train, val = split_documents(docs, val_fraction=0.1)
    assert {d["domain"] for d in val} == set(DOMAINS)
    by_title = {}
    for part in train + val:
        by_title[part["title"]] = by_title.get(part["title"], "") + part["text"]
    assert by_title == {d["title"]: d["text"] for d in docs}
    val_chars = sum(len(d["text"]) for d in val)
    assert 0.08 < val_chars / sum(len(d["text"]) for d in docs) < 0.12
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, val_fraction=1.5)


def test_encode_documents_separates_with_end_of_text():
    tok = get_tokenizer()
    docs = [{"domain": "shakespeare", "title": "a", "text": "Hello"},
            {"domain": "python_docs", "title": "b", "text": " world"}]
    assert encode_documents(docs, tok).tolist() == [15496, END_OF_TEXT_ID, 995, END_OF_TEXT_ID]


def test_windows_are_shifted_by_one():
    ids = torch.arange(100)
    ds = SlidingWindowDataset(ids, context_length=8, stride=4)
    assert len(ds) == (100 - 8 - 1) // 4 + 1
    x, y = ds[3]
    assert x.tolist() == list(range(12, 20))
    assert y.tolist() == list(range(13, 21))
    x_last, y_last = ds[len(ds) - 1]                     # starts at 22 * 4 = 88; one at 92 would need token 100
    assert x_last.tolist() == list(range(88, 96)) and y_last.tolist() == list(range(89, 97))
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="context_length"):
        SlidingWindowDataset(torch.arange(5), context_length=8)


def test_dataloader_is_deterministic_with_seed():
    ids = torch.arange(1000)
    def first_batch(seed):
        return next(iter(create_dataloader(ids, batch_size=4, context_length=16, seed=seed)))[0]
    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))
    assert first_batch(0).shape == (4, 16)


def test_domain_splits():
    tok = get_tokenizer()
    train_all, val_all = load_token_splits(tok)
    parts = [load_token_splits(tok, domain=d) for d in DOMAINS]
    assert sum(len(t) for t, _ in parts) == len(train_all)
    assert sum(len(v) for _, v in parts) == len(val_all)
    with pytest.raises(ValueError, match="domain"):
        load_token_splits(tok, domain="poetry")


def test_compact_vocab_round_trip():
    ids = torch.tensor([50256, 11, 995, 11, 15496])
    vocab = CompactVocab(ids)
    assert len(vocab) == 4
    compact = vocab.encode(ids)
    assert compact.max() == 3 and compact.min() == 0
    assert torch.equal(vocab.decode(compact), ids)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode(torch.tensor([12]))


def test_capped_vocab_keeps_the_most_frequent_tokens():
    ids = torch.tensor([7, 7, 7, 3, 3, 9, 11, 50256, 50256, 50256, 50256])
    vocab = CompactVocab(ids, max_size=3)
    assert len(vocab) == 3 and vocab.rare_id == 2
    assert vocab.encode(torch.tensor([50256, 7, 3, 9, 12])).tolist() == [1, 0, 2, 2, 2]
    assert vocab.decode(torch.tensor([0, 1, 2])).tolist() == [7, 50256, CompactVocab.RARE_DECODES_TO]
    assert vocab.coverage(ids) == pytest.approx(7 / 11)
    assert len(CompactVocab(ids, max_size=100)) == 5  # larger than needed: no rare id
    with pytest.raises(ValueError, match="max_size"):
        CompactVocab(ids, max_size=1)
