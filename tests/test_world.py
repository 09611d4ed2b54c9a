import numpy as np

from bwl.toy.world import (
    HELD_OUT_SHAPE,
    HELD_OUT_STYLE,
    REPLICATE_SHAPES,
    REPLICATE_STYLES,
    Character,
    any_batch,
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


def test_replicate_concepts_render_deterministically_and_are_never_drawn():
    """Star and heart heads, dots and hatching: distinct, deterministic renders; the pretraining sampler never draws
    them (the probes' sampler of every concept does)."""
    looks = {}
    for shape in REPLICATE_SHAPES:
        looks[shape] = np.asarray(render(Character(shape, "green", "none", "round", "flat", "sky"), 4))
    for texture in REPLICATE_STYLES:
        looks[texture] = np.asarray(render(Character("circle", "green", "none", "round", texture, "sky"), 4))
    looks["circle"] = np.asarray(render(Character("circle", "green", "none", "round", "flat", "sky"), 4))
    for name, image in looks.items():
        assert np.array_equal(image, np.asarray(render(Character(
            name if name in REPLICATE_SHAPES or name == "circle" else "circle", "green", "none", "round",
            name if name in REPLICATE_STYLES else "flat", "sky"), 4)))
    names = list(looks)
    assert all(np.abs(looks[a].astype(int) - looks[b]).mean() > 3 for a in names for b in names if a < b)
    new = set(REPLICATE_SHAPES) | set(REPLICATE_STYLES)
    _, captions, characters = pretraining_batch(np.random.default_rng(1), 3000)
    assert not any({c.shape, c.style} & new for c in characters)
    assert not any(set(cap.split(", ")) & new for cap in captions)
    _, characters = any_batch(np.random.default_rng(2), 3000)
    assert new <= {c.shape for c in characters} | {c.style for c in characters}


def test_each_probe_reads_fresh_renders_and_the_new_concepts_at_97_percent():
    """Every instrument, on fresh renders of every concept and on each replication concept alone."""
    from bwl.toy.assets import INSTRUMENTS
    from bwl.toy.probe_training import accuracy, concept_accuracy
    from bwl.toy.probes import load_probe

    for instrument in INSTRUMENTS:
        probe = load_probe(instrument.path)
        assert probe.architecture == instrument.architecture
        readings = accuracy(probe, count=128, seed=2024)
        new = concept_accuracy(probe, {"shape": REPLICATE_SHAPES, "style": REPLICATE_STYLES}, count=48, seed=7)
        assert min(readings.values()) >= 0.97, (instrument.name, readings)
        assert min(new.values()) >= 0.97, (instrument.name, new)


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


def test_texture_statistic_tracks_known_partial_coverage():
    """Each texture painted on random 8 px blocks of the head (coverage known from the mask): 0 with none, about 1
    with all, and rising with coverage; a flat head reads as no texture, and textures are told apart."""
    from PIL import Image

    from bwl.toy.texture import head_region, texture_energy, texture_fit
    from bwl.toy.world import TEXTURES

    heads = [("circle", "red", "sky"), ("square", "blue", "pink"), ("plus", "orange", "mint"),
             ("heart", "green", "sky"), ("diamond", "yellow", "mint")]
    for texture in TEXTURES:
        by_level = {}
        for level in (0.0, 0.25, 0.5, 0.75, 1.0):
            readings = []
            for i, (shape, color, background) in enumerate(heads):
                flat = np.asarray(render(Character(shape, color, "none", "round", "flat", background), i))
                full = np.asarray(render(Character(shape, color, "none", "round", texture, background), i))
                region = head_region(Image.fromarray(full))
                for draw in range(2):
                    blocks = np.random.default_rng([i, draw, int(level * 4)]).random((4, 4)) < level
                    mask = np.kron(blocks, np.ones((8, 8), dtype=bool))
                    mixed = np.where(mask[..., None], full, flat)
                    coverage = (region & mask).sum() / region.sum()
                    readings.append((coverage, texture_energy(Image.fromarray(mixed), texture)))
            by_level[level] = np.array(readings)
        means = [by_level[level][:, 1].mean() for level in sorted(by_level)]
        assert means[0] == 0 and all(a < b for a, b in zip(means, means[1:])), (texture, means)
        error = np.mean([np.abs(r[:, 0] - r[:, 1]).mean() for r in by_level.values()])
        assert means[-1] >= (0.95 if texture != "hatch" else 0.6), (texture, means)
        assert error <= (0.15 if texture != "hatch" else 0.25), (texture, error)  # hatch: blended diagonal edges
    for i, (shape, color, background) in enumerate(heads):
        flat = texture_fit(render(Character(shape, color, "none", "round", "flat", background), i))
        assert max(flat.values()) <= 0.15, (shape, flat)
        for texture in TEXTURES:
            fit = texture_fit(render(Character(shape, color, "none", "round", texture, background), i))
            assert max(fit, key=fit.get) == texture, (shape, texture, fit)


def test_sdxl_toy_loads_as_sdxl_base_does_and_draws_what_seen_prompts_ask():
    """``data/toy-sdxl``: SDXL's layout at toy size, loaded by ``StableDiffusionXLPipeline.from_pretrained``, its
    pretraining recorded, and the seen-prompt gate (the probe reads the attributes a full caption asks for) met as
    ``python -m bwl gates`` measures it for ``data/toy-sd``."""
    import json

    import torch
    from diffusers import StableDiffusionXLPipeline

    from bwl.sd.pipeline import load_pipeline
    from bwl.study.experiments.gates import SEEN_TARGET, seen_prompt_accuracy
    from bwl.toy.assets import PROBE_PATH, TOY_MODEL, TOY_SDXL_MODEL
    from bwl.toy.probes import load_probe

    pipe = StableDiffusionXLPipeline.from_pretrained(TOY_SDXL_MODEL, torch_dtype=torch.float32, add_watermarker=False)
    unet = pipe.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D",
                                                            "CrossAttnDownBlock2D"]
    depths = [len(b.attentions[0].transformer_blocks) for b in unet.down_blocks[1:]]
    assert depths[0] < depths[1], "deeper transformer stacks further down, as in SDXL"
    assert unet.config.addition_embed_type == "text_time" and unet.config.cross_attention_dim == \
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert (TOY_SDXL_MODEL / "vae").resolve() == (TOY_MODEL / "vae").resolve()  # the SD toy's VAE, one copy

    record = json.loads((TOY_SDXL_MODEL / "pretrain.json").read_text())
    assert record["command"] == "python -m bwl pretrain --architecture sdxl"
    assert record["sessions"][-1]["config"]["unet_steps"] == 3600 and record["minutes"] > 0

    sampled = load_pipeline(TOY_SDXL_MODEL)  # the gates' sampler (DPM++ 2M Karras), as python -m bwl gates loads it
    accuracy = seen_prompt_accuracy(sampled, load_probe(PROBE_PATH), count=16)
    assert accuracy["mean"] >= SEEN_TARGET and min(accuracy.values()) >= 0.75, accuracy
