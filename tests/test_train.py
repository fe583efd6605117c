import math

import pytest
import torch

from utils.data import create_dataloader
from utils.gpt import GPTModel
from utils.train import evaluate, get_device, lr_at, total_aux_loss, train

TINY = {"vocab_size": 50, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.1}


def test_lr_schedule():
    peak, low = 1e-3, 1e-4
    lrs = [lr_at(s, 100, peak, 10, low) for s in range(100)]
    assert lrs[0] == pytest.approx(peak / 10)
    assert max(lrs) == pytest.approx(peak) and lrs[9] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warmup
    assert lr_at(100, 100, peak, 10, low) == pytest.approx(low)
    assert lr_at(55, 100, peak, 10, low) == pytest.approx((peak + low) / 2)  # cosine midpoint


def test_get_device_is_usable():
    assert torch.zeros(1, device=get_device()).device.type in ("cuda", "mps", "cpu")


def loaders():
    ids = torch.arange(2000) % 23  # a periodic sequence: easy to learn
    return (create_dataloader(ids, 8, 16, seed=0),
            create_dataloader(ids[:400], 8, 16, shuffle=False, drop_last=False))


def run(seed=0, steps=30):
    torch.manual_seed(seed)
    model = GPTModel(TINY)
    train_loader, val_loader = loaders()
    return model, train(model, train_loader, val_loader, max_steps=steps, peak_lr=3e-3, eval_every=10,
                        device="cpu", seed=seed, verbose=False)


def test_training_learns_and_history_is_complete():
    model, h = run()
    assert h["step"] == [0, 10, 20, 30]
    assert len(h["lr"]) == 30 and len(h["val_loss"]) == 4
    assert math.isnan(h["train_loss"][0])
    assert h["val_loss"][0] > math.log(TINY["vocab_size"]) - 0.5   # untrained: about uniform
    assert h["val_loss"][-1] < 0.5 * h["val_loss"][0]
    assert h["tokens_seen"][-1] == 30 * 8 * 16
    assert evaluate(model, loaders()[1], device="cpu") == pytest.approx(h["val_loss"][-1])


def test_training_is_deterministic():
    _, a = run(seed=3, steps=10)
    _, b = run(seed=3, steps=10)
    assert a["val_loss"] == b["val_loss"] and a["train_loss"][1:] == b["train_loss"][1:]


