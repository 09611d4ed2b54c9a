"""The loss log of a run: ``loss.csv`` beside the adapter (and TensorBoard where installed), and its plot."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.pyplot as plt

from bwl.core.atomic import atomic_path


class LossLog:
    """Loss per logged step to ``loss.csv`` (truncated to the resume step) and to TensorBoard when installed."""

    def __init__(self, out: Path, start: int):
        self.path = out / "loss.csv"
        rows = []
        if start and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr"])
            writer.writeheader()
            writer.writerows(rows)
        self.file = open(self.path, "a", newline="")  # noqa: SIM115 (open for the run, closed by close())
        self.writer = csv.writer(self.file)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            self.tensorboard = None

    def write(self, step: int, loss: float, lr: float) -> None:
        self.writer.writerow([step, f"{loss:.6f}", f"{lr:.3e}"])
        self.file.flush()
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss", loss, step)
            self.tensorboard.add_scalar("lr", lr, step)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_losses(csv_path: str | Path) -> list[tuple[int, float]]:
    """(step, loss) pairs of a run's ``loss.csv``; empty if it has none yet."""
    if not Path(csv_path).exists():
        return []
    with open(csv_path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def plot_loss_curve(csv_path: str | Path, ax=None, label: str | None = None):
    """Plot ``loss.csv`` written by training; returns the matplotlib axes."""
    losses = read_losses(csv_path)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    ax.plot([s for s, _ in losses], [v for _, v in losses], label=label or Path(csv_path).parent.name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    return ax
