"""Expert parallelism over W = 2 and 4 gloo processes equals the single-process layer: with equal,
uneven and empty per-rank batches, collapsed routing, inputs without grad, deduplicated dispatch,
expert x data-parallel groups, checkpoints saved at one W and loaded at another, and lockstep
decoding (ranks that finish at different steps, a rank with no prompts).

Starting W processes is the slow part (seconds), so each W is launched once (the `runs` fixture)
and the launched function makes every check's measurements."""
import os
import sys
import time

import pytest
import torch

from utils.generation import generate
from utils.moe import make_moe
from utils.moe_gpt import MoEGPTModel
from utils.launch import launch
from utils.parallel import COMBINE_AT, ExpertParallelMoE, load_expert_parallel, save_expert_parallel
from utils.routing_analysis import destination_ranks

BASE = {"emb_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_hidden_dim": 12, "aux_loss_coef": 0.01}
CONFIGS = {"plain": BASE,
           "shared + sigmoid + z-loss": {**BASE, "num_shared_experts": 1, "router_type": "sigmoid",
                                         "expert_type": "swiglu", "z_loss_coef": 0.001},
           "latent": {**BASE, "latent_dim": 8, "expert_type": "relu2"},
           "sequence-wise loss": {**BASE, "seq_aux_loss_coef": 0.01}}
# Uneven batches are compared with one sequence of all ranks' tokens: the same tokens in other
# sequences, which the sequence-wise loss tells apart.
UNEVEN_CONFIGS = {name: cfg for name, cfg in CONFIGS.items() if not cfg.get("seq_aux_loss_coef")}
# Deduplication saves rows when a token has several experts on one rank: top-2 and top-4.
DEDUP_CONFIGS = {"plain": BASE,
                 "top-4, shared + sigmoid + z-loss": {**CONFIGS["shared + sigmoid + z-loss"], "num_experts_per_tok": 4},
                 "top-4, latent": {**CONFIGS["latent"], "num_experts_per_tok": 4}}
EXPERT_SIZES = {2: [2, 1], 4: [4, 2, 1]}          # expert-parallel group sizes: W x 1, ..., 1 x W
SEQS_PER_RANK, T = 2, 5
CFG = {"vocab_size": 40, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
       **{k: v for k, v in BASE.items() if k != "emb_dim"}}            # a small GPT with MoE layers, to train


def layer_and_batch(cfg, world_size, seed=0):
    torch.manual_seed(seed)
    moe = make_moe(cfg)
    x = torch.randn(world_size * SEQS_PER_RANK, T, cfg["emb_dim"])
    return moe, x


def expert_parallel_steps(rank, world_size, decoding, checkpoint):
    """Every check's measurements on this rank, in one launch: expert_parallel_step for every
    config, with and without deduplication and over expert x data-parallel groups, uneven and empty
    batches, collapsed routing, a few training steps of a small GPT (every group layout), the errors
    of bad configs, a checkpoint saved and loaded at other group sizes (at the path `checkpoint`),
    and lockstep decoding (`decoding`: see decoding_setup)."""
    from utils.parallel import expert_data_parallel_groups
    from utils.parallel_runs import reshard_checkpoint, train_expert_parallel
    results = {name: expert_parallel_step(rank, world_size, cfg) for name, cfg in CONFIGS.items()}
    results["uneven"] = {(scenario, name): uneven_step(rank, world_size, cfg, shapes)
                         for scenario, shapes in SHAPES[world_size].items() for name, cfg in UNEVEN_CONFIGS.items()}
    results["dedup"] = {(name, where): expert_parallel_step(rank, world_size, cfg, dedup=True, combine_at=where)
                        for name, cfg in DEDUP_CONFIGS.items() for where in COMBINE_AT}
    results["dedup uneven"] = {(scenario, where): uneven_step(rank, world_size, DEDUP_CONFIGS["top-4, latent"], shapes,
                                                              dedup=True, combine_at=where)
                               for scenario, shapes in SHAPES[world_size].items() for where in COMBINE_AT}
    groups = {size: expert_data_parallel_groups(size) for size in EXPERT_SIZES[world_size]}
    results["groups"] = {(size, dedup): expert_parallel_step(rank, world_size, DEDUP_CONFIGS["top-4, shared + sigmoid + z-loss"],
                                                             group=groups[size].expert, dedup=dedup)
                         for size in EXPERT_SIZES[world_size] for dedup in (False, True)}
    results["collapsed"] = collapsed_step(rank, world_size)
    results["training"] = train_expert_parallel(rank, world_size, CFG, training_batches(), 1e-2, 3, grad_clip=0.05)
    results["group training"] = {size: train_expert_parallel(rank, world_size, CFG, training_batches(), 1e-2, 3,
                                                             grad_clip=0.05, expert_size=size, dedup=size > 1)
                                 for size in EXPERT_SIZES[world_size]}
    results["errors"] = build_errors(rank, world_size)
    results["reshard"] = reshard_checkpoint(rank, world_size, CFG, checkpoint, checkpoint_batch(), EXPERT_SIZES[world_size])
    results["saved from groups"] = save_from_groups(rank, world_size, checkpoint)
    results["gradient hook"] = hook_gradients(rank, world_size)
    results["groups made once"] = all(expert_data_parallel_groups(size) is groups[size] for size in EXPERT_SIZES[world_size])
    results["decoding"] = decode_in_lockstep(rank, world_size, decoding)
    return results


CHECKS = [*CONFIGS, "uneven", "dedup", "dedup uneven", "groups", "collapsed", "training", "group training", "errors",
          "reshard", "saved from groups", "gradient hook", "groups made once", "decoding"]


