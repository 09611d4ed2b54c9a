"""The effective-block analyzer on the tiny model: a block without weights is reported as such and switching it off
changes nothing, bit for bit; a block with weights changes the image, and its effect carries a CI."""

import numpy as np

from bwl.adapters.compose import load_adapters, set_block_weights
from bwl.adapters.spec import AdapterSpec
from bwl.sd.generate import generate
from bwl.sd.pipeline import load_pipeline
from bwl.study.experiments.analyzer import block_effects, block_off, effects_figure, effects_markdown, weighted_blocks

from .test_adapter_files import trained_file

PROMPTS, SEEDS = ["a photo of sks dog"], [0, 1]


def test_switching_off_a_block_without_weights_changes_nothing_bit_for_bit(pipe, tiny_dir, tmp_path):
    path = trained_file(pipe, tmp_path / "upper.safetensors", AdapterSpec("lora", "upper", rank=4))
    fresh = load_pipeline(tiny_dir)
    load_adapters(fresh, {"style": path})
    assert weighted_blocks(fresh, "style") == {"IN0", "OUT3"}
    set_block_weights(fresh, {"style": 1.0})
    reference = [np.asarray(i) for i in generate(fresh, PROMPTS, SEEDS, steps=3, size=64)]
    for block, changes in (("MID", False), ("OUT1", False), ("OUT3", True)):
        set_block_weights(fresh, block_off(["style"], "style", block))
        images = [np.asarray(i) for i in generate(fresh, PROMPTS, SEEDS, steps=3, size=64)]
        assert all(np.array_equal(a, b) for a, b in zip(images, reference)) != changes, block


def test_block_effects_report_no_weights_and_measured_changes(pipe, tiny_dir, tmp_path):
    path = trained_file(pipe, tmp_path / "upper.safetensors", AdapterSpec("lora", "upper", rank=4))
    brightness = lambda images, prompts: [{"style": float(np.asarray(i).mean()) / 255} for i in images]  # noqa: E731
    effects = block_effects(load_pipeline(tiny_dir), {"style": path}, "style", PROMPTS, SEEDS, steps=3, size=64,
                            score=brightness)
    by_block = {e.block: e for e in effects}
    assert [e.block for e in effects] == ["IN0", "IN1", "IN2", "IN3", "MID", "OUT0", "OUT1", "OUT2", "OUT3"]
    assert {b for b, e in by_block.items() if e.has_weights} == {"IN0", "OUT3"}
    assert by_block["MID"].pixel_difference is None and "| MID | no weights |" in effects_markdown(effects)
    out3 = by_block["OUT3"]
    assert out3.pixel_difference.mean > 0 and out3.pixel_difference.n == 2
    assert out3.metric_changes and all(e.n == 2 for e in out3.metric_changes.values())
    assert len(effects_figure(effects).axes) == 2  # pixel difference, and the one metric the scorer gives
