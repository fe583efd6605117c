"""A small, complete training loop: AdamW, warmup + cosine learning rate, gradient clipping,
periodic validation, and a history dict to plot.

Works for any model that maps token ids (B, T) to logits (B, T, V). Modules that add a loss term of
their own (the MoE load-balancing losses of later notebooks) expose it as `module.aux_loss`
after each forward pass; `train` adds those terms to the language-model loss.
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import is_count


def get_device():
    """The best available device: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device=None):
    """torch.device(device), or the best available one (get_device) when device is None."""
    return torch.device(device) if device is not None else get_device()


def lm_loss(logits, targets):
    """Mean next-token cross-entropy. logits: (B, T, V), targets: (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def total_aux_loss(model):
    """Sum of the `aux_loss` tensors that modules stored during the last forward pass (0 if none)."""
    terms = [m.aux_loss for m in model.modules() if getattr(m, "aux_loss", None) is not None]
    return sum(terms) if terms else torch.zeros(())


def lr_at(step, max_steps, peak_lr, warmup_steps, min_lr):
    """Linear warmup from 0 to peak_lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, loader, max_batches=None, device=None):
    """Mean language-model loss per token over (up to max_batches of) a loader, in eval mode.

    Every target token counts once: a partial last batch weighs by its tokens, not as a whole batch.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            total += lm_loss(model(x.to(device)), y.to(device)).item() * y.numel()
            tokens += y.numel()
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("the validation loader produced no batches: too few windows for one batch with "
                         "drop_last=True, or a one-shot iterator that is used up (pass a DataLoader)")
    return total / tokens


def parameter_groups(model, weight_decay):
    """AdamW parameter groups by role: weight matrices are decayed; biases, norm parameters and
    anything else are not.

    A module says which of its own parameters are weight matrices with a `decayed_parameters`
    tuple of names; nn.Linear and nn.Embedding weights always are. Deciding by role rather than by
    tensor rank matters for stacked experts, whose biases are 2-D (E, H) but are still biases.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        decayed = set(getattr(module, "decayed_parameters", ()))
        if isinstance(module, (nn.Linear, nn.Embedding)):
            decayed.add("weight")
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:      # a tied weight (one tensor, two modules) once
                seen.add(id(p))
                (decay if name in decayed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(model, grad_clip):
    """The gradient step's preparation by default: scale all gradients together so that their
    global norm is at most grad_clip (None: leave them as they are). utils/parallel.py passes its
    own preparation to train, which first averages the gradients over the ranks."""
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)


def _batches(loader):
    """Loop over the loader forever (a new shuffled epoch each time round). A loader that yields
    nothing in a whole pass raises a ValueError instead of looping forever."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("train_loader produced no batches: too few windows for one batch with "
                             "drop_last=True, or a one-shot iterator that is used up (pass a DataLoader, "
                             "or an iterator that yields at least max_steps batches)")


def train(model, train_loader, val_loader, max_steps, peak_lr=1e-3, min_lr=None, warmup_steps=None,
          weight_decay=0.1, grad_clip=1.0, eval_every=50, eval_batches=None, device=None, seed=0,
          after_step=None, prepare_gradients=clip_gradients, verbose=True):
    """Train `model` for `max_steps` optimizer steps and return a history dict.

    history["step"], ["val_loss"], ["train_loss"], ["tokens_seen"] hold one entry per evaluation
    (every `eval_every` steps, plus step 0 before training and the last step); train_loss is the
    mean LM loss since the previous evaluation. history["lr"], ["batch_loss"] (the LM loss of the
    step's batch) and ["aux_loss"] have one entry per step. With val_loader None nothing is
    evaluated (the val_loss entries are NaN).
    Two hooks: `prepare_gradients(model, grad_clip)` runs after backward and before the optimizer
    step (default: clip_gradients; expert parallelism averages gradients over ranks there), and
    `after_step(model, step)` after every optimizer step (e.g. to update router biases).
    """
    for name, value in (("max_steps", max_steps), ("eval_every", eval_every)):
        if not is_count(value) or value == 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    device = resolve_device(device)
    torch.manual_seed(seed)  # dropout masks
    model.to(device).train()
    min_lr = 0.1 * peak_lr if min_lr is None else min_lr
    warmup_steps = max(1, max_steps // 20) if warmup_steps is None else warmup_steps
    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=peak_lr, betas=(0.9, 0.95))
    history = {"step": [], "train_loss": [], "val_loss": [], "tokens_seen": [], "lr": [], "batch_loss": [], "aux_loss": []}
    tokens_seen, running, running_n = 0, 0.0, 0
    start = time.perf_counter()

    def log_eval(step):
        val = evaluate(model, val_loader, eval_batches, device) if val_loader is not None else float("nan")
        train_mean = running / running_n if running_n else float("nan")
        history["step"].append(step)
        history["val_loss"].append(val)
        history["train_loss"].append(train_mean)
        history["tokens_seen"].append(tokens_seen)
        if verbose:
            elapsed = time.perf_counter() - start
            train_text = f"{train_mean:6.3f}" if running_n else "     -"   # nothing trained yet at step 0
            print(f"step {step:5d}/{max_steps} | train {train_text} | val {val:6.3f} | "
                  f"lr {history['lr'][-1] if history['lr'] else 0:.1e} | {elapsed:6.1f}s", flush=True)

    log_eval(0)
    batches = _batches(train_loader)
    for step in range(1, max_steps + 1):
        lr = lr_at(step - 1, max_steps, peak_lr, warmup_steps, min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        loss = lm_loss(model(x), y)
        extra = total_aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        (loss + extra).backward()
        prepare_gradients(model, grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step(model, step)
        tokens_seen += x.numel()
        running += loss.item()
        running_n += 1
        history["lr"].append(lr)
        history["batch_loss"].append(loss.item())
        history["aux_loss"].append(float(extra.detach()))
        if step % eval_every == 0 or step == max_steps:
            log_eval(step)
            running, running_n = 0.0, 0
    history["seconds"] = time.perf_counter() - start
    return history
