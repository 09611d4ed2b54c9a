"""The replicated design's statistics on small tables with known answers."""

import math

import numpy as np
import pytest

from bwl.study.scoring.statistics import bootstrap_means, hierarchical_bootstrap, holm, pooled_mean


def test_pooled_mean_weighs_each_pair_and_seed_equally():
    table = {"a": {0: [1.0, 1.0, 1.0, 1.0], 1: [3.0]}, "b": {0: [10.0]}}
    assert pooled_mean(table) == pytest.approx(((1 + 3) / 2 + 10) / 2)


def test_a_constant_effect_has_a_zero_width_interval():
    table = {pair: {seed: [0.25] * 4 for seed in range(3)} for pair in "abc"}
    effect = hierarchical_bootstrap(table, resamples=200)
    assert (effect.mean, effect.low, effect.high) == pytest.approx((0.25, 0.25, 0.25))
    assert effect.p == pytest.approx(2 / 201) and effect.excludes_zero()  # the smallest p 200 resamples give
    assert (effect.pairs, effect.seeds, effect.images) == (3, 9, 36)


def test_between_pair_spread_sets_the_interval():
    """Pairs at 0, 1 and 2, identical within: the pooled mean of 3 pairs drawn with replacement has variance
    var({0, 1, 2}) / 3 = (2/3) / 3, whatever the many images say."""
    table = {str(v): {s: [float(v)] * 50 for s in range(3)} for v in (0, 1, 2)}
    draws = bootstrap_means(table, resamples=4000, seed=1)
    assert draws.mean() == pytest.approx(1.0, abs=0.03)
    assert draws.std() == pytest.approx(math.sqrt(2 / 9), rel=0.06)
    # Sums of three draws from {0, 1, 2} fall on 0..6 with counts 1, 3, 6, 7, 6, 3, 1 (of 27): P(mean = 0) = 1/27 >
    # 2.5 %, so the percentile interval runs from 0 to 2 and does not exclude zero.
    effect = hierarchical_bootstrap(table, resamples=4000, seed=1)
    assert (effect.low, effect.high) == pytest.approx((0.0, 2.0)) and not effect.excludes_zero()
    naive = np.concatenate([images for seeds in table.values() for images in seeds.values()])
    assert 1.96 * naive.std(ddof=1) / math.sqrt(len(naive)) < (effect.high - effect.low) / 4  # images alone: too narrow


def test_seeds_are_resampled_within_pairs():
    """One pair whose two seeds disagree (0 and 1, no image noise): the pooled mean is the mean of two seeds drawn
    with replacement, 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4."""
    draws = bootstrap_means({"a": {0: [0.0] * 5, 1: [1.0] * 5}}, resamples=4000, seed=2)
    values, counts = np.unique(draws, return_counts=True)
    assert values.tolist() == [0.0, 0.5, 1.0]
    assert (counts / counts.sum()).tolist() == pytest.approx([0.25, 0.5, 0.25], abs=0.03)


def test_an_empty_cell_of_the_design_is_named():
    with pytest.raises(ValueError, match="'b'"):
        hierarchical_bootstrap({"a": {0: [1.0]}, "b": {0: []}})


def test_holm_on_known_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.01]) == pytest.approx([0.01])  # one test: unchanged
    assert holm([0.02, 0.02]) == pytest.approx([0.04, 0.04])  # ties


def _smoke(tmp_path, **overrides):
    from bwl.study import load_profile

    values = {"runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "figures"), "metrics": "none",
              "grids": ["fig4b"], "seeds": [0], **overrides}
    return load_profile("smoke", values)


def test_the_training_seed_is_part_of_the_adapter_key(tmp_path):
    """Two seeds: two runs, each recording its seed; the same seed again: the same run, reused."""
    from bwl.study import Study
    from bwl.study.design.vocabulary import style

    profile = _smoke(tmp_path, train_seeds=[0, 1])
    key = style("lora", "upper")
    first, second = Study(profile), Study(profile, train_seed=1)
    first.prepare_data()
    assert first.train_seed == 0 and first.train_config(key).seed == 0 and second.train_config(key).seed == 1
    assert first.train_config(key).output_dir != second.train_config(key).output_dir
    assert "_s1-" in second.train_config(key).output_dir  # the folder names the seed
    trained = second.train_all([key])
    stamp = trained[key].stat().st_mtime_ns
    again = Study(profile, train_seed=1).train_all([key])
    assert again[key] == trained[key] and again[key].stat().st_mtime_ns == stamp  # reused, not retrained
    with pytest.raises(Exception, match="train_seeds"):
        _smoke(tmp_path, train_seeds=[1, 1])


