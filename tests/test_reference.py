"""Reference metrics' building blocks against hand-computed values; encoders loaded by path like the real ones."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from bwl.sd.encoders import load_clip, load_dino
from bwl.sd.pipeline import ModelNotFound
from bwl.sd.tiny import build_tiny_encoders
from bwl.study.reference import centroid_similarity, gram_matrices, gram_similarity, plain_prompt, vendi_score


def test_vendi_score_on_hand_computed_cases():
    assert vendi_score(torch.ones(5, 3)) == pytest.approx(1.0)  # five copies of one item: one effective item
    assert vendi_score(torch.eye(4)) == pytest.approx(4.0)  # four orthogonal items
    # two items at 60°: K/2 = [[.5, .25], [.25, .5]], eigenvalues .75 and .25
    pair = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert vendi_score(pair) == pytest.approx(expected)
    assert vendi_score(pair * 7) == pytest.approx(expected)  # cosine similarity: scale does not matter


def test_gram_matrix_and_style_similarity_by_hand():
    features = torch.tensor([[[1.0, 0.0], [1.0, 2.0]]])  # one image, 2 tokens, 2 channels
    assert torch.allclose(gram_matrices(features)[0], torch.tensor([[1.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    same = gram_similarity([features], [features])
    assert same.item() == pytest.approx(1.0)
    other = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # Gram [[0, 0], [0, 1]]
    expected = 2.0 / (math.sqrt(7) * 1.0)  # <[1,1,1,2], [0,0,0,1]> / (|.| |.|)
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
        assert torch.allclose(embeddings, encoder.embed(images))  # batching changes nothing
    assert clip.embed_text(["a photo of sks dog"]).shape == (1, clip.embed(images).shape[1])
    assert [h.shape[1] for h in dino.hidden_states(images, [1, 2])] == [16, 16]  # (32 / 8)² patches
    with pytest.raises(ModelNotFound, match="'nobody/none-such'.*hf download"):
        load_dino("nobody/none-such")
    with pytest.raises(ModelNotFound, match="not a directory written by save_pretrained"):
        load_clip(str(tmp_path))
