"""A training run's outputs besides checkpoints: metrics.jsonl and curves.png."""

from __future__ import annotations

import json
import os


def read_metrics(path: str, upto: int) -> list[dict]:
    """The records of epochs 1..upto; a line cut short by a crash (the last, unparseable) is dropped."""
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] <= upto:
                    out.append(r)
    return out


def curves_figure(records: list[dict], title: str | None = None):
    """Loss and accuracy against epoch (integer ticks): train in one colour, test in another, in both panels."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [r["epoch"] for r in records]
    colour = {"train": "C0", "test": "C1"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [r["train_loss"] for r in records], "o-", color=colour["train"], label="train (running)")
    a1.plot(ep, [r["test_loss"] for r in records], "o-", color=colour["test"], label="test")
    a1.set_ylabel("cross-entropy")
    a1.set_yscale("log")
    a2.plot(ep, [100 * r["train_accuracy"] for r in records], "o-", color=colour["train"], label="train (running)")
    a2.plot(ep, [100 * r["test_accuracy"] for r in records], "o-", color=colour["test"], label="test")
    a2.set_ylabel("accuracy (%)")
    for ax in (a1, a2):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(records: list[dict], path: str, title: str | None = None) -> None:
    """``curves_figure`` written to ``path`` as a PNG (atomically: temp file, then rename)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(records, title)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