def save_from_groups(rank, world_size, path):
    """save_expert_parallel from the seed-0 GPT split over expert-parallel groups of every size (at
    W = 4: 4 x 1, 2 x 2, 1 x 4), and from the plain GPT, every rank calling it. Before saving, each
    rank adds 1 to every tensor it must not write: every rank but 0 to the replicated tensors (all
    of them, in the plain model), and the ranks outside rank 0's expert-parallel group (the
    data-parallel copies) to their experts. Any byte they wrote would then show in the file.
    Returns {expert_size, or "plain": the file's path}."""
    from utils.parallel import expert_data_parallel_groups, expert_parallel

    paths = {}
    for size in [*EXPERT_SIZES[world_size], "plain"]:
        torch.manual_seed(0)
        model = MoEGPTModel(CFG)
        writers = 1                                              # ranks 0 .. writers - 1 write the experts
        if size != "plain":
            model, writers = expert_parallel(model, expert_data_parallel_groups(size).expert), size
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if rank >= (writers if ".local_experts." in name else 1):
                    t.add_(1.0)
        paths[size] = f"{path}.saved_from_{size}"
        save_expert_parallel(model, paths[size])
    return paths


GRAD_CLIP = 0.05


def hook_gradients(rank, world_size):
    """For every expert-parallel size: the seed-3 GPT over groups of that size, one forward and backward
    of this rank's share of a batch (its mean loss plus the full aux loss, as utils.train.train
    does), then the hook expert_parallel_gradients(groups), without clipping and with GRAD_CLIP.
    Returns {(size, clip): {single-process name: this rank's gradient}}, an expert weight's
    gradient being that of this rank's experts only (rows first_expert ..)."""
    from utils.parallel import expert_data_parallel_groups, expert_parallel, expert_parallel_gradients
    from utils.train import lm_loss, total_aux_loss

    x, y = training_batches()[0]
    share = x.shape[0] // world_size
    x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    out = {}
    for size in EXPERT_SIZES[world_size]:
        groups = expert_data_parallel_groups(size)
        for clip in (None, GRAD_CLIP):
            torch.manual_seed(3)
            model = expert_parallel(MoEGPTModel(CFG), groups.expert)
            (lm_loss(model(x), y) + total_aux_loss(model)).backward()
            expert_parallel_gradients(groups)(model, clip)
            out[size, clip] = {name.replace(".moe.", ".").replace(".local_experts.", ".experts."): p.grad.clone()
                               for name, p in model.named_parameters()}
    return out


def checkpoint_batch():
    return torch.randint(0, CFG["vocab_size"], (4, CFG["context_length"]), generator=torch.Generator().manual_seed(2))


def training_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 40, (4, 8), generator=g), torch.randint(0, 40, (4, 8), generator=g)) for _ in range(4)]


def expert_parallel_step(rank, world_size, cfg, **kwargs):
    """One forward and backward of the expert-parallel layer (ExpertParallelMoE(moe, **kwargs)) on
    this rank's share of the batch (sequences rank * SEQS_PER_RANK ..., by global rank)."""
    moe, x = layer_and_batch(cfg, world_size)
    x = x[rank * SEQS_PER_RANK:(rank + 1) * SEQS_PER_RANK].clone().requires_grad_(True)
    layer = ExpertParallelMoE(moe, **kwargs)
    y = layer(x)
    # The summed loss over ranks is the single-process loss: the aux loss is global, so each rank takes 1/W.
    (y.pow(2).sum() + layer.moe.aux_loss / world_size).backward()
    expert_grads = {name: p.grad for name, p in layer.local_experts.named_parameters()}
    routed = layer.moe.last_routing["topk_idx"]                                 # this rank's tokens' choices
    replicated = {name: p.grad for name, p in layer.moe.named_parameters()}
    return {"y": y.detach(), "x_grad": x.grad, "expert_grads": expert_grads, "replicated_grads": replicated,
            "aux_loss": layer.moe.aux_loss.item(), "expert_params": sum(p.numel() for p in layer.local_experts.parameters()),
            "exchange": layer.last_exchange, "routed": routed, "first_expert": layer.first_expert,
            "local_weights": {name: p.detach() for name, p in layer.local_experts.named_parameters()}}


# Per-rank batch shapes (B, T): uneven token counts, and ranks with no tokens at all (B = 0 or T = 0).
SHAPES = {2: {"uneven": [(2, 5), (1, 3)], "empty rank": [(2, 5), (0, 5)], "every rank empty": [(0, 5), (3, 0)]},
          4: {"uneven": [(2, 5), (1, 3), (3, 1), (1, 4)], "empty rank": [(2, 5), (0, 5), (1, 3), (3, 0)]}}


def uneven_batch(cfg, shapes, seed=1):
    """The layer, all ranks' tokens (N_total, D) and the weights (N_total, D) of the loss sum(y * w)."""
    torch.manual_seed(seed)
    moe = make_moe(cfg)
    total = sum(b * t for b, t in shapes)
    return moe, torch.randn(total, cfg["emb_dim"]), torch.randn(total, cfg["emb_dim"])


def grads(module):
    """{name: gradient} of a module's parameters, zeros where backward left none."""
    return {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in module.named_parameters()}


