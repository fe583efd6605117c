"""Plots the notebooks share: loss curves from `train()` histories, saving figures, and the
schematic drawings of notebooks 05-07 (a dense FeedForward vs an MoE layer, three expert layouts, a
latent MoE)."""
import pathlib

import matplotlib.patches as patches
import matplotlib.pyplot as plt
import torch


def plot_loss_curves(histories, title="Loss", x="step", show_train=True, ax=None):
    """Validation (solid) and training (dashed) loss of one or more runs on one axes.

    histories: {run name: history dict returned by utils.train.train}
    x: "step" or "tokens_seen" for the horizontal axis.
    """
    if x not in ("step", "tokens_seen"):
        raise ValueError(f"x must be 'step' or 'tokens_seen', got {x!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for i, (name, h) in enumerate(histories.items()):
        color = f"C{i}"
        ax.plot(h[x], h["val_loss"], color=color, marker="o", markersize=3, label=f"{name} (val)")
        if show_train:
            # train_loss[0] is NaN (nothing trained yet at step 0); matplotlib leaves it out.
            ax.plot(h[x], h["train_loss"], color=color, linestyle="--", alpha=0.7, label=f"{name} (train)")
    ax.set_xlabel("optimizer step" if x == "step" else "tokens seen")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_loss_shape(ax, histories, from_step=0, smooth=10):
    """Each run's training loss - the LM loss of each step's batch, averaged over the last `smooth`
    steps (a line; runs that share a seed see the same batches) - and its validation loss at each
    evaluation (dots), from step `from_step` on. A run of 120 steps evaluated every 40 has 4
    validation points: the line shows the shape between them. histories: {name: history}."""
    for i, h in enumerate(histories.values()):
        mean = torch.tensor(h["batch_loss"]).unfold(0, smooth, 1).mean(-1)   # at step s: steps s-smooth+1 ... s
        steps = torch.arange(smooth, len(h["batch_loss"]) + 1)
        ax.plot(steps[steps >= from_step], mean[steps >= from_step], color=f"C{i}", lw=1.5)
        val = [(s, v) for s, v in zip(h["step"], h["val_loss"]) if s >= from_step]
        ax.plot(*zip(*val), "o", color=f"C{i}", markersize=7, markeredgecolor="black")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.grid(alpha=0.3)
    return ax


def loss_legend(fig, histories, ncol, smooth=10):
    """One legend for a figure of plot_loss_shape axes, below them: a colour per run, then what the
    lines and the dots are."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i}", lw=2, label=name) for i, name in enumerate(histories)]
    handles += [Line2D([], [], color="gray", lw=1.5, label=f"training loss, mean of the last {smooth} steps"),
                Line2D([], [], color="gray", marker="o", ls="", markeredgecolor="black", label="validation loss")]
    return fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, frameon=False)


def add_full_run_inset(ax, histories, colors=None, bounds=(0.07, 0.08, 0.34, 0.34)):
    """For a loss plot zoomed on the end of training (step 0 off the top): an inset with each run's
    whole validation curve from step 0. histories: {name: history}; colors default to C0, C1, ..."""
    inset = ax.inset_axes(bounds)
    for i, h in enumerate(histories.values()):
        inset.plot(h["step"], h["val_loss"], color=(colors or [f"C{j}" for j in range(len(histories))])[i], lw=1)
    inset.set_title("whole run, from step 0", fontsize=8)
    inset.tick_params(labelsize=7)
    inset.set_xlabel("step", fontsize=7, labelpad=1)
    inset.set_ylabel("val loss", fontsize=7, labelpad=1)
    inset.grid(alpha=0.3)
    return inset


def add_tokens_axis(ax, history):
    """A second x-axis on top: tokens seen, for a plot whose x-axis is the optimizer step (every
    run of a figure sees the same tokens per step)."""
    per_step = history["tokens_seen"][-1] / history["step"][-1]
    top = ax.secondary_xaxis("top", functions=(lambda step: step * per_step, lambda tokens: tokens / per_step))
    top.set_xlabel("tokens seen")
    return top


def save_figure(fig, path, dpi=120):
    """Save `fig` as PNG (creating the folder) and return the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path


# ----------------------------------------------------------------------------------------------
# Schematics: boxes and arrows on an axes running from 0 to 1.

def _box(ax, x, y, w, h, text, color, alpha=1.0, pad=0.02):
    """A rounded box of width w and height h centred on (x, y), with text inside."""
    ax.add_patch(patches.FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=f"round,pad={pad}",
                                        facecolor=color, edgecolor="black", alpha=alpha))
    ax.text(x, y, text, ha="center", va="center", fontsize=9)


