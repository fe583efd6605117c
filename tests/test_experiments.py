import math

import pytest
import torch

from utils.data import DOMAINS, create_dataloader
from utils.experiments import (EXPERIMENTS, base_config, continued_runs, experiment_runs, load_sweep,
                               match_output_scale, merge_sweeps, start_continued, sweep_run_names)
from utils.moe_gpt import MoEGPTModel
from utils.moe import make_moe, moe_layers
from utils.routing_analysis import expert_shares, route_tokens, token_matched_shares, tv_distance
from utils.runs import (continue_run, course_seed, describe, evaluate_at_capacity, paired_differences, per_seed,
                        summarize, train_run)


def test_course_seed_reads_the_environment(monkeypatch):
    monkeypatch.delenv("COURSE_SEED", raising=False)
    assert course_seed() == 0 and course_seed(default=5) == 5
    monkeypatch.setenv("COURSE_SEED", " 17 ")
    assert course_seed() == 17
    monkeypatch.setenv("COURSE_SEED", "seven")
    with pytest.raises(ValueError, match="COURSE_SEED"):
        course_seed()


def fake_sweep(notebook, values, seeds):
    """A sweep dict with final_val_loss values[run][i] for seeds[i]."""
    return {"notebook": notebook, "seeds": seeds,
            "runs": {run: {str(s): {"final_val_loss": v} for s, v in zip(seeds, vals)} for run, vals in values.items()}}


def test_paired_differences_and_summaries():
    sweep = fake_sweep("05", {"dense": [5.0, 5.2, 5.1], "MoE": [4.8, 5.1, 4.8]}, [0, 1, 2])
    assert per_seed(sweep, "MoE") == [4.8, 5.1, 4.8]
    diffs = paired_differences(sweep, "MoE", "dense")
    assert diffs == pytest.approx([-0.2, -0.1, -0.3])
    s = summarize(diffs)
    assert s["mean"] == pytest.approx(-0.2) and s["sd"] == pytest.approx(0.1)
    assert (s["min"], s["max"], s["n"]) == (pytest.approx(-0.3), pytest.approx(-0.1), 3)
    assert describe(diffs) == "mean -0.200 (sd 0.100, from -0.300 to -0.100, 3 seeds)"


def test_merge_sweeps_orders_runs_and_seeds():
    runs = list(experiment_runs("05", 100))
    parts = [fake_sweep("05", {runs[1]: [1.0]}, [3]), fake_sweep("05", {runs[0]: [2.0]}, [3]),
             fake_sweep("05", {runs[0]: [3.0]}, [1]), fake_sweep("05", {runs[1]: [4.0]}, [1])]
    merged = merge_sweeps(parts)
    assert merged["seeds"] == [1, 3]
    assert list(merged["runs"]) == runs[:2]
    assert list(merged["runs"][runs[0]]) == ["1", "3"]
    assert per_seed(merged, runs[0]) == [3.0, 2.0] and per_seed(merged, runs[1]) == [4.0, 1.0]


@pytest.mark.parametrize("key", ["steps", "eval_every", "notebook"])
def test_merge_sweeps_refuses_parts_of_different_experiments(key):
    runs = list(experiment_runs("05", 100))
    a = {**fake_sweep("05", {runs[0]: [1.0]}, [0]), "steps": 120, "eval_every": 40}
    b = {**fake_sweep("05", {runs[0]: [2.0]}, [1]), "steps": 120, "eval_every": 40}
    assert merge_sweeps([a, b])["seeds"] == [0, 1]
    b[key] = {"steps": 200, "eval_every": 50, "notebook": "06"}[key]
    with pytest.raises(ValueError, match=key):
        merge_sweeps([a, b])


@pytest.mark.parametrize("notebook", sorted(EXPERIMENTS))
def test_experiment_configs_build(notebook):
    runs = experiment_runs(notebook, 4096)
    for name, (cfg, prepare) in runs.items():
        with torch.device("meta"):
            MoEGPTModel(cfg)
        assert prepare is None or callable(prepare)
    with pytest.raises(ValueError, match="notebook"):
        experiment_runs("99", 4096)