def test_aux_loss_is_added_and_after_step_is_called():
    # The auxiliary term pulls a parameter that the language-model loss never touches towards 1:
    # it moves only if train() back-propagates the aux loss together with the LM loss.
    class WithAux(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = GPTModel(TINY)
            self.pulled = torch.nn.Parameter(torch.zeros(()))
            self.aux_loss = None

        def forward(self, idx):
            self.aux_loss = (self.pulled - 1.0) ** 2
            return self.gpt(idx)

    model = WithAux()
    assert total_aux_loss(model).item() == 0.0  # nothing stored before a forward pass
    calls = []
    h = train(model, *loaders(), max_steps=3, eval_every=3, device="cpu", verbose=False,
              after_step=lambda m, step: calls.append(step))
    assert calls == [1, 2, 3]
    assert h["aux_loss"][0] == pytest.approx(1.0)
    assert 0.0 < model.pulled.item() < 1.0 and h["aux_loss"][-1] < h["aux_loss"][0]


def run_or_fail_after(seconds, fn):
    """fn(), failing the test instead of hanging if it has not returned within `seconds` (where the
    platform has SIGALRM; elsewhere, e.g. on Windows, fn() just runs)."""
    import signal

    if not hasattr(signal, "SIGALRM"):
        return fn()

    def hung(signum, frame):
        raise AssertionError(f"did not return within {seconds} s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_loader_without_batches_raises_instead_of_hanging():
    ids = torch.arange(2000) % 23
    val = loaders()[1]
    too_short = create_dataloader(ids[:50], batch_size=8, context_length=16)   # 2 windows, drop_last
    with pytest.raises(ValueError, match="train_loader produced no batches"):
        run_or_fail_after(30, lambda: train(GPTModel(TINY), too_short, val, max_steps=2, device="cpu", verbose=False))
    one_shot = iter(list(create_dataloader(ids, 8, 16))[:2])                 # 2 batches for 5 steps
    with pytest.raises(ValueError, match="one-shot iterator"):
        run_or_fail_after(30, lambda: train(GPTModel(TINY), one_shot, val, max_steps=5, device="cpu", verbose=False))
    with pytest.raises(ValueError, match="validation loader produced no batches"):
        evaluate(GPTModel(TINY), too_short)


def test_evaluate_is_the_mean_over_tokens_not_over_batches():
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    ids = torch.arange(200) % 23
    loader = create_dataloader(ids, 5, 16, shuffle=False, drop_last=False)  # 12 windows: 5 + 5 + 2
    assert [len(x) for x, _ in loader] == [5, 5, 2]
    x = torch.cat([x for x, _ in loader])
    y = torch.cat([y for _, y in loader])
    with torch.no_grad():
        every_token = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert evaluate(model, loader) == pytest.approx(every_token, abs=1e-5)


def test_tied_weights_are_optimised_once():
    from utils.modern import ModernMoEModel
    from utils.train import parameter_groups

    cfg = {"vocab_size": 50, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 1,
           "num_experts": 4, "num_experts_per_tok": 2, "moe_hidden_dim": 16, "tie_embeddings": True}
    torch.manual_seed(0)
    model = ModernMoEModel(cfg)
    assert model.out_head.weight is model.tok_emb.weight
    grouped = [p for group in parameter_groups(model, 0.1) for p in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.0), lr=0.01)
    before = model.tok_emb.weight.detach().clone()
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    optimizer.step()
    assert optimizer.state[model.tok_emb.weight]["step"] == 1
    # Adam's first step moves every weight with a gradient by lr (0.01), not twice that.
    assert (model.tok_emb.weight - before).abs().max().item() == pytest.approx(0.01, rel=1e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_steps"):
        train(GPTModel(TINY), *loaders(), max_steps=0)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="eval_every must be a positive integer"):
            train(GPTModel(TINY), *loaders(), max_steps=3, eval_every=bad)


def test_parameter_groups_decay_weight_matrices_only():
    from utils.experts import Experts
    from utils.moe import moe_layers
    from utils.moe_gpt import MoEGPTModel
    from utils.train import parameter_groups

    cfg = {**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_hidden_dim": 24, "expert_type": "gelu",
           "num_shared_experts": 1, "shared_expert_gate": True}
    model = MoEGPTModel(cfg)
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    ids = lambda params: {id(p) for p in params}
    decayed, not_decayed = ids(decay["params"]), ids(no_decay["params"])
    assert not decayed & not_decayed and decayed | not_decayed == ids(model.parameters())

    moe = moe_layers(model)[0]
    # Stacked expert biases are 2-D (E, H) but are biases: not decayed. So are the norms' parameters.
    biases = [moe.experts.b_in, moe.experts.b_out, moe.shared_expert.b_in, moe.shared_expert.b_out]
    assert all(b.dim() == 2 for b in biases)
    norms = [model.final_norm.scale, model.final_norm.shift, model.trf_blocks[0].norm1.scale]
    assert ids(biases + norms) <= not_decayed
    # Weight matrices: every Linear and Embedding weight, and the stacked expert matrices.
    linear = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    assert ids([moe.router.gate.weight, moe.shared_expert_gate.weight]) <= ids(linear)
    stacked = [e.w_in for e in model.modules() if isinstance(e, Experts)] + \
              [e.w_out for e in model.modules() if isinstance(e, Experts)]
    assert ids(linear + stacked) <= decayed
    assert ids(model.parameters()) - ids(linear + stacked) == not_decayed   # nothing else is decayed

    swiglu = MoEGPTModel({**cfg, "expert_type": "swiglu"})
    gate = moe_layers(swiglu)[0].experts.w_gate
    assert id(gate) in ids(parameter_groups(swiglu, 0.1)[0]["params"])


def test_evaluation_restores_the_model_when_it_raises():
    from utils.runs import evaluate_at_capacity
    from utils.moe import moe_layers
    from utils.moe_gpt import MoEGPTModel

    cfg = {**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_hidden_dim": 16, "capacity_factor": 2.0}
    torch.manual_seed(0)
    model = MoEGPTModel(cfg).train()
    good = [(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))]
    bad = good + [(torch.full((2, 8), 500), torch.zeros(2, 8, dtype=torch.long))]    # 500: not in the vocabulary
    with pytest.raises(IndexError):
        evaluate(model, bad)
    assert model.training
    with pytest.raises(IndexError):
        evaluate_at_capacity(model, bad, None)
    assert model.training and all(m.capacity_factor == 2.0 for m in moe_layers(model))
    with pytest.raises(ValueError, match="capacity_factor"):
        evaluate_at_capacity(model, good, -1.0)


def test_evaluate_at_capacity_weighs_loss_and_drops_by_tokens():
    from utils.runs import evaluate_at_capacity
    from utils.moe import moe_layers
    from utils.moe_gpt import MoEGPTModel

    cfg = {**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_hidden_dim": 16}
    torch.manual_seed(0)
    model = MoEGPTModel(cfg).eval()
    ids = torch.arange(200) % 23
    loader = create_dataloader(ids, 5, 16, shuffle=False, drop_last=False)       # 5 + 5 + 2 windows
    loss, dropped = evaluate_at_capacity(model, loader, 0.5)
    assert all(m.capacity_factor is None for m in moe_layers(model))           # left as it was
    x = torch.cat([x for x, _ in loader])
    y = torch.cat([y for _, y in loader])
    losses, drops = [], []
    for i in range(len(x)):                                   # one window at a time: capacity is per sequence
        for layer in moe_layers(model):
            layer.capacity_factor = 0.5
        with torch.no_grad():
            losses.append(torch.nn.functional.cross_entropy(model(x[i:i + 1]).flatten(0, 1), y[i]).item())
        drops.append(sum(m.last_routing["dropped_fraction"] for m in moe_layers(model)) / len(moe_layers(model)))
    assert loss == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert dropped == pytest.approx(sum(drops) / len(drops), abs=1e-6) and dropped > 0