def _arrow(ax, x0, y0, x1, y1, **kw):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", **kw))


def _residual(ax, x_from, y_from, x_side, y_to, x_to):
    """The residual path: from the input box's side, up along x = x_side, into the output's '+'."""
    ax.plot([x_from, x_side, x_side], [y_from, y_from, y_to], color="gray", lw=1.2)
    _arrow(ax, x_side, y_to, x_to, y_to, color="gray")
    ax.text(x_side + 0.01, (y_from + y_to) / 2, "residual", rotation=90, va="center", fontsize=8, color="gray")


def draw_moe_schematic(n_experts=8, chosen=(2, 5), gates=(0.62, 0.38)):
    """Notebook 05: one token through a dense FeedForward (left) and through an MoE layer whose
    router picks the experts `chosen` with weights `gates` (right). In both, the block adds the
    layer's output to the token's own vector (the residual)."""
    fig, (ax_d, ax_m) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [1, 2.2]})
    _box(ax_d, 0.45, 0.06, 0.5, 0.08, "token x (D)", "#ddeeff")
    _box(ax_d, 0.45, 0.45, 0.5, 0.22, "FeedForward\nD -> 4D -> D", "#ffe0b0")
    _box(ax_d, 0.45, 0.92, 0.5, 0.08, "x + FFN(x) (D)", "#ddeeff")
    _arrow(ax_d, 0.45, 0.10, 0.45, 0.33)
    _arrow(ax_d, 0.45, 0.57, 0.45, 0.87)
    _residual(ax_d, 0.70, 0.06, 0.85, 0.92, 0.71)
    ax_d.set_title("dense: every token, one MLP")

    k = len(chosen)
    xs = [0.1 + i * 0.72 / (n_experts - 1) for i in range(n_experts)]
    _box(ax_m, 0.46, 0.06, 0.2, 0.08, "token x (D)", "#ddeeff")
    _box(ax_m, 0.1, 0.27, 0.16, 0.1, f"router\nsoftmax(x W_g)\nkeep top-{k}", "#e8d8ff")
    _arrow(ax_m, 0.40, 0.08, 0.17, 0.21)
    for i, x in enumerate(xs):
        on = i in chosen
        _box(ax_m, x, 0.52, 0.06, 0.16, f"expert\n{i}", "#ffe0b0" if on else "#eeeeee", 1.0 if on else 0.6)
        if on:
            _arrow(ax_m, 0.46, 0.10, x, 0.43, color="black")                     # the token goes to it
            _arrow(ax_m, 0.18, 0.29, x - 0.03, 0.44, color="purple", linestyle="--")  # chosen by the router
            _arrow(ax_m, x, 0.61, 0.46, 0.73, color="black")                      # its output, weighted
            gate = gates[chosen.index(i)]
            mx, my = (x + 0.46) / 2, 0.67
            ax_m.text(mx + (0.015 if x > 0.46 else -0.015), my, f"x {gate:.2f}", fontsize=9, color="purple",
                      ha="left" if x > 0.46 else "right", va="center")
    _box(ax_m, 0.46, 0.77, 0.32, 0.07, "sum of gate x expert output (D)", "#ffe0b0")
    _box(ax_m, 0.46, 0.93, 0.32, 0.07, "x + MoE(x) (D)", "#ddeeff")
    _arrow(ax_m, 0.46, 0.81, 0.46, 0.89)
    _residual(ax_m, 0.56, 0.06, 0.93, 0.93, 0.63)
    ax_m.text(0.1, 0.15, "dashed: the router's choice;\nit also gives the gate weights", fontsize=8,
              color="purple", ha="center")
    ax_m.set_title(f"MoE: the router picks k={k} of E={n_experts} experts per token; the other "
                   f"{n_experts - k} are skipped")
    for ax in (ax_d, ax_m):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.axis("off")
    fig.tight_layout()
    return fig