def test_the_training_length_study_trains_each_adapter_once_and_pools_over_seeds(tmp_path):
    import csv

    from bwl.study.experiments.lengths import run_lengths

    profile = _smoke(tmp_path, metrics="probe", methods=["lora"], train_lengths=[2, 4], train_seeds=[0, 1],
                     prompts=["zkc, qrv, sky background"], seeds=[0, 1])
    lines = []
    out = run_lengths(profile, lines.append)
    # per seed: the identity once (shared by both lengths), the style on all and on upper at each length
    assert "adapters: 0 of 12 reused (same config and data), 10 to train" in lines, lines
    assert len(list((tmp_path / "runs" / "adapters").glob("*/adapter.safetensors"))) == 10
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["steps"], r["seed"], r["cell"]) for r in rows) == sorted(
        (str(n), str(s), c) for n in (2, 4) for s in (0, 1)
        for c in ("full ID + full style", "full ID + upper-trained style"))
    assert all(int(r["style_n"]) == 2 for r in rows)  # both images carry the style trigger
    table = (out.parent / "lengths.md").read_text()
    assert table.count("| lora |") == 2 and (out.parent / "lengths.png").stat().st_size > 10_000
    lines.clear()
    run_lengths(profile, lines.append)
    assert "adapters: 12 of 12 reused (same config and data), 0 to train" in lines, lines


def test_instrument_accuracy_by_hand():
    from bwl.study.experiments.eyecheck import accuracy

    result = accuracy(["checker", "checker", "none", "none"], [0.9, 0.1, 0.2, 0.7], threshold=0.5)
    assert result == {"accuracy": 0.5, "sensitivity": 0.5, "specificity": 0.5}


def test_the_eye_checked_sheet_is_complete_and_both_instruments_are_scored_on_it():
    """The committed sheet: at least 100 images, every one labelled, and each instrument's accuracy against the eye
    as the README reports it (a change to an instrument that loses accuracy shows here)."""
    from pathlib import Path

    from bwl.study.experiments.eyecheck import PROBE_THRESHOLD, TEXTURE_THRESHOLD, accuracy, load_sheet, readings

    sheet = Path(__file__).resolve().parents[1] / "figures" / "eye-check"
    images, rows = load_sheet(sheet)
    labels = [r["label"] for r in rows]
    assert len(images) >= 100 and min(labels.count("checker"), labels.count("none")) >= 30
    found = readings(images)
    # measured here: probe 0.71, probe-resnet 0.72, probe-patch 0.69, their mean 0.73, texture 0.78; a few images
    # near a threshold may read otherwise on another CPU's kernels
    measured = {"probe": 0.71, "probe-resnet": 0.72, "probe-patch": 0.69, "probes (mean)": 0.73}
    for name, value in measured.items():
        assert accuracy(labels, found[name], PROBE_THRESHOLD)["accuracy"] >= value - 0.05, name
    assert accuracy(labels, found["texture"], TEXTURE_THRESHOLD)["accuracy"] >= 0.72


def test_a_sheet_is_drawn_from_partial_cells_only(tmp_path):
    from PIL import Image

    from bwl.study.experiments.eyecheck import load_sheet, write_sample
    from bwl.study.running.cells import CellStore

    store = CellStore(tmp_path / "cells")
    image = Image.new("RGB", (32, 32), (200, 100, 50))
    for key, style_level in (("partial", 0.5), ("full", 1.0), ("absent", 0.0)):
        description = {"cell": key, "adapters": {}, "prompts": ["zkc, qrv, sky background", "circle"],
                       "seeds": [0, 1, 2]}
        scores = [{"style": style_level}] * 3 + [{}] * 3
        store.save(key, [image] * 6, description, scores)
    labels = write_sample(store, tmp_path / "sheet", per_cell=2)
    text = labels.read_text().splitlines()
    assert len(text) == 3 and all(",partial," in line for line in text[1:])  # two images, from the partial cell
    assert all(int(line.split(",")[2]) < 3 for line in text[1:])  # with the style trigger
    assert (tmp_path / "sheet" / "sheet-1.png").exists()
    with pytest.raises(Exception, match="without a label"):
        load_sheet(tmp_path / "sheet")


