"""The experiments of notebooks 05-07: which runs each notebook trains, and the seed sweeps behind
their claims.

Spread. One seed can mislead: two runs 0.02 nats apart may swap places with the next seed. A
sweep trains one notebook's runs for several seeds and records, per run and seed, the validation
loss curve (full two-domain validation split), the loss on each domain, and the expert-load
imbalance. Run it with

    python -m utils.experiments 05 --seeds 0 1 2 3 4 5 6 7

which writes utils/assets/seed_sweeps/05.json; the notebooks read those files (`load_sweep`) to
state the spread behind each claim (utils.runs: `paired_differences`, `describe`). Some runs start
from another run's trained model and train a few more steps (`continue_run`,
EXPERIMENTS[notebook]["continued"]): notebook 05's sparse-upcycling comparison.

A single run, its seed (COURSE_SEED) and the evaluation protocol are in utils/runs.py.
"""
import argparse
import copy
import json
import os
import pathlib
import platform
import time

import torch

from .config import validate_model_config
from .moe import LatentMoE, fine_grained, make_moe, moe_layers
from .moe_gpt import upcycle
from .runs import CourseData, continue_run, run_summary, train_run
from .train import resolve_device

SWEEP_DIR = pathlib.Path(__file__).with_name("assets") / "seed_sweeps"


# ----------------------------------------------------------------------------------------------
# The runs of each notebook. The notebooks define the same configs in their own cells and assert
# that they equal these, so the sweeps measure exactly what the notebooks train.

def base_config(vocab_size):
    """The small GPT of notebooks 04-07: D = 128, 4 layers, 4 heads, 128-token context."""
    return {"vocab_size": vocab_size, "context_length": 128, "emb_dim": 128, "n_heads": 4, "n_layers": 4,
            "drop_rate": 0.0, "qkv_bias": False}


def runs_05(base):
    moe = {**base, "num_experts": 8, "num_experts_per_tok": 2, "moe_hidden_dim": 4 * base["emb_dim"],
           "aux_loss_coef": 0.01}
    return {"dense": {**base, "ffn_hidden_dim": 2 * 4 * base["emb_dim"]},
            "MoE": moe,
            "MoE, no aux loss": {**moe, "aux_loss_coef": 0.0},
            "MoE, capacity 1.0": {**moe, "capacity_factor": 1.0}}


def runs_06(base):
    routed = {**base, "num_experts": 8, "num_experts_per_tok": 2, "moe_hidden_dim": 512,
              "router_type": "sigmoid", "aux_loss_coef": 0.01}
    fine = fine_grained(routed, 4)
    shared = {**fine, "num_experts": 30, "num_experts_per_tok": 6, "num_shared_experts": 2}
    return {"routed 8x512, top-2": routed,
            "fine 32x128, top-8": fine,
            "fine + shared 2+30x128, top-6": shared,
            "no balancing": {**shared, "aux_loss_coef": 0.0},
            "bias, no aux loss": {**shared, "aux_loss_coef": 0.0, "bias_update_rate": 0.01}}


def runs_07(base):
    standard = {**base, "num_experts": 8, "num_experts_per_tok": 2, "moe_hidden_dim": 512, "expert_type": "relu2"}
    return {"standard: 8 experts, top-2": standard,
            "projections only: l=d=128, 8 experts, top-2": {**standard, "latent_dim": 128},
            "latent l=64: 16 experts, top-4": {**standard, "latent_dim": 64, "num_experts": 16,
                                               "num_experts_per_tok": 4},
            "latent l=32: 32 experts, top-8": {**standard, "latent_dim": 32, "num_experts": 32,
                                               "num_experts_per_tok": 8}}


def continued_05(base):
    """05's sparse-upcycling comparison: {arm: (parent run of runs_05, config of the continued model)}.
    Each arm takes its parent after the notebook's steps and trains it CONTINUE_STEPS more: the dense
    model as it is, the dense model upcycled into 8 copies of its FeedForward with top-2 (and a new
    router), and the MoE trained from scratch."""
    runs = runs_05(base)
    upcycled = {**runs["dense"], "num_experts": 8, "num_experts_per_tok": 2,
                "moe_hidden_dim": runs["dense"]["ffn_hidden_dim"], "aux_loss_coef": 0.01}
    return {"dense, continued": ("dense", runs["dense"]),
            "upcycled MoE, continued": ("dense", upcycled),
            "MoE, continued": ("MoE", runs["MoE"])}


def start_continued(parent, cfg, seed):
    """The model an arm of a `continued` experiment starts from: a copy of the trained `parent`, or,
    when cfg has experts and the parent has none, its upcycled MoE (router initialised from `seed`)."""
    if cfg.get("num_experts", 0) > 0 and not moe_layers(parent):
        torch.manual_seed(seed)
        return upcycle(parent, cfg)
    if validate_model_config(cfg) != parent.cfg:
        raise ValueError("cfg must be the parent's own config when the arm continues the parent as it is")
    return copy.deepcopy(parent)


# Notebook 07's control: surgery on a freshly built latent model, before it trains.

