import numpy as np

from bwl.world import HELD_OUT_SHAPE, HELD_OUT_STYLE, identity_set, pretraining_batch, render, sample_character, style_set


def test_world_is_deterministic():
    a = sample_character(np.random.default_rng(3))
    assert a == sample_character(np.random.default_rng(3))
    assert np.array_equal(np.asarray(render(a, 5)), np.asarray(render(a, 5)))
    assert identity_set() == identity_set() and style_set() == style_set()


def test_held_out_concepts_never_appear_in_pretraining():
    _, captions, characters = pretraining_batch(np.random.default_rng(0), 2000)
    assert not any(c.shape == HELD_OUT_SHAPE or c.style == HELD_OUT_STYLE for c in characters)
    assert not any(HELD_OUT_SHAPE in cap.split(", ") or HELD_OUT_STYLE in cap.split(", ") for cap in captions)
    assert all(c.shape == HELD_OUT_SHAPE for c, _ in identity_set())
    assert all(c.style == HELD_OUT_STYLE for c, _ in style_set())
