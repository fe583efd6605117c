"""The shipped long-trained models (utils/pretrained.py): they load offline, match what they record,
beat what notebook 05 trains in 120 steps, and write samples without replacement characters."""
import pytest
import torch

import utils.pretrained as pretrained
from utils.data import CompactVocab
from utils.experiments import load_sweep
from utils.generation import generate
from utils.moe_gpt import MoEGPTModel
from utils.pretrained import NAMES, load_pretrained, pretrained_config, pretrained_info
from utils.runs import CourseData, per_seed
from utils.tokenizer import get_tokenizer
from utils.train import evaluate


@pytest.fixture(scope="module")
def data():
    return CourseData()


@pytest.fixture(scope="module")
def val_losses(data):
    return {name: evaluate(load_pretrained(name)[0], data.val_loader()) for name in NAMES}


def test_the_shipped_files_are_small_and_hold_05s_configs(data):
    sizes = [pretrained.pretrained_path(name).stat().st_size for name in NAMES]
    assert sum(sizes) <= 40 * 2**20
    for name in NAMES:
        model, vocab = load_pretrained(name)
        assert model.cfg == MoEGPTModel(pretrained_config(name, len(data.vocab))).cfg   # with its defaults
        assert torch.equal(vocab.gpt2_ids, data.vocab.gpt2_ids) and vocab.rare_id == data.vocab.rare_id
        assert not model.training


def test_validation_losses_are_what_the_files_record_and_the_moe_is_ahead(val_losses):
    for name, loss in val_losses.items():
        recorded = pretrained_info(name)["history"]["val_loss"][-1]
        assert abs(loss - recorded) < 1e-3          # another CPU's rounding moves it by far less
    assert val_losses["moe"] < val_losses["dense"] - 0.02
    # at least 1 nat below what notebook 05's MoE reaches in 120 steps, on every seed of its sweep
    assert val_losses["moe"] < min(per_seed(load_sweep("05"), "MoE")) - 1.0


@pytest.mark.parametrize("name", NAMES)
def test_samples_are_legible_text_and_follow_their_prompt(name):
    model, vocab = load_pretrained(name)
    tokenizer = get_tokenizer()
    texts = []
    for prompt in ("HAMLET.\n", 'The "while" statement\n'):
        ids = vocab.encode(torch.tensor([tokenizer.encode(prompt)]))
        out = generate(model, ids, 60, temperature=0.8, top_k=40, suppress_ids=[vocab.rare_id],
                       generator=torch.Generator().manual_seed(0))
        texts.append(tokenizer.decode(vocab.decode(out[0, ids.shape[1]:]).tolist()))
    assert texts[0] != texts[1]
    assert all(text.count("\ufffd") < 0.02 * len(text) for text in texts)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="name must be one of"):
        load_pretrained("moe-large")
    with pytest.raises(ValueError, match="gpt2_ids"):
        CompactVocab.from_gpt2_ids(torch.tensor([5, 3]), has_rare_id=True)


def test_retraining_writes_a_file_that_loads_back(tmp_path, monkeypatch):
    """`python -m utils.pretrained` end to end, for 3 steps, into a temporary folder."""
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path)
    monkeypatch.setitem(pretrained.TRAINING, "steps", 3)
    monkeypatch.setitem(pretrained.TRAINING, "eval_every", 3)
    pretrained.main(["dense"])
    model, vocab = load_pretrained("dense")
    info = pretrained_info("dense")
    assert info["training"]["steps"] == 3 and info["history"]["step"] == [0, 3]
    assert len(vocab) == model.cfg["vocab_size"]
