"""One training run of notebooks 05-07, reproducible from its seed, and the numbers kept from it.

Seeds. Every training notebook reads its seed with `course_seed()`, from the environment variable
COURSE_SEED (default 0). One seed fixes a run's initial weights, its batch order and its dropout
masks. All runs compared within a notebook use the same seed, so they start from the same random
state and see the same batches: their difference is a *paired* comparison.

Evaluation protocol (the same in notebooks 04-07): the whole validation split, both domains,
unshuffled, every batch; per-domain losses on each domain's part of that split.

What is here: the data the runs train on (CourseData), a run (train_run) and its continuation
(continue_run), evaluation at a given expert capacity, what a sweep keeps of a run (run_summary),
and the statistics over seeds the notebooks print (per_seed, paired_differences, summarize,
describe). Which runs each notebook trains, and the sweeps over seeds, are in utils/experiments.py.
"""
import itertools
import os
import statistics

import torch

from .config import check_number
from .data import DOMAINS, create_dataloader, load_compact_splits, load_token_splits
from .moe import moe_layers
from .moe_gpt import LoadRecorder, MoEGPTModel, update_expert_biases
from .tokenizer import get_tokenizer
from .train import evaluate, train


def course_seed(default=0):
    """The seed of this run: the integer in the environment variable COURSE_SEED, else `default`."""
    value = os.environ.get("COURSE_SEED", "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"COURSE_SEED must be an integer, got {value!r}") from None


class CourseData:
    """The corpus as notebooks 05-07 train on it: a compact vocabulary of `max_vocab` ids (the
    most frequent tokens plus one "rare" id), the train/validation split, and loaders.

    val_ids: the whole validation split (both domains); val_ids_by_domain: {domain: its part}.
    """

    def __init__(self, max_vocab=4096, batch_size=8, context_length=128, tokenizer=None):
        tokenizer = tokenizer or get_tokenizer()
        self.vocab, self.train_ids, self.val_ids = load_compact_splits(tokenizer, max_vocab=max_vocab)
        self.val_ids_by_domain = {d: self.vocab.encode(load_token_splits(tokenizer, domain=d)[1]) for d in DOMAINS}
        self.batch_size, self.context_length = batch_size, context_length

    def train_loader(self, seed):
        """Shuffled training windows; `seed` fixes the order."""
        return create_dataloader(self.train_ids, self.batch_size, self.context_length, seed=seed)

    def val_loader(self, domain=None):
        """Every validation window, in order: of both domains, or of one."""
        ids = self.val_ids if domain is None else self.val_ids_by_domain[domain]
        return create_dataloader(ids, self.batch_size, self.context_length, shuffle=False, drop_last=False)


def train_run(cfg, data, seed, steps, *, eval_every, peak_lr=3e-3, device=None, prepare=None):
    """Build MoEGPTModel(cfg) (dense when num_experts is 0) with `seed`, train it on `data` with
    batches in `seed`'s order for `steps` steps, evaluating every `eval_every`
    (utils.experiments.EXPERIMENTS holds each notebook's values), and return
    (model, history, recorder). `prepare(model)`, if given, runs before training.

    history is utils.train.train's, plus "domain_val_loss": {domain: final loss}. recorder is a
    LoadRecorder of every step's expert load (None for a dense model). Auxiliary-loss-free bias
    updates run after every step (they do nothing unless cfg sets bias_update_rate).
    """
    torch.manual_seed(seed)
    model = MoEGPTModel(cfg)
    if prepare is not None:
        prepare(model)
    return _train_on(model, data, seed, steps, 0, eval_every, peak_lr, device)


def continue_run(model, data, seed, steps, *, after, eval_every, peak_lr=3e-3, device=None):
    """Train an already trained `model` (in place) for `steps` more steps, on the batches of
    `seed`'s order that follow the first `after` (those a train_run of `after` steps has not seen),
    with a fresh AdamW and the same warmup + cosine schedule as train_run, now over `steps` steps.
    Returns (model, history, recorder) as train_run does; history["step"] counts from `after`, while
    history["tokens_seen"] and the recorder count this continuation only.
    """
    model, history, recorder = _train_on(model, data, seed, steps, after, eval_every, peak_lr, device)
    history["step"] = [after + step for step in history["step"]]
    return model, history, recorder


def _train_on(model, data, seed, steps, skip, eval_every, peak_lr, device):
    recorder = LoadRecorder() if moe_layers(model) else None

    def after_step(m, step):
        update_expert_biases(m)
        recorder(m, step)

    # every epoch in the loader's order, repeated; the first `skip` batches left out
    batches = itertools.islice(itertools.chain.from_iterable(itertools.repeat(data.train_loader(seed))), skip, None)
    history = train(model, batches, data.val_loader(), max_steps=steps, peak_lr=peak_lr,
                    eval_every=eval_every, device=device, seed=seed, verbose=False,
                    after_step=after_step if recorder else None)
    history["domain_val_loss"] = {d: evaluate(model, data.val_loader(d)) for d in DOMAINS}
    return model, history, recorder


@torch.no_grad()
def evaluate_at_capacity(model, loader, capacity_factor):
    """(mean loss per token, mean share of dropped assignments) of an MoE model evaluated with every
    MoE layer's capacity_factor set to `capacity_factor` (None: dropless). Both are weighted by
    tokens: a partial last batch counts for the tokens it has. The model is left as it was, even
    if evaluation raises.

    The loss is utils.train.evaluate's; a forward hook on the model notes, after each batch, the
    layers' mean dropped share and the batch's token count (its input has the targets' shape).
    """
    if capacity_factor is not None:                  # the rule of a config's capacity_factor
        check_number({"capacity_factor": capacity_factor}, "capacity_factor", 0, strict=True)
    layers = moe_layers(model)
    saved = [layer.capacity_factor for layer in layers]
    drops = []      # (mean dropped share over the layers, tokens) per batch

    def note_drops(module, args, output):
        drops.append((statistics.fmean(layer.last_routing["dropped_fraction"] for layer in layers), args[0].numel()))

    hook = model.register_forward_hook(note_drops)
    try:
        for layer in layers:
            layer.capacity_factor = capacity_factor
        loss = evaluate(model, loader)
    finally:
        hook.remove()
        for layer, c in zip(layers, saved):
            layer.capacity_factor = c
    dropped, tokens = 0.0, 0
    for share, n in drops:
        dropped += share * n
        tokens += n
    return loss, dropped / tokens


def late_imbalance(recorder, last_steps=50):
    """Worst layer's max/mean expert load, from the loads summed over the last `last_steps` steps."""
    loads = recorder.loads()[-last_steps:].sum(0).float()                 # (layers, E)
    return (loads.max(-1).values / loads.mean(-1)).max().item()


SWEEP_CAPACITIES = (0.5, 1.0, None)


def run_summary(model, history, recorder, data, capacity_eval=False):
    """What a sweep keeps of one run. With capacity_eval, for MoE models also the validation loss
    evaluated at capacity factors 0.5, 1.0 and dropless ("none"), whatever capacity they trained with."""
    summary = {"step": history["step"], "val_loss": history["val_loss"],
               "final_val_loss": history["val_loss"][-1], "domain_val_loss": history["domain_val_loss"],
               "late_imbalance": late_imbalance(recorder) if recorder is not None else None,
               "seconds": history["seconds"]}
    if recorder is not None and capacity_eval:
        summary["val_loss_at_capacity"] = {str(c).lower(): evaluate_at_capacity(model, data.val_loader(), c)[0]
                                           for c in SWEEP_CAPACITIES}
    return summary


# Statistics over seeds. A sweep (utils.experiments.seed_sweep) is a dict with "seeds" and
# "runs": {run name: {str(seed): run_summary}}.

def per_seed(sweep, run, key="final_val_loss"):
    """[value of `key` for each seed of the sweep] for one run."""
    return [sweep["runs"][run][str(s)][key] for s in sweep["seeds"]]


def paired_differences(sweep, run, baseline, key="final_val_loss"):
    """[run minus baseline] per seed: the spread that matters when two runs share seeds."""
    return [a - b for a, b in zip(per_seed(sweep, run, key), per_seed(sweep, baseline, key))]


def summarize(values):
    """{"mean", "sd", "min", "max", "n"} of a list of numbers (sd: sample standard deviation)."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


ORDERING_MARGIN = 0.02   # nats: the smallest paired gap the course calls an ordering


def ordering(differences, margin=ORDERING_MARGIN):
    """The course's rule for "A is lower than B", from the paired differences A - B over seeds:
    "lower" or "higher" only when every seed agrees on the sign AND the smallest difference is at
    least `margin` in size; otherwise "indistinguishable" (at this scale the two are not ordered).
    Two runs 0.01 apart on every seed may swap on the next seed, or on another machine's rounding.
    Needs at least 2 seeds.
    """
    differences = list(differences)
    if len(differences) < 2:
        raise ValueError(f"an ordering needs the differences of at least 2 seeds, got {len(differences)}")
    if max(differences) <= -margin:
        return "lower"
    if min(differences) >= margin:
        return "higher"
    return "indistinguishable"


def describe(values, unit=""):
    """'mean +0.123 (sd 0.012, from +0.100 to +0.140, 8 seeds)' for a list of differences."""
    s = summarize(values)
    return (f"mean {s['mean']:+.3f}{unit} (sd {s['sd']:.3f}, from {s['min']:+.3f} to {s['max']:+.3f}, "
            f"{s['n']} seeds)")
