import matplotlib

matplotlib.use("Agg")

import matplotlib.patches as patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from utils.plotting import (draw_expert_layouts, draw_latent_schematic, draw_moe_schematic,  # noqa: E402
                            loss_legend, plot_loss_curves, plot_loss_shape, save_figure)


def test_moe_schematic_colours_the_chosen_experts():
    fig = draw_moe_schematic(n_experts=6, chosen=(1, 4), gates=(0.7, 0.3))
    moe_axes = fig.axes[1]
    boxes = [p for p in moe_axes.patches if isinstance(p, patches.FancyBboxPatch)]
    assert len(boxes) == 6 + 4                                  # the experts, the token, router, sum, output
    chosen_colour = [b.get_facecolor() for b in boxes if b.get_facecolor()[:3] == (1.0, 224 / 255, 176 / 255)]
    assert len(chosen_colour) == 2 + 1                          # the two chosen experts and the weighted sum
    assert "k=2 of E=6" in moe_axes.get_title()
    texts = [t.get_text() for t in moe_axes.texts]
    assert "x 0.70" in texts and "x 0.30" in texts
    plt.close(fig)


def test_expert_layouts_draw_one_box_per_expert():
    rows = [("a", 4, 1, 0), ("b", 8, 2, 0), ("c", 6, 2, 2)]
    fig = draw_expert_layouts(rows)
    rectangles = [p for p in fig.axes[0].patches if isinstance(p, patches.Rectangle)]
    assert len(rectangles) == 4 + 8 + 8 + 3                     # experts of every row, then the legend
    plt.close(fig)


def test_latent_schematic_and_saving(tmp_path):
    fig = draw_latent_schematic()
    path = save_figure(fig, tmp_path / "sub" / "latent.png")
    assert path.is_file() and path.stat().st_size > 1000
    plt.close(fig)


def test_loss_curves_reject_an_unknown_axis():
    with pytest.raises(ValueError, match="tokens_seen"):
        plot_loss_curves({}, x="time")


def test_loss_shape_draws_the_moving_average_and_the_validation_points():
    history = {"batch_loss": [float(i) for i in range(30)], "step": [0, 15, 30], "val_loss": [9.0, 6.0, 5.0]}
    fig, ax = plt.subplots()
    plot_loss_shape(ax, {"run": history}, from_step=12, smooth=10)
    line, dots = ax.lines
    assert list(line.get_xdata()) == list(range(12, 31))          # the first full window ends at step 10
    assert line.get_ydata()[0] == pytest.approx(sum(range(2, 12)) / 10)   # steps 3..12 are batch_loss[2:12]
    assert list(dots.get_xdata()) == [15, 30] and list(dots.get_ydata()) == [6.0, 5.0]
    legend = loss_legend(fig, {"run": history}, ncol=1, smooth=10)
    assert [t.get_text() for t in legend.get_texts()] == ["run", "training loss, mean of the last 10 steps",
                                                        "validation loss"]
    plt.close(fig)
