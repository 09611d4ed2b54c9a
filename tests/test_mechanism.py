"""What each block does, the instruments: recording block outputs during sampling, patching them from another run,
and the cross-validated linear read-out, on the tiny model and on planted data."""

import numpy as np
import pytest
import torch

from bwl.adapters.architectures import SD1, SDXL
from bwl.sd.activations import patching, recording
from bwl.sd.pipeline import load_pipeline
from bwl.study.scoring.readout import readout, wilson

STEPS = 3


def run(pipe, prompt, seed=0, steps=STEPS):
    return pipe([prompt], num_inference_steps=steps, guidance_scale=7.0, height=64, width=64,
                generator=[torch.Generator().manual_seed(seed)], output_type="np").images[0]


def test_recording_keeps_every_block_at_every_step_without_changing_the_image(pipe):
    plain = run(pipe, "a photo of sks dog")
    with recording(pipe.unet, SD1.prefixes, STEPS) as found:
        recorded = run(pipe, "a photo of sks dog")
    assert np.array_equal(plain, recorded)
    assert set(found.outputs) == {(b, s) for b in SD1.paper_blocks for s in range(STEPS)}
    down = found.last("IN0", 0)
    assert isinstance(down, tuple) and len(down[1]) == 3  # hidden states and the skip connections
    assert found.pooled("OUT3", 2).shape == (1, 32)  # the conditional half of the guided batch, channels


def test_patching_a_block_with_its_own_output_changes_nothing_bit_for_bit(pipe):
    with recording(pipe.unet, SD1.prefixes, STEPS) as found:
        original = run(pipe, "a photo of sks dog")
    for block in ("IN0", "MID", "OUT2"):
        own = {(block, s): found.last(block, s) for s in range(STEPS)}
        with patching(pipe.unet, SD1.prefixes, STEPS, own):
            assert np.array_equal(run(pipe, "a photo of sks dog"), original), block


def test_patching_every_block_with_the_second_prompts_gives_its_image(pipe):
    with recording(pipe.unet, SD1.prefixes, STEPS) as second:
        target = run(pipe, "a red cat")
    first = run(pipe, "a photo of sks dog")
    assert not np.array_equal(first, target)
    everything = {key: outputs[-1] for key, outputs in second.outputs.items()}
    with patching(pipe.unet, SD1.prefixes, STEPS, everything):
        assert np.array_equal(run(pipe, "a photo of sks dog"), target)
    late = {key: out for key, out in everything.items() if key[0] == "OUT3" and key[1] == STEPS - 1}
    with patching(pipe.unet, SD1.prefixes, STEPS, late):  # one block at one step: between the two
        partial = run(pipe, "a photo of sks dog")
    assert not np.array_equal(partial, first) and not np.array_equal(partial, target)


def test_patching_a_mismatched_output_is_refused_naming_the_block(pipe):
    with recording(pipe.unet, {"MID": "mid_block"}, STEPS) as found:
        run(pipe, "a photo of sks dog")
    wrong = {("OUT3", 0): found.last("MID", 0)}
    with pytest.raises(ValueError, match="patching OUT3 at step 0"), patching(pipe.unet, SD1.prefixes, STEPS, wrong):
        run(pipe, "a photo of sks dog")


def test_recording_names_the_sdxl_blocks(tmp_path):
    from bwl.sd.tiny import build_tiny_sdxl_pipeline

    xl = load_pipeline(build_tiny_sdxl_pipeline(tmp_path / "xl"))
    with recording(xl.unet, SDXL.prefixes, 2, at={1}) as found:
        xl(["a photo of sks dog"], num_inference_steps=2, generator=[torch.Generator().manual_seed(0)])
    assert set(found.outputs) == {(b, 1) for b in SDXL.paper_blocks}


def planted(n=120, classes=3, dims=16, signal=8.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = [i % classes for i in range(n)]
    x = torch.randn(n, dims, generator=g)
    x[:, 0] += signal * torch.tensor(labels, dtype=torch.float32)  # the attribute, planted in one feature
    return x, labels


def test_readout_finds_a_planted_attribute_and_chance_on_shuffled_labels():
    x, labels = planted()
    found = readout(x, labels)
    assert found.accuracy > 0.95 and found.low > 0.9 and abs(found.chance - 1 / 3) < 0.05
    shuffled = [labels[i] for i in torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    null = readout(x, shuffled)
    assert null.low < 1 / 3 < null.high or abs(null.accuracy - 1 / 3) < 0.12, null
    assert "chance 0.33" in str(found)


def test_wilson_interval():
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson(100, 100)[1] == 1.0 and wilson(0, 100)[0] == 0.0


def test_mechanism_writes_its_maps_and_tables(tmp_path, tiny_dir):
    from bwl.study.design.profile import load_profile
    from bwl.study.experiments.mechanism import RANGES, SEEN, run_mechanism

    profile = load_profile("smoke", {"model": str(tiny_dir), "build_tiny": False, "figures_dir": str(tmp_path),
                                     "sample_steps": 3})
    attributes = ("hat",)  # every attribute takes minutes on 2 cores; the code path is the same
    table = run_mechanism(profile, examples=16, pairs=2, attributes=attributes).read_text()
    out = tmp_path / "mechanism"
    assert all((out / name).stat().st_size > 0 for name in ("decoding.png", "patching.png", "decoding.csv",
                                                             "patching.csv", "patching.md", "config.json"))
    rows = (out / "decoding.csv").read_text().splitlines()[1:]
    assert len(rows) == len(SD1.paper_blocks) * len(RANGES) * len(attributes) and set(attributes) < set(SEEN)
    assert all(f"**{name} steps**" in table for name in RANGES)
    patched = (out / "patching.csv").read_text().splitlines()[1:]
    assert len(patched) == len(SD1.paper_blocks) * (len(RANGES) + 1) * len(attributes)
    assert all(0 <= int(r.split(",")[3]) <= 2 for r in patched)
