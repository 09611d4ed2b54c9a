import numpy as np

from bwl.toy.world import (
    HELD_OUT_SHAPE,
    HELD_OUT_STYLE,
    identity_set,
    pretraining_batch,
    render,
    sample_character,
    style_set,
)


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


def test_probe_reads_fresh_renders_at_97_percent():
    from bwl.toy.assets import PROBE_PATH
    from bwl.toy.probes import accuracy, load_probe

    readings = accuracy(load_probe(PROBE_PATH), count=128, seed=2024)
    assert min(readings.values()) >= 0.97, readings


def test_shipped_model_loads_through_from_pretrained_and_draws_what_the_probe_reads():
    from bwl.sd.generate import generate
    from bwl.sd.pipeline import load_pipeline
    from bwl.toy.assets import PROBE_PATH, TOY_MODEL
    from bwl.toy.probes import load_probe

    pipe = load_pipeline(TOY_MODEL)  # StableDiffusionPipeline.from_pretrained, as for SD 1.4
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and len(pipe.unet.down_blocks) == 4
    characters = [sample_character(np.random.default_rng(s)) for s in (11, 12, 13, 14)]
    images = []
    for seed, character in enumerate(characters):
        images += generate(pipe, [character.caption()], [seed], steps=20, size=32)
    readings = load_probe(PROBE_PATH).read(images)
    for attribute in ("background", "color"):
        correct = sum(r[attribute] == getattr(c, attribute) for r, c in zip(readings, characters))
        assert correct >= 3, (attribute, readings, [c.caption() for c in characters])
