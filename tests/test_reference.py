"""Reference metrics' building blocks against hand-computed values; encoders loaded by path like the real ones."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from bwl.sd.encoders import load_clip, load_dino
from bwl.sd.pipeline import ModelNotFound
from bwl.sd.tiny import build_tiny_encoders
from bwl.study.scoring.reference import centroid_similarity, gram_matrices, gram_similarity, plain_prompt, vendi_score

from .conftest import assert_float32_equal, float32_bound


def test_vendi_score_on_hand_computed_cases():
    assert vendi_score(torch.ones(5, 3)) == pytest.approx(1.0)  # five copies of one item: one effective item
    assert vendi_score(torch.eye(4)) == pytest.approx(4.0)  # four orthogonal items
    # two items at 60°: K/2 = [[.5, .25], [.25, .5]], eigenvalues .75 and .25
    pair = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert vendi_score(pair) == pytest.approx(expected)
    assert vendi_score(pair * 7) == pytest.approx(expected)  # cosine similarity: scale does not matter


def test_gram_matrix_and_style_similarity_by_hand():
    features = torch.tensor([[[1.0, 0.0], [3.0, 2.0]]])  # one image, 2 tokens, 2 channels; mean (2, 1)
    # centered tokens (-1, -1) and (1, 1): F̃ᵀF̃ / 2 = [[1, 1], [1, 1]]
    assert torch.allclose(gram_matrices(features)[0], torch.ones(2, 2, dtype=torch.float64))
    assert torch.allclose(gram_matrices(features + 5.0), gram_matrices(features))  # a shared offset is removed
    same = gram_similarity([features], [features])
    assert same.item() == pytest.approx(1.0)
    other = torch.tensor([[[0.0, 1.0], [2.0, 1.0]]])  # centered (-1, 0), (1, 0): Gram [[1, 0], [0, 0]]
    expected = 1.0 / (2.0 * 1.0)  # <[1,1,1,1], [1,0,0,0]> / (|.| |.|)
    assert gram_similarity([features], [other]).item() == pytest.approx(expected)
    two_layers = gram_similarity([features, features], [other, features])
    assert two_layers.item() == pytest.approx((expected + 1) / 2)


def test_centroid_similarity_and_plain_prompts():
    references = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sims = centroid_similarity(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), references)
    assert sims.tolist() == pytest.approx([1.0, 1 / math.sqrt(2)])
    assert plain_prompt("zkc, qrv, sky background", {"zkc": "a person", "qrv": "a style"}) == (
        "a person, a style, sky background")
    assert plain_prompt("sks dog, red", {"sks": "a"}) == "a dog, red"


def test_encoders_load_by_path_and_a_missing_one_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip_dir, dino_dir = build_tiny_encoders(tmp_path)
    clip, dino = load_clip(str(clip_dir)), load_dino(str(dino_dir))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    for encoder in (clip, dino):
        embeddings = encoder.embed(images, batch_size=2)
        assert embeddings.shape[0] == 3 and torch.allclose(embeddings.norm(dim=-1), torch.ones(3))
        # batches of 2 and of 3 are two code paths (other GEMM shapes): equal up to float32 rounding
        assert_float32_equal(encoder.embed(images), embeddings, float32_bound(encoder.model))
    assert clip.embed_text(["a photo of sks dog"]).shape == (1, clip.embed(images).shape[1])
    assert [h.shape[1] for h in dino.hidden_states(images, [1, 2])] == [16, 16]  # (32 / 8)² patches
    with pytest.raises(ModelNotFound, match="'nobody/none-such'.*hf download"):
        load_dino("nobody/none-such")
    with pytest.raises(ModelNotFound, match="not a directory written by save_pretrained"):
        load_clip(str(tmp_path))


def test_paper_path_writes_every_reference_metric_and_findings(tmp_path, tiny_dir, dreambooth, monkeypatch):
    """The paper profile on a saved tiny SD1.x pipeline, tiny saved encoders and real photos. Cells first rendered
    without metrics are scored from their stored images when the profile asks for reference metrics."""
    import csv
    import json
    import shutil

    from bwl.study.design.profile import load_profile
    from bwl.study.design.vocabulary import REFERENCE_METRICS
    from bwl.study.running.study import Study

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip_dir, dino_dir = build_tiny_encoders(tmp_path / "encoders")
    photos, paintings = tmp_path / "photos" / "identity", tmp_path / "photos" / "style"
    shutil.copytree(dreambooth / "dog", photos)
    shutil.copytree(dreambooth / "red_cartoon", paintings)
    values = {
        "model": str(tiny_dir), "identity_dir": str(photos), "style_dir": str(paintings), "tagger": "none",
        "resolution": 64, "reg_count": 0, "class_word": "dog", "clip_model": str(clip_dir),
        "dino_model": str(dino_dir), "train": {"steps": 2, "batch_size": 1, "repeats": 1, "checkpoint_every": 0},
        "seeds": [0, 1], "prompts": ["sks dog, zxq style", "a photo of a dog"], "sample_steps": 2,
        "runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "figures"), "metrics": "none",
    }
    study = Study(load_profile("paper", values))
    study.prepare_data()
    study.train_all()
    study.run_grids()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "cells").rglob("images.npz")}
    assert not (tmp_path / "figures" / "findings.md").exists()

    scored = Study(load_profile("paper", {**values, "metrics": "reference"}))
    scored.run_grids()
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "cells").rglob("images.npz")} == stamps
    with open(tmp_path / "figures" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len({(r["grid"], r["cell"]) for r in rows}) > 10
    for row in rows:
        for metric in REFERENCE_METRICS:
            assert int(row[f"{metric.value}_n"]) > 0 and math.isfinite(float(row[metric.value])), (row["cell"], metric)
        assert int(row["identity_n"]) == 0  # no probe for real photos
    base = next(r for r in rows if r["cell"] == "base")
    assert float(base["ref_preservation"]) == pytest.approx(1.0)  # the base model's own images
    findings = (tmp_path / "figures" / "findings.md").read_text()
    assert "C1" in findings and "C3" in findings and "ref_identity" not in findings.split("|")[0]

    # Another version of the reference scorer (here: other plain words) scores every cell again, images untouched.
    cells = sorted((tmp_path / "runs" / "cells").glob("*/cell.json"))
    before = [json.loads(p.read_text())["scored_with"]["reference"] for p in cells]
    rescored = Study(load_profile("paper", {**values, "metrics": "reference", "style_words": "a cartoon"}))
    rescored.run_grids()
    after = [json.loads(p.read_text())["scored_with"]["reference"] for p in cells]
    assert len(set(after)) == 1 and not set(before) & set(after)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "cells").rglob("images.npz")} == stamps


def test_spearman_and_its_bootstrap_by_hand():
    from bwl.study.experiments.validation import bootstrap_spearman, ranks, spearman

    assert ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x = np.arange(10.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)  # monotone: perfect rank agreement
    assert spearman(x, -x) == pytest.approx(-1.0)
    # d = rank differences for (1,2,3,4) vs (2,1,4,3): 1 each; rho = 1 - 6 * 4 / (4 * 15) = 0.6
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([2.0, 1, 4, 3])) == pytest.approx(0.6)
    low, high = bootstrap_spearman(x, x ** 3)
    assert (low, high) == pytest.approx((1.0, 1.0))
    noisy = x + np.random.default_rng(0).normal(0, 3, 10)
    low, high = bootstrap_spearman(x, noisy)
    assert low < spearman(x, noisy) < high