@torch.no_grad()
def match_output_scale(model, reference_cfg, n_tokens=2048, seed=0):
    """Rescale each LatentMoE layer's up-projection so that, at initialisation, the layer's output
    has the root-mean-square of a freshly built `reference_cfg` layer on the same random input.

    A latent layer's output starts smaller than a standard layer's: the up-projection spreads l
    values over d coordinates, and averaging over more experts (larger top-k) shrinks it too. This
    removes that difference, so a comparison of the two measures the architecture, not the init.
    Returns the list of factors applied.
    """
    x = torch.randn(1, n_tokens, reference_cfg["emb_dim"], generator=torch.Generator().manual_seed(seed))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        target = make_moe(reference_cfg)(x).pow(2).mean().sqrt()
    factors = []
    for layer in moe_layers(model):
        if isinstance(layer, LatentMoE) and layer.up_proj is not None:     # latent_dim set
            factor = (target / layer(x.to(layer.up_proj.weight.device)).pow(2).mean().sqrt().cpu()).item()
            layer.up_proj.weight.mul_(factor)
            factors.append(factor)
    return factors


def prepare_07(base):
    """07's control: the l=32 latent model with its output scale matched to the standard one's at init."""
    standard = runs_07(base)["standard: 8 experts, top-2"]
    return {"latent l=32, output scale matched at init": (
        "latent l=32: 32 experts, top-8", lambda model: match_output_scale(model, standard))}


# Steps and evaluation points are chosen so that each notebook trains in about two minutes on a
# 2-core CPU: 120 or 100 steps of 1,024 tokens (half an epoch), the validation split every 40 or 50.
# "continued": runs that start from another run's trained model and train "continue_steps" more.
EXPERIMENTS = {"05": {"runs": runs_05, "steps": 120, "eval_every": 40, "capacity_eval": True,
                      "continued": continued_05, "continue_steps": 40},
               "06": {"runs": runs_06, "steps": 100, "eval_every": 50},
               "07": {"runs": runs_07, "steps": 100, "eval_every": 50, "prepared": prepare_07}}


def experiment_runs(notebook, vocab_size):
    """{run name: (config, prepare or None)} of a notebook's experiment (see utils.runs.train_run)."""
    if notebook not in EXPERIMENTS:
        raise ValueError(f"notebook must be one of {tuple(EXPERIMENTS)}, got {notebook!r}")
    base = base_config(vocab_size)
    runs = {name: (cfg, None) for name, cfg in EXPERIMENTS[notebook]["runs"](base).items()}
    prepared = EXPERIMENTS[notebook].get("prepared")
    for name, (of_run, prepare) in (prepared(base) if prepared else {}).items():
        runs[name] = (runs[of_run][0], prepare)
    return runs


def continued_runs(notebook, vocab_size):
    """{arm: (parent run, config)} of a notebook's continued runs (see continued_05); {} if none."""
    if notebook not in EXPERIMENTS:
        raise ValueError(f"notebook must be one of {tuple(EXPERIMENTS)}, got {notebook!r}")
    continued = EXPERIMENTS[notebook].get("continued")
    return continued(base_config(vocab_size)) if continued else {}


def sweep_run_names(notebook, vocab_size):
    """Every run a sweep of `notebook` trains, in the notebook's order: the runs, then the continued ones."""
    return list(experiment_runs(notebook, vocab_size)) + list(continued_runs(notebook, vocab_size))