def test_a_verdict_is_robust_only_under_every_toy_instrument():
    from bwl.study.design.vocabulary import METRICS, Metric
    from bwl.study.scoring.findings import CLAIMS, findings_by_family, robustness
    from bwl.study.scoring.metrics import Estimate
    from bwl.study.scoring.results import CellResult

    assert robustness({"probe": "beats", "texture": "beats", "reference": "tie"}) == "robust"
    assert robustness({"probe": "beats", "texture": "tie"}) == "instrument-dependent"
    assert robustness({"probe": "beats"}) == ""  # one instrument cannot be robust or not

    def result(grid, cell, style, texture):
        values = {Metric.IDENTITY: 0.5, Metric.STYLE: style, Metric.STYLE_TEXTURE: texture}
        return CellResult(grid, cell, "k", {m: Estimate(values.get(m, 0.5), 0.01, 40) if m in values
                                            else Estimate(float("nan"), float("nan"), 0) for m in METRICS})

    compared = {(grid, cell) for claim in CLAIMS for grid, *cells in claim.pairs for cell in cells}
    rows = [result(grid, cell, 0.5, 0.5) for grid, cell in sorted(compared)]
    c2 = CLAIMS[1].pairs[0]  # the probe sees C2's first comparison won on style; the texture statistic sees a tie
    rows = [result(r.grid, r.cell, 0.9 if (r.grid, r.cell) == c2[:2] else 0.5, 0.5) for r in rows]
    text = findings_by_family(rows)
    line = next(row for row in text.splitlines() if f"{c2[0]}: {c2[1]} vs {c2[2]}" in row)
    assert line.split("|")[3:6] == [" beats ", " tie ", " instrument-dependent "], line
    c1 = next(row for row in text.splitlines() if row.startswith("| **C1**"))
    assert "**robust**" in c1  # ties under both instruments


