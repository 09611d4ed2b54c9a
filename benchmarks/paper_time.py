"""How long the ``paper`` profile's adapters take to train on a GPU, from the training benchmark's measured steps per
second (``benchmarks/results/train-cuda.csv``) and the profile's steps and grids: written to
``benchmarks/results/paper-time.md``, which the book's getting-started page includes.

    python benchmarks/paper_time.py
"""

from __future__ import annotations

import csv
from pathlib import Path

from bwl.core.atomic import write_text
from bwl.study.design.profile import load_profile
from bwl.study.design.vocabulary import GRIDS, adapters_of

RESULTS = Path(__file__).resolve().parent / "results"


def paper_time(measured: Path = RESULTS / "train-cuda.csv", out: Path = RESULTS / "paper-time.md") -> Path:
    profile = load_profile("paper")
    steps = profile.train["steps"]
    adapters = len(adapters_of([GRIDS[name] for name in profile.grids]))
    with open(measured, newline="") as f:
        rows = [r for r in csv.DictReader(f) if " b2 " in f" {r['setting']} "]
    with open(measured.with_suffix(".md")) as f:
        source = f.readline().strip()
    lines = [f"Training time of the `paper` profile ({steps:,} steps per adapter, {adapters} adapters for the four "
             f"grids), from the steps per second of `{measured.name}` at batch 2, 512 px. {source}", "",
             "| setting | steps/s | one adapter | all adapters |", "|---|---|---|---|"]
    for row in rows:
        rate = float(row["bwl steps/s"])
        one = steps / rate / 60
        lines.append(f"| {row['setting']} | {rate:.2f} | {one:.0f} min | {one * adapters / 60:.1f} h |")
    return write_text(out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    print(paper_time().read_text())