def seed_sweep(notebook, seeds, device=None, data=None, steps=None, only=None, verbose=True):
    """Train every run of `notebook` (or the runs named in `only`) for every seed; returns
    {"runs": {name: {seed: summary}}, ...}. `steps` overrides the notebook's training steps."""
    data = data or CourseData()
    device = resolve_device(device)
    runs, steps = experiment_runs(notebook, len(data.vocab)), steps or EXPERIMENTS[notebook]["steps"]
    continued = {name: arm for name, arm in continued_runs(notebook, len(data.vocab)).items()
                 if only is None or name in only}
    runs = {name: run for name, run in runs.items() if only is None or name in only}
    eval_every = EXPERIMENTS[notebook]["eval_every"]
    result = {"notebook": notebook, "steps": steps, "eval_every": eval_every, "seeds": list(seeds),
              "machine": {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                          "processor": platform.processor() or platform.machine()},
              "runs": {name: {} for name in [*runs, *continued]}}
    capacity_eval = EXPERIMENTS[notebook].get("capacity_eval", False)

    def record(name, seed, start, model, history, recorder):
        result["runs"][name][str(seed)] = run_summary(model, history, recorder, data,
                                                      capacity_eval and name not in continued)
        if verbose:
            print(f"{notebook} seed {seed} {name:45s} val {history['val_loss'][-1]:.3f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)

    for seed in seeds:
        trained = {}
        for name, (cfg, prepare) in runs.items():
            start = time.perf_counter()
            trained[name] = train_run(cfg, data, seed, steps, eval_every=eval_every, device=device, prepare=prepare)
            record(name, seed, start, *trained[name])
        for name, (parent, cfg) in continued.items():
            start = time.perf_counter()
            if parent not in trained:     # a sweep of this arm alone trains its parent first
                parent_cfg, prepare = experiment_runs(notebook, len(data.vocab))[parent]
                trained[parent] = train_run(parent_cfg, data, seed, steps, eval_every=eval_every, device=device,
                                            prepare=prepare)
            model = start_continued(trained[parent][0], cfg, seed)
            record(name, seed, start, *continue_run(model, data, seed, EXPERIMENTS[notebook]["continue_steps"],
                                                    after=steps, eval_every=EXPERIMENTS[notebook]["continue_steps"],
                                                    device=device))
    return result


def load_sweep(notebook):
    """The stored sweep of a notebook (utils/assets/seed_sweeps/NN.json)."""
    path = SWEEP_DIR / f"{notebook}.json"
    if not path.is_file():
        raise ValueError(f"no stored sweep for notebook {notebook!r}; run python -m utils.experiments {notebook}")
    return json.loads(path.read_text())


def _sweep_one_run(notebook, seed, run, device, threads, steps):
    torch.set_num_threads(threads)
    return seed_sweep(notebook, [seed], device=device, steps=steps, only=[run])


def merge_sweeps(sweeps):
    """One sweep from several sweeps of the same notebook (over other seeds or other runs); the
    runs come in the notebook's order, the seeds in increasing order."""
    for key in ("notebook", "steps", "eval_every"):
        values = {sweep.get(key) for sweep in sweeps}
        if len(values) > 1:
            raise ValueError(f"cannot merge sweeps with different {key!r}: {sorted(map(str, values))}")
    order = sweep_run_names(sweeps[0]["notebook"], vocab_size=1)
    merged = {**sweeps[0], "seeds": sorted({s for sweep in sweeps for s in sweep["seeds"]}),
              "runs": {name: {} for name in order if any(name in sweep["runs"] for sweep in sweeps)}}
    for sweep in sweeps:
        for name, by_seed in sweep["runs"].items():
            merged["runs"][name].update(by_seed)
    for name in merged["runs"]:
        merged["runs"][name] = dict(sorted(merged["runs"][name].items(), key=lambda item: int(item[0])))
    return merged


def main(argv=None):
    parser = argparse.ArgumentParser(description="Seed sweeps of the course's training notebooks.")
    parser.add_argument("notebooks", nargs="+", choices=sorted(EXPERIMENTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(8)))
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes")
    parser.add_argument("--steps", type=int, default=None, help="override the training steps (a quick trial)")
    parser.add_argument("--only", nargs="+", default=None, help="train only these runs (names as in the notebook)")
    parser.add_argument("--out", default=str(SWEEP_DIR), help="folder for NN.json")
    args = parser.parse_args(argv)
    known = {nb: sweep_run_names(nb, 1) for nb in args.notebooks}
    unknown = set(args.only or ()) - {run for runs in known.values() for run in runs}
    if unknown:
        raise ValueError(f"--only: no run named {sorted(unknown)}; the runs are {known}")
    out = pathlib.Path(args.out)
    (out / "by_seed").mkdir(parents=True, exist_ok=True)
    for notebook in args.notebooks:   # parts left from another experiment would be merged with these
        expected = (args.steps or EXPERIMENTS[notebook]["steps"], EXPERIMENTS[notebook]["eval_every"])
        for part in (out / "by_seed").glob(f"{notebook}_seed*.json"):
            found = json.loads(part.read_text())
            if (found.get("steps"), found.get("eval_every")) != expected:
                raise ValueError(f"{part} has steps/eval_every {(found.get('steps'), found.get('eval_every'))}, "
                                 f"not {expected}: move it away or choose another --out")
    data = CourseData()
    tasks = [(notebook, seed, run) for notebook in args.notebooks for seed in args.seeds
             for run in sweep_run_names(notebook, len(data.vocab)) if not args.only or run in args.only]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def save(sweep):   # each (notebook, seed, run) as soon as it is done: an interrupted sweep keeps them
        run = next(iter(sweep["runs"]))
        index = sweep_run_names(sweep["notebook"], len(data.vocab)).index(run)
        (out / "by_seed" / f"{sweep['notebook']}_seed{sweep['seeds'][0]}_run{index}.json").write_text(
            json.dumps(sweep) + "\n")

    if args.jobs > 1:
        import concurrent.futures
        import multiprocessing
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = [pool.submit(_sweep_one_run, *task, args.device, threads, args.steps) for task in tasks]
            for future in concurrent.futures.as_completed(futures):
                save(future.result())
    else:
        for notebook, seed, run in tasks:
            save(seed_sweep(notebook, [seed], device=args.device, data=data, steps=args.steps, only=[run]))
    for notebook in args.notebooks:
        parts = [json.loads(p.read_text()) for p in sorted((out / "by_seed").glob(f"{notebook}_seed*.json"))]
        merged = merge_sweeps(parts)
        (out / f"{notebook}.json").write_text(json.dumps(merged, indent=1) + "\n")


if __name__ == "__main__":
    main()