def test_two_launched_processes_share_the_adapters_and_cells(tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo) on the smoke profile: every adapter is trained exactly once,
    by one of the two, the tables are written once, and a rerun reuses everything by key."""
    import re
    import subprocess
    import sys

    settings = ["runs_dir=" + str(tmp_path / "runs"), "figures_dir=" + str(tmp_path / "figures"), "metrics=probe",
                "methods=[lora]", "train_lengths=[2,4]", "train_seeds=[0,1]", "seeds=[0,1]",
                "prompts=['zkc, qrv, sky background']"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "bwl", "lengths", "--profile", "smoke", *[arg for s in settings for arg in ("--set", s)]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "process 0 of 2" in output and "process 1 of 2" in output, output[-3000:]
    trained = re.findall(r"\] (\S+(?: \(\d+ steps\))?): trained", output)  # steps named where the run sets them
    assert len(trained) == len(set(trained)) == 10, trained  # each of the 10 adapters once
    assert len(list((tmp_path / "runs" / "adapters").glob("*/adapter.safetensors"))) == 10
    rows = (tmp_path / "figures" / "lengths" / "lengths.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2  # header, then lengths x seeds x cells, written once
    again = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0 and "trained" not in again.stdout, again.stdout[-2000:]


def _replicate_cells(style_texture_gap: float, pairs=("zkc+qrv", "star+dots", "heart+hatch"), seeds=(0, 1, 2)):
    """Synthetic replicates in which C1's cell has identity +0.2 and style +0.1 over the cells it is compared with,
    under every probe; the texture statistic sees ``style_texture_gap`` instead; every other cell is alike."""
    from bwl.study.scoring.pooled import ROWS, ReplicateCells
    from bwl.toy.assets import INSTRUMENTS

    def image(identity: float, style: float, texture: float, noise: float) -> dict[str, float]:
        values = {"identity": identity + noise, "style": style + noise, "preservation": 0.9 + noise,
                  "style_texture": texture + noise, "ref_identity": 0.5, "ref_style": 0.5, "ref_preservation": 0.5}
        for name in (i.name for i in INSTRUMENTS):
            values |= {f"identity@{name}": identity + noise, f"style@{name}": style + noise,
                       f"preservation@{name}": 0.9 + noise}
        return values

    found = []
    for p_index, pair in enumerate(pairs):
        for seed in seeds:
            rng = np.random.default_rng([p_index, seed])
            noise = rng.normal(0, 0.01, 6)
            scores = {}
            for row in ROWS:
                for label in (row.cell, row.other):
                    scores[(row.grid, label)] = [image(0.5, 0.4, 0.4, n) for n in noise]
            for row in ROWS:
                if row.group == "C1":
                    scores[(row.grid, row.cell)] = [image(0.7, 0.5, 0.4 + style_texture_gap, n) for n in noise]
            found.append(ReplicateCells(pair, seed, scores))
    return found


def test_pooled_effects_of_a_known_design_and_their_replicate_counts():
    from bwl.study.design.vocabulary import Metric
    from bwl.study.scoring.pooled import ROWS, decide
    from bwl.study.scoring.statistics import ALPHA

    decided = decide(_replicate_cells(style_texture_gap=0.1), resamples=300)
    c1 = next(r for r in ROWS if r.group == "C1")
    effects = decided.of(c1, "probes")
    assert effects[Metric.IDENTITY].pooled.mean == pytest.approx(0.2)
    assert effects[Metric.IDENTITY].pooled.low == pytest.approx(0.2) and effects[Metric.IDENTITY].pooled.pairs == 3
    assert effects[Metric.IDENTITY].pooled.seeds == 9 and effects[Metric.IDENTITY].pooled.images == 54
    assert effects[Metric.STYLE].pooled.mean == pytest.approx(0.1)
    assert effects[Metric.IDENTITY].replicate_signs == [1] * 9
    assert decided.verdict(c1, "probes") == "beats"
    # 300 resamples: the smallest p is 2/301, and Holm over the reading's 36 tests lifts it above 0.05
    assert effects[Metric.IDENTITY].p_holm > ALPHA and decided.verdict(c1, "probes", ALPHA) == "tie"
    assert all(decided.verdict(c1, name) == "beats" for name in decided.toy)
    assert decided.robustness({n: decided.verdict(c1, n) for n in decided.names}) == "robust"
    assert set(effects[Metric.IDENTITY].per_pair) == {"zkc+qrv", "star+dots", "heart+hatch"}


def test_a_replicated_verdict_that_one_instrument_does_not_share_is_instrument_dependent(tmp_path):
    import csv

    from bwl.study.scoring.pooled import ROWS, decide, write_pooled

    cells = _replicate_cells(style_texture_gap=-0.3)
    decided = decide(cells, resamples=300)
    c1 = next(r for r in ROWS if r.group == "C1")
    assert decided.verdict(c1, "probes") == "beats" and decided.verdict(c1, "texture") == "trade-off"
    assert decided.robustness({n: decided.verdict(c1, n) for n in decided.names}) == "instrument-dependent"
    path = write_pooled(cells, tmp_path, "replicate", resamples=3000)
    rows = list(csv.DictReader(path.read_text().splitlines()))
    pooled = [r for r in rows if r["pair"] == "pooled" and r["group"] == "C1" and r["reading"] == "probes"
              and r["metric"] in ("identity", "style")]
    assert pooled and all(r["replicates"] == "9" and float(r["p_holm"]) <= 0.05 for r in pooled)
    assert {r["row_verdict"] for r in pooled} == {r["row_verdict_holm"] for r in pooled} == {"beats"}
    text = (tmp_path / "replicate" / "replicate.md").read_text()
    assert "instrument-dependent" in text and "9/9" in text
    assert {p.name for p in (tmp_path / "replicate").glob("forest-*.png")} == {
        "forest-C1.png", "forest-C2.png", "forest-C3.png", "forest-interference.png"}


def test_the_replicated_study_runs_every_pair_and_seed_and_reuses_by_key(tmp_path):
    """Two pairs x two training seeds on the smoke model: each pair's data in its own folders, each adapter keyed by
    pair and seed, one results table per replicate, the pooled table over both pairs; a rerun trains nothing."""
    import csv

    from bwl.study.experiments.replicate import replicates, run_replicate

    profile = _smoke(tmp_path, pairs=["zkc+qrv", "star+dots"], train_seeds=[0, 1], metrics="probe",
                     grids=["fig4b"], model=str(tmp_path / "tiny-sd"))
    path = run_replicate(profile)
    data = tmp_path / "runs" / "data"
    assert {p.name for p in data.iterdir() if p.is_dir()} >= {"identity", "style", "identity-star", "style-dots"}
    adapters = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "runs" / "adapters").iterdir()}
    assert {"id_locon_all", "id_locon_all_s1", "id_locon_all_star", "id_locon_all_star_s1",
            "style_locon_upper_dots_s1"} <= adapters
    tables = sorted(p.parent.name for p in (tmp_path / "figures" / "replicate").glob("*/results.csv"))
    assert tables == ["star-dots-s0", "star-dots-s1", "zkc-qrv-s0", "zkc-qrv-s1"]
    rows = list(csv.DictReader(path.read_text().splitlines()))
    pooled = [r for r in rows if r["group"] == "C3" and r["pair"] == "pooled" and r["reading"] == "probes"]
    assert pooled and all(r["pairs"] == "2" and r["replicates"] == "4" for r in pooled)
    assert {r["pair"] for r in rows} == {"pooled", "zkc+qrv", "star+dots"}
    text = (tmp_path / "figures" / "replicate" / "replicate.md").read_text()  # only fig4b ran: C3's rows alone
    assert "| **C3** |" in text and "| C1 |" not in text and "****" not in text
    assert "left out: fig2, fig3, fig4a's rows" in text
    trained = len(adapters)
    lines = []
    run_replicate(profile, lines.append)
    assert "adapters: 20 of 20 reused (same config and data), 0 to train" in lines, lines
    assert len(list((tmp_path / "runs" / "adapters").iterdir())) == trained
    assert len(replicates(profile)) == 4


def test_each_probe_metric_is_the_probes_mean_with_their_spread_beside_it():
    import torch
    from PIL import Image

    from bwl.study.scoring.metrics import INSTRUMENT_METRICS, ensemble_scores, instrument_key, spreads, without_families
    from bwl.toy.concepts import parse_pair
    from bwl.toy.probes import Probe
    from bwl.toy.world import Character, render

    torch.manual_seed(0)
    probes = {"a": Probe(architecture="cnn"), "b": Probe(architecture="patch")}
    pair = parse_pair("star+dots")
    images = [render(Character("star", "purple", "tophat", "sleepy", "dots", "sky"), i) for i in range(4)]
    images += [Image.new("RGB", (32, 32), (150, 150, 150))] * 2
    prompts = ["zkc, qrv, sky background"] * 4 + ["circle, red, tophat, sleepy eyes, flat, sky background"] * 2
    scores = ensemble_scores(probes, images, prompts, pair)
    for score in scores:
        for metric in INSTRUMENT_METRICS:
            if metric.value in score:
                own = [score[instrument_key(metric, name)] for name in probes]
                assert score[metric.value] == pytest.approx(np.mean(own))
    assert all("style_texture" in s and "identity" in s for s in scores[:4])
    assert all("preservation" in s and "style" not in s for s in scores[4:])
    assert scores[0]["style_texture"] > 0.5  # dots read by the dots statistic
    found = spreads(scores)
    assert set(found) == {m for m in INSTRUMENT_METRICS if any(m.value in s for s in scores)}
    assert all(v >= 0 for v in found.values())
    assert without_families(scores, ["probe"]) == [{} for _ in scores]
    with pytest.raises(ValueError, match="python -m bwl probes"):
        ensemble_scores({"old": Probe({"shape": ("circle",), "style": ("flat",)})}, images, prompts, pair)


def test_the_notebook_runner_refuses_a_profile_of_several_pairs():
    from bwl.core.config import ConfigError
    from bwl.study.design.profile import load_profile
    from bwl.study.running.runner import run_study

    assert len(load_profile("replicate").pairs) >= 3 and len(load_profile("replicate").train_seeds) >= 3
    with pytest.raises(ConfigError, match="python -m bwl replicate"):
        run_study("replicate")
    with pytest.raises(ConfigError, match="pairs: unknown concept pair 'star\\+qrv2'"):
        load_profile("toy", {"pairs": ["star+qrv2"]})
