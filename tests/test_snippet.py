"""Copying the MoE layer into another project works: the files the README names, alone in a folder
outside the course, train a model in a plain training loop that adds the balancing loss itself."""
import pathlib
import shutil
import subprocess
import sys
import textwrap

from utils.course import ROOT

# What the README's "Using an MoE layer in your own project" tells a learner to copy.
SNIPPET_FILES = ("config.py", "router.py", "experts.py", "moe.py")
BALANCING_LINE = "loss = loss + sum(m.aux_loss for m in model.modules() if isinstance(m, MoEFeedForward))"

LOOP = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])           # the learner's project: only the copied package
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from mymoe.moe import MoEFeedForward, make_moe

    class TinyLM(nn.Module):                  # a nanoGPT-style model without attention, for brevity
        def __init__(self, cfg):
            super().__init__()
            self.emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
            self.norm = nn.LayerNorm(cfg["emb_dim"])
            self.ff = MoEFeedForward(cfg)
            self.head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"])

        def forward(self, idx):
            x = self.emb(idx)
            return self.head(x + self.ff(self.norm(x)))

    torch.manual_seed(0)
    cfg = {"vocab_size": 32, "emb_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_hidden_dim": 32}
    model = TinyLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 32, (8, 17))
    losses = []
    for step in range(30):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        losses.append(loss.item())
        BALANCING_LINE
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # The balancing loss alone reaches the router's weight through the layer's probabilities.
    model(data[:, :-1])
    balancing = model.ff.aux_loss
    grad = torch.autograd.grad(balancing, model.ff.router.gate.weight)[0]
    assert balancing.item() > 0 and grad.abs().sum() > 0, (balancing, grad)
    assert losses[-1] < losses[0] - 0.1, losses

    # The other variants the copied files build: latent, gated shared expert, capacity, loop dispatch.
    variant = make_moe({**cfg, "latent_dim": 8, "num_shared_experts": 1, "shared_expert_gate": True,
                        "capacity_factor": 1.0, "moe_dispatch": "loop", "router_type": "sigmoid",
                        "seq_aux_loss_coef": 0.01, "z_loss_coef": 0.001})
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = variant(x)
    (y.pow(2).mean() + variant.aux_loss).backward()
    assert y.shape == x.shape and x.grad is not None and variant.last_routing["dropped_fraction"] >= 0
    print("trained", round(losses[0], 3), "->", round(losses[-1], 3))
''').replace("BALANCING_LINE", BALANCING_LINE)


def test_copied_moe_layer_trains_in_a_plain_loop(tmp_path):
    package = tmp_path / "project" / "mymoe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in SNIPPET_FILES:
        shutil.copy(ROOT / "utils" / name, package / name)
    script = tmp_path / "train.py"
    script.write_text(LOOP)
    # -I: no PYTHONPATH, no user site, not the course's folder on the path; cwd outside the course.
    run = subprocess.run([sys.executable, "-I", str(script), str(package.parent)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trained" in run.stdout


def test_snippet_files_import_only_each_other_torch_and_the_standard_library():
    """Also imports inside functions, which the training script above might not reach."""
    import ast

    allowed_relative = {name[:-3] for name in SNIPPET_FILES}
    for name in SNIPPET_FILES:
        tree = ast.parse((ROOT / "utils" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module in allowed_relative, f"{name} imports .{node.module}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in modules:
                    top = module.split(".")[0]
                    assert top == "torch" or top in sys.stdlib_module_names, f"{name} imports {module}"


def test_readme_names_the_snippet_files_and_the_line():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using an MoE layer in your own project"):]
    section = section[:section.find("\n## ", 3)] if "\n## " in section[3:] else section
    assert all(f"utils/{name}" in section for name in SNIPPET_FILES), SNIPPET_FILES
    assert BALANCING_LINE in section
    assert pathlib.Path(__file__).name in section
