"""Expert parallelism over W = 2 and 4 gloo processes equals the single-process layer."""
import copy

import pytest
import torch

from utils.moe import make_moe
from utils.parallel import ExpertParallelMoE, launch

BASE = {"emb_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_hidden_dim": 12, "aux_loss_coef": 0.01}
CONFIGS = {"plain": BASE,
           "shared + sigmoid + z-loss": {**BASE, "num_shared_experts": 1, "router_type": "sigmoid",
                                         "expert_type": "swiglu", "z_loss_coef": 0.001},
           "latent": {**BASE, "latent_dim": 8, "expert_type": "relu2"}}
SEQS_PER_RANK, T = 2, 5
CFG = {"vocab_size": 40, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
       **{k: v for k, v in BASE.items() if k != "emb_dim"}}            # a small GPT with MoE layers, to train


def layer_and_batch(cfg, world_size, seed=0):
    torch.manual_seed(seed)
    moe = make_moe(cfg)
    x = torch.randn(world_size * SEQS_PER_RANK, T, cfg["emb_dim"])
    return moe, x


def expert_parallel_steps(rank, world_size):
    """expert_parallel_step for every config, and a few training steps of a small GPT (one launch:
    starting the processes is the slow part)."""
    from utils.parallel import train_expert_parallel
    results = {name: expert_parallel_step(rank, world_size, cfg) for name, cfg in CONFIGS.items()}
    results["training"] = train_expert_parallel(rank, world_size, CFG, training_batches(), 1e-2, 3)
    results["errors"] = build_errors(rank, world_size)
    return results


def training_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 40, (4, 8), generator=g), torch.randint(0, 40, (4, 8), generator=g)) for _ in range(4)]


def expert_parallel_step(rank, world_size, cfg):
    """One forward and backward of the expert-parallel layer on this rank's share of the batch."""
    moe, x = layer_and_batch(cfg, world_size)
    x = x[rank * SEQS_PER_RANK:(rank + 1) * SEQS_PER_RANK].clone().requires_grad_(True)
    layer = ExpertParallelMoE(moe)
    y = layer(x)
    # The summed loss over ranks is the single-process loss: the aux loss is global, so each rank takes 1/W.
    (y.pow(2).sum() + layer.aux_loss / world_size).backward()
    expert_grads = {name: p.grad for name, p in layer.local_experts.named_parameters()}
    routed = layer.moe.last_routing["topk_idx"]                                 # this rank's tokens' choices
    replicated = {name: p.grad for name, p in layer.moe.named_parameters()}
    return {"y": y.detach(), "x_grad": x.grad, "expert_grads": expert_grads, "replicated_grads": replicated,
            "aux_loss": layer.aux_loss.item(), "expert_params": sum(p.numel() for p in layer.local_experts.parameters()),
            "exchange": layer.last_exchange, "routed": routed}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"W={w}")