def draw_expert_layouts(rows, seed=3):
    """Notebook 06: one row per layout (label, routed experts, top-k, shared experts); the experts a
    token uses (chosen at random with `seed`) are coloured, the shared ones always."""
    fig, ax = plt.subplots(figsize=(12, 3.6))
    rng = torch.Generator().manual_seed(seed)
    for r, (label, n_routed, k, n_shared) in enumerate(rows):
        y = len(rows) - 1 - r
        width = 1.0 / (n_routed + n_shared) if r else 1.0 / n_routed
        chosen = set(torch.randperm(n_routed, generator=rng)[:k].tolist())
        for i in range(n_shared + n_routed):
            shared = i < n_shared
            used = shared or (i - n_shared) in chosen
            color = "#7fb3ff" if shared else ("#ffb347" if used else "#eeeeee")
            ax.add_patch(patches.Rectangle((i * width, y), width * 0.9, 0.6, facecolor=color, edgecolor="gray"))
        ax.text(-0.02, y + 0.3, label, ha="right", va="center", fontsize=10)
    for x, color, text in [(0, "#ffb347", "routed expert used by this token"),
                           (0.38, "#7fb3ff", "shared expert (every token)"),
                           (0.7, "#eeeeee", "routed expert not used")]:
        ax.add_patch(patches.Rectangle((x, -0.6), 0.03, 0.3, facecolor=color,
                                       edgecolor="gray" if color == "#eeeeee" else None))
        ax.text(x + 0.04, -0.45, text, va="center", fontsize=9)
    ax.set_xlim(-0.45, 1.0)
    ax.set_ylim(-0.8, len(rows) - 0.2)
    ax.axis("off")
    ax.set_title("Same total parameters, same active parameters, three layouts")
    fig.tight_layout()
    return fig


def draw_latent_schematic():
    """Notebook 07: a latent MoE - router and shared expert on the full x (d), routed experts in ℓ."""
    fig, ax = plt.subplots(figsize=(12, 5))
    box = lambda x, y, w, h, text, color: _box(ax, x, y, w, h, text, color, pad=0.01)  # noqa: E731
    arrow = lambda x0, y0, x1, y1: _arrow(ax, x0, y0, x1, y1)                           # noqa: E731
    box(0.08, 0.5, 0.12, 0.1, "x  (d)", "#ddeeff")
    box(0.3, 0.85, 0.2, 0.1, "router on full x (d)\nsigmoid, top-k", "#e8d8ff")
    box(0.3, 0.5, 0.16, 0.1, "down-proj d -> ℓ", "#c8f0c8")
    box(0.3, 0.15, 0.2, 0.1, "shared expert on full x (d)", "#7fb3ff")
    for i, y in enumerate([0.7, 0.58, 0.46, 0.34]):
        box(0.55, y, 0.13, 0.08, f"expert {i}: ℓ -> F -> ℓ", "#ffe0b0" if i in (0, 2) else "#eeeeee")
    box(0.75, 0.5, 0.12, 0.1, "weighted\nsum in ℓ", "#ffe0b0")
    box(0.75, 0.28, 0.12, 0.08, "up-proj ℓ -> d", "#c8f0c8")
    box(0.93, 0.28, 0.1, 0.1, "+  ->  out (d)", "#ddeeff")
    for x0, y0, x1, y1 in [(0.14, 0.52, 0.2, 0.84), (0.14, 0.5, 0.22, 0.5), (0.14, 0.48, 0.2, 0.16),
                           (0.38, 0.5, 0.485, 0.7), (0.38, 0.5, 0.485, 0.46), (0.4, 0.84, 0.55, 0.75),
                           (0.615, 0.7, 0.69, 0.52), (0.615, 0.46, 0.69, 0.49), (0.75, 0.45, 0.75, 0.32),
                           (0.81, 0.28, 0.88, 0.28), (0.4, 0.15, 0.91, 0.23)]:
        arrow(x0, y0, x1, y1)
    ax.text(0.47, 0.8, "gates", fontsize=8, color="purple")
    ax.text(0.35, 0.36, "only ℓ values per token\nare sent to each expert", fontsize=8, color="darkgreen")
    ax.set_xlim(0, 1)
    ax.set_ylim(0.05, 0.95)
    ax.axis("off")
    ax.set_title("Latent MoE: routing and the shared expert see d; the routed experts work in ℓ < d")
    ax.text(0.5, 0.06, "d: model width (hidden_size)    ℓ: latent width (moe_latent_size)    "
            "F: an expert's hidden width (moe_intermediate_size)", ha="center", fontsize=8)
    fig.tight_layout()
    return fig