def test_stored_sweeps_are_complete():
    """The notebooks' claims rest on these files: every run of every notebook, 5 seeds or more."""
    for notebook in EXPERIMENTS:
        sweep = load_sweep(notebook)
        assert len(sweep["seeds"]) >= 5
        assert list(sweep["runs"]) == sweep_run_names(notebook, 4096)
        steps, every = EXPERIMENTS[notebook]["steps"], EXPERIMENTS[notebook]["eval_every"]
        assert (sweep["steps"], sweep["eval_every"]) == (steps, every)      # the notebooks' current runs
        continued = continued_runs(notebook, 4096)
        for run, by_seed in sweep["runs"].items():
            assert sorted(map(int, by_seed)) == sorted(sweep["seeds"]), run
            for summary in by_seed.values():
                assert math.isfinite(summary["final_val_loss"]) and set(summary["domain_val_loss"]) == set(DOMAINS)
                assert summary["val_loss"][-1] == summary["final_val_loss"]
                if run in continued:
                    assert summary["step"] == [steps, steps + EXPERIMENTS[notebook]["continue_steps"]]
                else:
                    assert summary["step"] == sorted({*range(0, steps, every), steps})


def test_match_output_scale_matches_the_reference_layer():
    base = base_config(64)
    standard = {**base, "num_experts": 4, "num_experts_per_tok": 1, "moe_hidden_dim": 64, "expert_type": "relu2"}
    latent = {**standard, "latent_dim": 32, "num_experts": 16, "num_experts_per_tok": 4}
    torch.manual_seed(0)
    model = MoEGPTModel(latent)
    factors = match_output_scale(model, standard)
    assert len(factors) == base["n_layers"] and all(f > 1.5 for f in factors)   # latent starts smaller
    x = torch.randn(1, 2048, base["emb_dim"], generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        target = make_moe(standard)(x).pow(2).mean().sqrt().item()
        for layer in moe_layers(model):
            assert layer(x).pow(2).mean().sqrt().item() == pytest.approx(target, rel=1e-4)
    rng_before = torch.random.get_rng_state()
    match_output_scale(model, standard)
    assert torch.equal(torch.random.get_rng_state(), rng_before)   # the training run's randomness is untouched


class TinyData:
    """The interface train_run needs, on a periodic token stream (fast)."""

    def __init__(self):
        ids = torch.arange(3000) % 29
        self.train_ids, self.val_ids_by_domain = ids, {d: ids[:300] for d in DOMAINS}

    def train_loader(self, seed):
        return create_dataloader(self.train_ids, 4, 16, seed=seed)

    def val_loader(self, domain=None):
        return create_dataloader(self.train_ids[:300] if domain is None else self.val_ids_by_domain[domain], 4, 16,
                                 shuffle=False, drop_last=False)


TINY_MOE = {"vocab_size": 29, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "num_experts": 4,
            "num_experts_per_tok": 2, "moe_hidden_dim": 32}


def test_train_run_is_a_function_of_the_seed():
    data = TinyData()
    _, a, rec_a = train_run(TINY_MOE, data, seed=1, steps=6, eval_every=3, device="cpu")
    _, b, _ = train_run(TINY_MOE, data, seed=1, steps=6, eval_every=3, device="cpu")
    _, c, _ = train_run(TINY_MOE, data, seed=2, steps=6, eval_every=3, device="cpu")
    assert a["val_loss"] == b["val_loss"] and a["val_loss"] != c["val_loss"]
    assert set(a["domain_val_loss"]) == set(DOMAINS) and len(rec_a.history) == 6


class RecordingData(TinyData):
    """TinyData whose training batches can be told apart: each batch's first token is its index."""

    def train_loader(self, seed):
        windows = torch.arange(40)[:, None].repeat(1, 17) % 29          # 40 windows, window i filled with i
        return [(windows[i:i + 2, :-1], windows[i:i + 2, 1:]) for i in range(0, 40, 2)]


def test_continue_run_trains_on_the_batches_after_the_first_ones(monkeypatch):
    import utils.runs as runs_module
    seen = []
    real_train = runs_module.train

    def spy(model, loader, *args, **kwargs):
        batches = iter(loader)
        recorded = (seen.append(batch[0][0, 0].item()) or batch for batch in batches)
        return real_train(model, type("L", (), {"__iter__": lambda self: recorded})(), *args, **kwargs)

    monkeypatch.setattr(runs_module, "train", spy)
    data = RecordingData()
    model, _, _ = train_run(TINY_MOE, data, seed=0, steps=3, eval_every=3, device="cpu")
    _, history, recorder = continue_run(model, data, seed=0, steps=4, after=3, eval_every=2, device="cpu")
    assert seen == [0, 2, 4] + [6, 8, 10, 12]          # the first batch of each step: none seen twice
    assert history["step"] == [3, 5, 7] and len(recorder.history) == 4


def test_continued_arms_start_from_their_parents():
    names = sweep_run_names("05", 100)
    continued = continued_runs("05", 100)
    assert names[:4] == list(experiment_runs("05", 100)) and names[4:] == list(continued)
    assert {parent for parent, _ in continued.values()} <= set(experiment_runs("05", 100))
    assert continued_runs("06", 100) == {}
    torch.manual_seed(0)
    dense_cfg = {k: v for k, v in TINY_MOE.items() if k not in ("num_experts", "num_experts_per_tok", "moe_hidden_dim")}
    dense_cfg["ffn_hidden_dim"] = 32
    dense = MoEGPTModel(dense_cfg)
    upcycled = start_continued(dense, TINY_MOE, seed=3)
    again = start_continued(dense, TINY_MOE, seed=3)
    assert len(moe_layers(upcycled)) == 2
    assert all(torch.equal(a, b) for a, b in zip(upcycled.state_dict().values(), again.state_dict().values()))
    copied = start_continued(dense, dense_cfg, seed=3)
    assert copied is not dense and all(torch.equal(a, b) for a, b in zip(copied.parameters(), dense.parameters()))
    with pytest.raises(ValueError, match="parent's own config"):
        start_continued(dense, {**dense_cfg, "ffn_hidden_dim": 64}, seed=3)


def test_evaluate_at_capacity_restores_the_model():
    data = TinyData()
    torch.manual_seed(0)
    model = MoEGPTModel({**TINY_MOE, "capacity_factor": 1.0}).train()
    loss, dropped = evaluate_at_capacity(model, data.val_loader(), 0.25)
    assert dropped > 0.3 and math.isfinite(loss)
    assert evaluate_at_capacity(model, data.val_loader(), None)[1] == 0.0
    assert all(layer.capacity_factor == 1.0 for layer in moe_layers(model)) and model.training


def test_route_tokens_and_shares():
    torch.manual_seed(0)
    model = MoEGPTModel(TINY_MOE)
    ids = torch.arange(100) % 29
    tokens, chosen = route_tokens(model, ids, 16)
    assert tokens.shape == (96,) and chosen.shape == (2, 96, 2)       # 6 full windows, 2 layers, top-2
    assert torch.equal(tokens, ids[:96])
    shares = expert_shares(chosen, 4)
    assert shares.shape == (2, 4) and torch.allclose(shares.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="no MoE layers"):
        route_tokens(MoEGPTModel({**TINY_MOE, "num_experts": 0}), ids, 16)


def test_token_matching_removes_routing_by_token_identity():
    # Routing that depends on the token only: token t always goes to expert t % 4.
    a = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])
    b = torch.tensor([0, 1, 1, 1, 2, 3, 3, 3])
    route = lambda t: (t % 4)[None, :, None]                            # (1 layer, N, k = 1)
    plain = tv_distance(expert_shares(route(a), 4), expert_shares(route(b), 4))
    matched = tv_distance(*token_matched_shares(a, route(a), b, route(b), 4, 4))
    assert plain.item() > 0.2 and matched.item() == pytest.approx(0.0)
    # The same tokens routed differently in b (context): matching keeps that difference.
    other = lambda t: (t % 4 + 4)[None, :, None]                        # experts 4-7 instead of 0-3
    assert tv_distance(*token_matched_shares(a, route(a), b, other(b), 4, 8)).item() == pytest.approx(1.0)
    # Token types seen in only one stream do not count: token 5 is only in a.
    a5, b5 = torch.cat([a, torch.tensor([5, 5])]), b
    matched5 = token_matched_shares(a5, (a5 % 4)[None, :, None], b5, route(b5), 6, 4)
    assert tv_distance(*matched5).item() == pytest.approx(0.0)