def runs(request):
    world_size = request.param
    per_rank = launch(expert_parallel_steps, world_size)
    return world_size, {name: [r[name] for r in per_rank] for name in [*CONFIGS, "training", "errors"]}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_expert_parallel_equals_the_single_process_layer(runs, name):
    world_size, results = runs
    cfg, ranks = CONFIGS[name], results[name]
    moe, x = layer_and_batch(cfg, world_size)
    x.requires_grad_(True)
    y = moe(x)
    (y.pow(2).sum() + moe.aux_loss).backward()
    assert torch.allclose(torch.cat([r["y"] for r in ranks]), y, atol=1e-5)
    assert torch.allclose(torch.cat([r["x_grad"] for r in ranks]), x.grad, atol=1e-5)
    assert all(r["aux_loss"] == pytest.approx(moe.aux_loss.item(), rel=1e-5) for r in ranks)
    per_rank = cfg["num_experts"] // world_size
    for name_, param in moe.experts.named_parameters():
        stacked = torch.cat([r["expert_grads"][name_] for r in ranks])          # rank r holds its E/W experts
        assert torch.allclose(stacked, param.grad, atol=1e-5), name_
    for name_, param in moe.named_parameters():
        if not name_.startswith("experts."):                                   # replicated: gradients add up
            total = sum(r["replicated_grads"][name_] for r in ranks)
            assert torch.allclose(total, param.grad, atol=1e-5), name_
    assert torch.equal(torch.cat([r["routed"] for r in ranks]), moe.last_routing["topk_idx"])
    # Bytes that leave rank r: its rows to other ranks (dispatch) and the results it returns to them
    # (combine), i.e. row r and column r of the global send matrix, without the diagonal.
    sends = torch.tensor([r["exchange"]["sent_rows"] for r in ranks])
    off = sends - torch.diag(sends.diag())
    vector_bytes = (cfg.get("latent_dim") or cfg["emb_dim"]) * 4
    assert [r["exchange"]["bytes_sent"] for r in ranks] == ((off.sum(1) + off.sum(0)) * vector_bytes).tolist()
    assert [r["exchange"]["received_rows"] for r in ranks] == sends.T.tolist()
    full_experts = sum(p.numel() for p in moe.experts.parameters())
    assert all(r["expert_params"] == full_experts // world_size for r in ranks)    # only its share
    assert sum(sum(r["exchange"]["sent_rows"]) for r in ranks) == world_size * SEQS_PER_RANK * T * cfg["num_experts_per_tok"]
    assert per_rank * world_size == cfg["num_experts"]


BAD = {"6 experts": {**BASE, "num_experts": 6}, "bias updates": {**BASE, "bias_update_rate": 0.01},
       "capacity": {**BASE, "capacity_factor": 1.0}, "sequence loss": {**BASE, "seq_aux_loss_coef": 0.01}}


def build_errors(rank, world_size):
    """The error each BAD config raises when wrapped in a group of world_size ranks."""
    errors = {}
    for name, cfg in BAD.items():
        try:
            ExpertParallelMoE(make_moe(cfg))
        except ValueError as err:
            errors[name] = str(err)
    return errors


def test_bad_input_is_rejected(runs):
    world_size, results = runs
    for errors in results["errors"]:
        if world_size == 4:
            assert "num_experts (6) must be divisible by the world size (4)" in errors["6 experts"]
        else:
            assert "6 experts" not in errors                                   # 6 experts over 2 ranks: fine
        assert "bias_update_rate must be 0" in errors["bias updates"]
        assert "capacity_factor must be None" in errors["capacity"]
        assert "seq_aux_loss_coef must be 0" in errors["sequence loss"]


def test_launch_reports_a_failing_rank_and_checks_its_arguments():
    with pytest.raises(RuntimeError, match="(?s)rank 0 failed.*TypeError"):
        launch(build_errors, 1, "unexpected argument")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(make_moe(BASE))                                      # no process group here
    with pytest.raises(ValueError, match="world_size"):
        launch(build_errors, 0)


def test_expert_and_data_parallel_training_equals_one_process(runs):
    from utils.moe import MoEGPTModel
    from utils.parallel import train_steps

    torch.manual_seed(3)
    single = train_steps(MoEGPTModel(CFG), training_batches(), lr=1e-2)
    ranks = runs[1]["training"]
    assert all(r == ranks[0] for r in ranks)                                    # every rank reports the global loss
    assert ranks[0] == pytest.approx(single, abs=1e-5)
    assert single[-1] < single[0]


def test_rank_loads_and_destinations():
    from utils.parallel import destination_ranks, rank_loads

    topk = torch.tensor([[0, 1], [0, 7], [5, 4], [2, 6]])                      # 8 experts over 4 ranks: pairs
    assert rank_loads(topk, 8, 4).tolist() == [3, 1, 2, 2]
    assert destination_ranks(topk, 8, 4).tolist() == [1, 2, 1, 2]
    assert destination_ranks(topk, 8, 1).tolist() == [1, 1, 1, 1]


def test_torchrun_works_too():
    """The same layer under PyTorch's own launcher (torchrun), as a learner would run it by hand."""
    import subprocess
    import sys

    from utils.course import ROOT

    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "utils.parallel"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "expert-parallel output equals the single-process layer" in run.stdout