def uneven_step(rank, world_size, cfg, shapes, **kwargs):
    """One forward and backward (training mode, input requiring grad) on rank `rank`'s share, of
    shape shapes[rank], of the tokens of uneven_batch (ExpertParallelMoE(moe, **kwargs))."""
    moe, tokens, weights = uneven_batch(cfg, shapes)
    (B, T_r), D = shapes[rank], cfg["emb_dim"]
    start = sum(b * t for b, t in shapes[:rank])
    x = tokens[start:start + B * T_r].reshape(B, T_r, D).clone().requires_grad_(True)
    layer = ExpertParallelMoE(moe, **kwargs).train()
    y = layer(x)
    ((y * weights[start:start + B * T_r].reshape(B, T_r, D)).sum() + layer.moe.aux_loss / world_size).backward()
    return {"y": y.detach(), "x_grad": x.grad, "aux_loss": layer.moe.aux_loss.item(),
            "expert_grads": grads(layer.local_experts), "replicated_grads": grads(layer.moe)}


COLLAPSED = {**BASE, "num_experts": 4}
COLLAPSED_BIAS = [10.0, 10.0, 0.0, 0.0]   # every token picks experts 0 and 1: the ranks of experts 2, 3 get no rows


def collapsed_step(rank, world_size):
    """Training mode, and inputs that do not require grad: with routing collapsed onto experts 0
    and 1 ("collapsed"); and, with the router frozen, an input that requires grad on rank 0 only
    ("mixed": what requires grad differs between ranks)."""
    results = {}
    for case in ("collapsed", "mixed"):
        moe, tokens, weights = uneven_batch(COLLAPSED, [(2, 3)] * world_size)
        if case == "collapsed":
            moe.router.expert_bias.copy_(torch.tensor(COLLAPSED_BIAS))
        else:
            moe.router.requires_grad_(False)
        x = tokens[rank * 6:(rank + 1) * 6].reshape(2, 3, -1).requires_grad_(case == "mixed" and rank == 0)
        layer = ExpertParallelMoE(moe).train()
        y = layer(x)
        ((y * weights[rank * 6:(rank + 1) * 6].reshape(2, 3, -1)).sum() + layer.moe.aux_loss / world_size).backward()
        results[case] = {"y": y.detach(), "x_grad": x.grad, "aux_loss": layer.moe.aux_loss.item(),
                         "received": sum(layer.last_exchange["received_rows"]),
                         "expert_grads": grads(layer.local_experts), "replicated_grads": grads(layer.moe)}
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"W={w}")
def runs(request, tmp_path_factory):
    world_size = request.param
    decoding = decoding_setup(world_size)
    checkpoint = tmp_path_factory.mktemp("checkpoint") / f"saved_at_{world_size}.safetensors"
    per_rank = launch(expert_parallel_steps, world_size, decoding, str(checkpoint))
    return world_size, {name: [r[name] for r in per_rank] for name in CHECKS}, {**decoding, "checkpoint": checkpoint}


def check_layer(cfg, ranks, world_size, expert_size=None):
    """The per-rank results of expert_parallel_step equal the single-process layer's: outputs, input,
    expert and replicated gradients, the aux loss, the experts each rank holds. expert_size: the
    expert-parallel groups' size (None: all ranks); the copies of an expert (one per group) each
    hold the gradient of their group's tokens, which add up to the single-process one."""
    expert_size = expert_size or world_size
    moe, x = layer_and_batch(cfg, world_size)
    x.requires_grad_(True)
    y = moe(x)
    (y.pow(2).sum() + moe.aux_loss).backward()
    assert torch.allclose(torch.cat([r["y"] for r in ranks]), y, atol=1e-5)
    assert torch.allclose(torch.cat([r["x_grad"] for r in ranks]), x.grad, atol=1e-5)
    assert all(r["aux_loss"] == pytest.approx(moe.aux_loss.item(), rel=1e-5) for r in ranks)
    per_rank = cfg["num_experts"] // expert_size
    rows = [ranks[i:i + expert_size] for i in range(0, world_size, expert_size)]      # the expert-parallel groups
    for name_, param in moe.experts.named_parameters():
        total = sum(torch.cat([r["expert_grads"][name_] for r in row]) for row in rows)   # rank r holds its E/W experts
        assert torch.allclose(total, param.grad, atol=1e-5), name_
    for name_, param in moe.named_parameters():
        if not name_.startswith("experts."):                                   # replicated: gradients add up
            total = sum(r["replicated_grads"][name_] for r in ranks)
            assert torch.allclose(total, param.grad, atol=1e-5), name_
    assert torch.equal(torch.cat([r["routed"] for r in ranks]), moe.last_routing["topk_idx"])
    full_experts = sum(p.numel() for p in moe.experts.parameters())
    assert all(r["expert_params"] == full_experts // expert_size for r in ranks)    # only its share
    for rank, r in enumerate(ranks):                                            # rank r holds experts r*E/W ...
        first = rank % expert_size * per_rank
        assert r["first_expert"] == first
        for name_, param in moe.experts.named_parameters():
            assert torch.equal(r["local_weights"][name_], param.detach()[first:first + per_rank]), name_
    return moe


def check_bytes(cfg, ranks, world_size, dedup=False, combine_at="destination"):
    """last_exchange's rows and bytes, against what the routing asks for: one row per assignment, or
    (dedup) one per distinct (token, destination rank) pair, counted here from each rank's
    routing; every row's size from the config; bytes_sent = the bytes of rows for other ranks."""
    E_r, k = cfg["num_experts"] // world_size, cfg["num_experts_per_tok"]
    owner = [r["routed"] // E_r for r in ranks]                                 # (N, k) destination of each choice
    one_hot = [torch.nn.functional.one_hot(o, world_size) for o in owner]       # (N, k, W)
    per_choice = torch.stack([h.sum((0, 1)) for h in one_hot])                  # (from, to) assignments
    pairs = torch.stack([h.amax(1).sum(0) for h in one_hot])                    # (from, to) distinct (token, rank)
    sends = pairs if dedup else per_choice
    assert [r["exchange"]["sent_rows"] for r in ranks] == sends.tolist()
    assert [r["exchange"]["received_rows"] for r in ranks] == sends.T.tolist()
    returned = per_choice.T if dedup and combine_at == "source" else sends.T   # rows each rank sends back
    assert [r["exchange"]["returned_rows"] for r in ranks] == returned.tolist()
    d, slots = cfg.get("latent_dim") or cfg["emb_dim"], min(k, E_r)
    row_bytes = {"counts": 8 * (1 if dedup else E_r), "vectors": 4 * d, "results": 4 * d}
    if dedup:
        row_bytes["expert_ids"] = 4 * slots
        if combine_at == "destination":
            row_bytes["gates"] = 4 * slots
    rows = {"counts": torch.ones(world_size, world_size, dtype=torch.long), "vectors": sends, "expert_ids": sends,
            "gates": sends, "results": returned}
    for rank, r in enumerate(ranks):
        tensors = r["exchange"]["tensors"]
        assert {name: t["row_bytes"] for name, t in tensors.items()} == row_bytes
        assert all(t["rows"] == rows[name][rank].tolist() for name, t in tensors.items())
        off = sum(b * (rows[name][rank].sum() - rows[name][rank, rank]) for name, b in row_bytes.items())
        assert r["exchange"]["bytes_sent"] == off
    assert destination_ranks(torch.cat([r["routed"] for r in ranks]), cfg["num_experts"], world_size).sum() == pairs.sum()
    return pairs.sum().item(), per_choice.sum().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_expert_parallel_equals_the_single_process_layer(runs, name):
    world_size, results, _ = runs
    cfg, ranks = CONFIGS[name], results[name]
    check_layer(cfg, ranks, world_size)
    check_bytes(cfg, ranks, world_size)
    assert sum(sum(r["exchange"]["sent_rows"]) for r in ranks) == world_size * SEQS_PER_RANK * T * cfg["num_experts_per_tok"]


@pytest.mark.parametrize("where", COMBINE_AT)
@pytest.mark.parametrize("name", list(DEDUP_CONFIGS))
def test_deduplicated_dispatch_sends_a_token_once_per_rank(runs, name, where):
    """dedup=True: one row per distinct (token, destination rank), read from the exchanged tensors;
    fewer than one per assignment; outputs and every gradient still the single-process layer's."""
    world_size, results, _ = runs
    cfg = DEDUP_CONFIGS[name]
    ranks = [r[name, where] for r in results["dedup"]]
    check_layer(cfg, ranks, world_size)
    distinct, assignments = check_bytes(cfg, ranks, world_size, dedup=True, combine_at=where)
    assert assignments == world_size * SEQS_PER_RANK * T * cfg["num_experts_per_tok"]
    assert distinct < assignments                                              # top-k >= 2: rows saved


@pytest.mark.parametrize("where", COMBINE_AT)
def test_deduplicated_dispatch_with_uneven_and_empty_ranks(runs, where):
    world_size, results, _ = runs
    for scenario, shapes in SHAPES[world_size].items():
        ranks = [r[scenario, where] for r in results["dedup uneven"]]
        assert [tuple(r["y"].shape[:2]) for r in ranks] == shapes
        moe, x, w = uneven_batch(DEDUP_CONFIGS["top-4, latent"], shapes)
        assert_equals_single_process(moe, x, w, ranks, world_size)


@pytest.mark.parametrize("dedup", [False, True], ids=["per assignment", "dedup"])
def test_expert_times_data_parallel_groups_equal_the_single_process_layer(runs, dedup):
    """W processes as (W / s) data-parallel copies of s-rank expert-parallel groups, for every s
    (at W = 4: 4 x 1, 2 x 2, 1 x 4): each copy's experts see its group's tokens, and the copies'
    gradients add up to the single-process layer's; the aux loss is that of all W ranks' tokens."""
    world_size, results, _ = runs
    cfg = DEDUP_CONFIGS["top-4, shared + sigmoid + z-loss"]
    for size in EXPERT_SIZES[world_size]:
        check_layer(cfg, [r[size, dedup] for r in results["groups"]], world_size, expert_size=size)


def assert_equals_single_process(moe, x, w, ranks, world_size, x_grad_ranks=None):
    """The per-rank results of a forward and backward of the loss sum(y * w) + aux_loss (each rank
    adds aux_loss / W) equal the single-process layer's on all tokens x (N_total, D) together; the
    input gradients of the ranks x_grad_ranks (all when None) too."""
    x = x.clone().requires_grad_(True)
    y = moe(x[None])[0]
    ((y * w).sum() + moe.aux_loss).backward()
    D = y.shape[1]
    assert torch.allclose(torch.cat([r["y"].reshape(r["y"].numel() // D, D) for r in ranks]), y, atol=1e-5)
    x_grads = [r["y"].numel() // D for r in ranks]
    for rank, (r, expected) in enumerate(zip(ranks, torch.split(x.grad, x_grads))):
        if x_grad_ranks is None or rank in x_grad_ranks:
            assert torch.allclose(r["x_grad"].reshape(-1, D), expected, atol=1e-5)
        else:
            assert r["x_grad"] is None
    for r in ranks:
        assert torch.isfinite(torch.tensor(r["aux_loss"])) and r["aux_loss"] == pytest.approx(moe.aux_loss.item(), rel=1e-5, abs=1e-7)
    expected = grads(moe)                                                        # zeros where no token went
    for name, param in moe.experts.named_parameters():
        stacked = torch.cat([r["expert_grads"][name] for r in ranks])
        assert torch.allclose(stacked, expected[f"experts.{name}"], atol=1e-5), name
    for name, param in moe.named_parameters():
        if not name.startswith("experts."):
            assert torch.allclose(sum(r["replicated_grads"][name] for r in ranks), expected[name], atol=1e-5), name


@pytest.mark.parametrize("name", list(UNEVEN_CONFIGS))
def test_uneven_and_empty_ranks_equal_the_single_process_layer(runs, name):
    """Different B and T per rank, and ranks with B = 0 or T = 0: outputs, input, expert and router
    gradients and the global aux loss (z-loss included: finite with an empty rank) as one process."""
    world_size, results, _ = runs
    for scenario, shapes in SHAPES[world_size].items():
        ranks = [r[scenario, name] for r in results["uneven"]]
        assert [tuple(r["y"].shape[:2]) for r in ranks] == shapes                   # empty in, empty out
        moe, x, w = uneven_batch(CONFIGS[name], shapes)
        assert_equals_single_process(moe, x, w, ranks, world_size)
        if scenario == "every rank empty":
            assert all(r["aux_loss"] == 0 for r in ranks)


def test_a_rank_without_rows_and_an_input_without_grad(runs):
    """Routing collapsed onto experts 0 and 1, in training mode, with inputs that do not require
    grad: the ranks of experts 2 and 3 receive no rows, yet take part in both backward exchanges
    (before the fix they skipped the combine's, and the others failed or hung). And with a frozen
    router and an input that requires grad on rank 0 only, every rank takes part in every backward
    exchange (the dispatch's, and the aux loss's sum over ranks)."""
    world_size, results, _ = runs
    ranks = [r["collapsed"] for r in results["collapsed"]]
    holder = [e * world_size // COLLAPSED["num_experts"] for e in range(COLLAPSED["num_experts"])]
    assert [r["received"] > 0 for r in ranks] == [rank in holder[:2] for rank in range(world_size)]
    moe, x, w = uneven_batch(COLLAPSED, [(2, 3)] * world_size)
    moe.router.expert_bias.copy_(torch.tensor(COLLAPSED_BIAS))
    assert_equals_single_process(moe, x, w, ranks, world_size, x_grad_ranks=[])
    moe, x, w = uneven_batch(COLLAPSED, [(2, 3)] * world_size)
    moe.router.requires_grad_(False)
    assert_equals_single_process(moe, x, w, [r["mixed"] for r in results["collapsed"]], world_size, x_grad_ranks=[0])


BAD = {"6 experts": {**BASE, "num_experts": 6}, "bias updates": {**BASE, "bias_update_rate": 0.01},
       "capacity": {**BASE, "capacity_factor": 1.0}}


def build_errors(rank, world_size):
    """The error each BAD config raises when wrapped in a group of world_size ranks, and those of bad
    arguments (dedup, combine_at, an expert-parallel size that does not divide world_size)."""
    from utils.parallel import expert_data_parallel_groups

    errors = {}
    attempts = {name: (lambda cfg=cfg: ExpertParallelMoE(make_moe(cfg))) for name, cfg in BAD.items()}
    attempts["dedup"] = lambda: ExpertParallelMoE(make_moe(BASE), dedup="yes")
    attempts["combine_at"] = lambda: ExpertParallelMoE(make_moe(BASE), combine_at="anywhere")
    attempts["expert_size"] = lambda: expert_data_parallel_groups(3)
    for name, attempt in attempts.items():
        try:
            attempt()
        except ValueError as err:
            errors[name] = str(err)
    return errors


def test_bad_input_is_rejected(runs):
    world_size, results, _ = runs
    for errors in results["errors"]:
        if world_size == 4:
            assert "num_experts (6) must be divisible by the expert-parallel group's size (4)" in errors["6 experts"]
        else:
            assert "6 experts" not in errors                                   # 6 experts over 2 ranks: fine
        assert "bias_update_rate must be 0" in errors["bias updates"]
        assert "capacity_factor must be None" in errors["capacity"]
        assert "dedup must be True or False, got 'yes'" in errors["dedup"]
        assert "combine_at must be one of ('destination', 'source')" in errors["combine_at"]
        assert f"expert_size must be a positive integer dividing the world size ({world_size}), got 3" in errors["expert_size"]


GEN_CFG = {**CFG, "context_length": 16}
MAX_NEW = 10


def decoding_setup(world_size, seed=5):
    """Prompts for each rank (B = 1 or 2 rows, T = 2 to 4 tokens: uneven) and an eos_id at which the
    ranks' rows finish at different steps, chosen from the single-process model's greedy tokens;
    with the single-process result for each rank's prompts (generate, one process, padded later)."""
    torch.manual_seed(seed)
    model = MoEGPTModel(GEN_CFG)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, GEN_CFG["vocab_size"], (1 + r % 2, 2 + r % 3), generator=g) for r in range(world_size)]
    free = [generate(model, p, MAX_NEW)[:, p.shape[1]:] for p in prompts]       # greedy, no eos: (B_r, MAX_NEW)

    def finish_steps(eos):           # per rank: the step at which its last row produces eos (MAX_NEW: never)
        first = [torch.where((f == eos).any(1), (f == eos).int().argmax(1), MAX_NEW) for f in free]
        return [int(s.max()) for s in first]
    # The eos at which the most ranks finish at different steps, all before MAX_NEW, far apart.
    eos_id = max(range(GEN_CFG["vocab_size"]), key=lambda e: (len(set(finish_steps(e))), max(finish_steps(e)) < MAX_NEW,
                                                             max(finish_steps(e)) - min(finish_steps(e)), -e))
    steps = finish_steps(eos_id)
    assert len(set(steps)) >= 2 and min(steps) < MAX_NEW - 2, steps                  # a useful test case
    single = [generate(model, p, MAX_NEW, eos_id=eos_id) for p in prompts]
    return {"prompts": prompts, "eos_id": eos_id, "seed": seed, "single": single, "finish_steps": steps}


def decode_in_lockstep(rank, world_size, decoding):
    """generate_expert_parallel on this rank's prompts; and the error of a max_new_tokens that
    differs between ranks."""
    from utils.parallel import expert_parallel, generate_expert_parallel

    torch.manual_seed(decoding["seed"])
    model = expert_parallel(MoEGPTModel(GEN_CFG))
    prompts, eos_id = decoding["prompts"][rank], decoding["eos_id"]
    try:
        generate_expert_parallel(model, prompts, MAX_NEW + rank, eos_id=eos_id)
        error = None
    except ValueError as err:
        error = str(err)
    tokens = generate_expert_parallel(model, prompts, MAX_NEW, eos_id=eos_id)
    plain = generate(model, prompts, MAX_NEW, eos_id=eos_id)          # the layers' decoding_stop: lockstep too
    # Deduplicated dispatch, and the last rank with no prompts at all: it steps with an empty batch.
    torch.manual_seed(decoding["seed"])
    dedup = expert_parallel(MoEGPTModel(GEN_CFG), dedup=True)
    steps = []
    dedup.trf_blocks[0].ff.register_forward_hook(lambda module, args, out: steps.append(args[0].shape[:2]))
    mine = prompts[:0] if rank == world_size - 1 else prompts
    empty = generate_expert_parallel(dedup, mine, MAX_NEW, eos_id=eos_id)
    return {"tokens": tokens, "plain": plain, "error": error, "training": model.training, "empty rank": empty,
            "empty rank steps": steps}


def test_decoding_keeps_the_ranks_in_lockstep(runs):
    """Ranks whose rows reach eos_id at different steps all keep stepping until every rank is done:
    each gets the single-process tokens for its prompts, padded with eos_id."""
    world_size, results, decoding = runs
    ranks, eos_id = results["decoding"], decoding["eos_id"]
    steps = min(max(decoding["finish_steps"]) + 1, MAX_NEW)                     # new tokens until all are done
    for prompts, single, r in zip(decoding["prompts"], decoding["single"], ranks):
        expected = torch.cat([single, torch.full((len(single), prompts.shape[1] + steps - single.shape[1]), eos_id)], 1)
        assert torch.equal(r["tokens"], expected) and torch.equal(r["plain"], expected)
        assert "max_new_tokens must be the same" in r["error"]                  # refused on every rank alike
        assert r["training"]                                                     # train mode restored
    assert len({single.shape[1] - prompts.shape[1] for prompts, single in zip(decoding["prompts"], decoding["single"])}) >= 2
    # With deduplication, and the last rank without prompts: it keeps stepping, with empty batches
    # (B = 0) in every layer, until the other ranks are done.
    steps = min(max(decoding["finish_steps"][:-1]) + 1, MAX_NEW)
    for rank, (prompts, single, r) in enumerate(zip(decoding["prompts"], decoding["single"], ranks)):
        if rank < world_size - 1:
            expected = torch.cat([single[:, :prompts.shape[1] + steps],
                                  torch.full((len(single), max(0, prompts.shape[1] + steps - single.shape[1])), eos_id)], 1)
        else:
            expected = torch.empty(0, prompts.shape[1] + steps, dtype=prompts.dtype)
            assert all(batch == 0 for batch, _ in r["empty rank steps"])          # B = 0 at every step
        assert r["empty rank"].shape == expected.shape and torch.equal(r["empty rank"], expected)
        assert len(r["empty rank steps"]) == steps                                 # one forward pass per new token


def exits_on_rank_1(rank, world_size):
    """For launch: rank 1's process ends without reporting anything (as a crash would)."""
    if rank == 1:
        os._exit(3)
    return rank


def only_in_main(rank, world_size):
    return rank


def test_launch_reports_a_failing_rank_and_checks_its_arguments():
    with pytest.raises(RuntimeError, match="(?s)rank 0 failed.*TypeError"):
        launch(build_errors, 1, "unexpected argument")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(make_moe(BASE))                                      # no process group here
    with pytest.raises(ValueError, match="world_size"):
        launch(build_errors, 0)
    with pytest.raises(ValueError, match="importable module"):
        launch(lambda rank, world_size: rank, 1)                               # cannot even be pickled


def test_launch_fails_fast_when_a_rank_dies_or_cannot_import_fn():
    """A child that ends without reporting, or cannot import fn (a function of a notebook cell lives
    in the kernel's __main__, which a new process does not have), is reported at once, not after
    the timeout."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 exited with code 3 before reporting"):
        launch(exits_on_rank_1, 2, timeout=60)
    assert time.monotonic() - start < 30
    main = sys.modules["__main__"]
    only_in_main.__module__, only_in_main.__qualname__ = "__main__", "a_notebook_cell_function"
    main.a_notebook_cell_function = only_in_main                               # as a notebook cell defines it
    try:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="(?s)rank 0 failed.*a_notebook_cell_function.*importable module"):
            launch(only_in_main, 1, timeout=60)
        assert time.monotonic() - start < 30
    finally:
        del main.a_notebook_cell_function
        only_in_main.__module__, only_in_main.__qualname__ = __name__, "only_in_main"


def test_checkpoint_saved_at_one_w_loads_at_another(runs):
    """save_expert_parallel at W writes one safetensors file (every expert under its global index, the
    single-process model's state_dict); load_expert_parallel reads it into a model split over
    expert-parallel groups of every size (at W = 4: 4, 2 and 1 ranks), each rank reading only its
    experts, and into a plain model in this process: the same outputs as the saved model."""
    from safetensors.torch import load_file

    world_size, results, setup = runs
    ranks = results["reshard"]
    saved = torch.cat([r["saved"] for r in ranks])
    torch.manual_seed(0)
    reference = MoEGPTModel(CFG).eval()                                         # the saved model, in one process
    stored = load_file(setup["checkpoint"])                                     # a valid safetensors file
    assert stored.keys() == reference.state_dict().keys()
    assert all(torch.equal(stored[name], t) for name, t in reference.state_dict().items())
    with torch.no_grad():
        assert torch.allclose(saved, reference(checkpoint_batch()), atol=1e-5)
    expert_values = sum(t.numel() for name, t in stored.items() if ".experts." in name)
    for size in EXPERT_SIZES[world_size]:
        loaded = torch.cat([r[size]["logits"] for r in ranks])
        assert not torch.allclose(torch.cat([r[size]["before"] for r in ranks]), saved, atol=1e-3)   # other weights before
        assert torch.allclose(loaded, saved, atol=1e-5), size
        for r in ranks:                                 # each rank read and holds its share of the experts only
            assert r[size]["read"]["expert_values"] == r[size]["local_experts"] == expert_values // size
            assert r[size]["read"]["other_values"] == sum(t.numel() for name, t in stored.items() if ".experts." not in name)
    torch.manual_seed(1)
    plain = MoEGPTModel(CFG).eval()                                             # W' = 1, no process group
    assert load_expert_parallel(plain, setup["checkpoint"])["expert_values"] == expert_values
    with torch.no_grad():
        assert torch.allclose(plain(checkpoint_batch()), saved, atol=1e-5)


def test_checkpoint_errors_and_a_plain_model(tmp_path):
    """A plain model (no process group) is saved in the same format; a model of another shape is
    refused with the names of the tensors at fault."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = MoEGPTModel(CFG)
    save_expert_parallel(model, tmp_path / "plain.safetensors")
    stored = load_file(tmp_path / "plain.safetensors")
    assert all(torch.equal(stored[name], t) for name, t in model.state_dict().items()) and stored.keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match=r"missing \[\].*unexpected \['trf_blocks.1.att.W_key.weight'"):
        load_expert_parallel(MoEGPTModel({**CFG, "n_layers": 1}), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"trf_blocks.0.ff.experts.w_in: the checkpoint's shape \(8, 12, 16\) must be the model's, \(8, 6, 16\)"):
        load_expert_parallel(MoEGPTModel({**CFG, "moe_hidden_dim": 6}), tmp_path / "plain.safetensors")
    half = MoEGPTModel(CFG)
    half.trf_blocks[1].to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"trf_blocks.1.att.W_query.weight: the checkpoint's dtype F32 must be the model's, BF16"):
        load_expert_parallel(half, tmp_path / "plain.safetensors")


def test_checkpoint_layout_is_the_safetensors_librarys(tmp_path):
    """Tensors of several element sizes lie where safetensors' own writer puts them (larger elements
    first, then by name), each at a multiple of its element size; a name-ordered layout would
    put the int64 tensor at byte 6 and the float32 ones at bytes 22 and 26."""
    import json
    import struct

    from safetensors.torch import load_file, save_file

    def layout(path):
        raw = open(path, "rb").read()
        header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
        return {name: (h["dtype"], h["data_offsets"]) for name, h in header.items() if name != "__metadata__"}

    model = torch.nn.Module()
    model.register_buffer("a_half", torch.arange(3, dtype=torch.bfloat16))
    model.register_buffer("b_long", torch.arange(2))
    model.lin = torch.nn.Linear(3, 1)
    save_expert_parallel(model, tmp_path / "ours.safetensors")
    save_file(model.state_dict(), tmp_path / "theirs.safetensors")
    ours = layout(tmp_path / "ours.safetensors")
    assert ours == layout(tmp_path / "theirs.safetensors")
    sizes = {name: t.element_size() for name, t in model.state_dict().items()}
    assert all(start % sizes[name] == 0 for name, (_, (start, _)) in ours.items())
    assert [name for name, _ in sorted(ours.items(), key=lambda item: item[1][1])] == ["b_long", "lin.bias", "lin.weight", "a_half"]
    stored = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(stored[name], t) and stored[name].dtype == t.dtype for name, t in model.state_dict().items())


def test_checkpoint_saved_from_copies_and_from_a_plain_model(runs):
    """save_expert_parallel in a world of W ranks, from the GPT split over groups of every size (at
    W = 4: 4 x 1, 2 x 2 and 1 x 4, whose data-parallel copies must write nothing) and from a plain
    GPT (only rank 0 writes): each file is the single-process state_dict. The ranks that must stay
    silent held other values, so a byte written by one of them would show."""
    from safetensors.torch import load_file

    world_size, results, _ = runs
    paths = results["saved from groups"][0]
    assert all(r == paths for r in results["saved from groups"])
    torch.manual_seed(0)
    reference = MoEGPTModel(CFG).state_dict()
    for size in [*EXPERT_SIZES[world_size], "plain"]:
        stored = load_file(paths[size])
        assert stored.keys() == reference.keys(), size
        for name, t in reference.items():
            assert torch.equal(stored[name], t), (size, name)


def test_the_gradient_hook_gives_one_process_gradients(runs):
    """expert_parallel_gradients turns each rank's gradients into those of one process on the whole
    batch, for every layout (at W = 4: 4 x 1, 2 x 2, 1 x 4): every replicated gradient on every rank,
    and each rank's rows of every expert gradient, equal one process's .grad; clipped by the
    global norm, they equal torch.nn.utils.clip_grad_norm_'s. A wrong scale (dividing by the
    data-parallel size instead of the number of processes, summing instead of averaging) fails."""
    from utils.train import lm_loss, total_aux_loss

    world_size, results, _ = runs
    x, y = training_batches()[0]
    expected = {}
    for clip in (None, GRAD_CLIP):
        torch.manual_seed(3)
        model = MoEGPTModel(CFG)
        (lm_loss(model(x), y) + total_aux_loss(model)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        expected[clip] = {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in model.named_parameters()}
    assert torch.cat([g.flatten() for g in expected[None].values()]).norm() > 2 * GRAD_CLIP      # clipping acts
    per_rank = CFG["num_experts"]
    for size in EXPERT_SIZES[world_size]:
        for clip in (None, GRAD_CLIP):
            for rank, r in enumerate(results["gradient hook"]):
                got = r[size, clip]
                assert got.keys() == expected[clip].keys()
                first, count = rank % size * per_rank // size, per_rank // size
                for name, g in expected[clip].items():
                    want = g[first:first + count] if ".experts." in name else g
                    assert torch.allclose(got[name], want, rtol=1e-4, atol=1e-7), (size, clip, rank, name)


def test_groups_are_made_once(runs):
    """A second expert_data_parallel_groups(s) returns the groups made by the first, on every rank."""
    assert all(runs[1]["groups made once"])


def test_expert_and_data_parallel_training_equals_one_process(runs):
    """utils.train.train with the expert-parallel gradient hook equals train in one process: AdamW
    with weight decay, the warmup + cosine schedule and clipping by the global gradient norm."""
    from utils.moe_gpt import MoEGPTModel
    from utils.train import train

    def one_process(**kwargs):
        torch.manual_seed(3)
        return train(MoEGPTModel(CFG), training_batches(), None, max_steps=4, peak_lr=1e-2, seed=3,
                     device="cpu", verbose=False, **kwargs)["batch_loss"]

    single, unclipped = one_process(grad_clip=0.05), one_process(grad_clip=None)
    assert abs(single[-1] - unclipped[-1]) > 1e-4          # clipping acts: the ranks must clip by the global norm
    ranks = runs[1]["training"]
    assert all(r == ranks[0] for r in ranks)                                    # every rank reports the global loss
    assert ranks[0] == pytest.approx(single, abs=1e-5)
    assert single[-1] < single[0]
    # Expert x data-parallel groups (at W = 4: 4 x 1, 2 x 2 and 1 x 4; deduplicated dispatch where s > 1):
    # expert gradients averaged over their copies, replicated ones over all ranks: the same losses.
    for size, ranks in ((size, [r[size] for r in runs[1]["group training"]]) for size in EXPERT_SIZES[runs[0]]):
        assert all(r == ranks[0] for r in ranks)
        assert ranks[0] == pytest.approx(single, abs=1e-5), size


def test_rank_loads_and_destinations():
    from utils.routing_analysis import destination_ranks, rank_loads

    topk = torch.tensor([[0, 1], [0, 7], [5, 4], [2, 6]])                      # 8 experts over 4 ranks: pairs
    assert rank_loads(topk, 8, 4).tolist() == [3, 1, 2, 2]
    assert destination_ranks(topk, 8, 4).tolist() == [1, 2, 1, 2]
    assert destination_ranks(topk, 8, 1).tolist() == [1, 1, 1, 1]
    assert rank_loads(topk, 8, 8).tolist() == [2, 1, 1, 0, 1, 1, 1, 1]
    assert destination_ranks(topk, 8, 2).tolist() == [1, 2, 1, 2]
    assert rank_loads(topk[:0], 8, 4).tolist() == [0, 0, 0, 0] and destination_ranks(topk[:0], 8, 4).tolist() == []
    for E, W in ((6, 4), (4, 8)):                                                # not a multiple: a rank would hold
        for f in (rank_loads, destination_ranks):                                # a fraction of an expert, or none
            with pytest.raises(ValueError, match=f"num_experts must be a positive multiple of world_size \\({W}\\)"):
                f(topk % E, E, W)
    for bad, match in (((topk, 8, 0), "world_size must be a positive integer"), ((topk, 0, 4), "num_experts must be"),
                       ((topk, 4, 2), r"topk_idx must hold expert ids in \[0, num_experts=4\)"),
                       ((topk.float(), 8, 4), "topk_idx must be an integer tensor")):
        for f in (rank_loads, destination_ranks):
            with pytest.raises(ValueError, match=match):
                f(*bad)
    with pytest.raises(ValueError, match=r"topk_idx must be \(tokens, k\)"):
        destination_ranks(topk.reshape(-1), 8, 4)


def test_torchrun_works_too():
    """The same layer under PyTorch's own launcher (torchrun), as a learner would run it by hand."""
    import subprocess
    import sys

    from utils.course import ROOT

    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "utils.parallel"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "expert-parallel output equals the single-process layer" in run.stdout
