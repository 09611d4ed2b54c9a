"""What each block does, the instruments: recording block outputs during sampling, patching them from another run,
and the cross-validated linear read-out, on the tiny model and on planted data."""

import numpy as np
import pytest
import torch

from bwl.adapters.architectures import SD1, SDXL
from bwl.sd.activations import patching, recording
from bwl.sd.pipeline import load_pipeline
from bwl.study.scoring.readout import readout, wilson

from .conftest import randomize_lora

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


def test_mechanism_notebook_writes_every_map_and_table_under_papermill_and_reuses_them(tmp_path):
    import papermill

    from bwl.core.config import ConfigError
    from bwl.study.design.profile import ROOT, load_profile
    from bwl.study.experiments.adapter_blocks import ADAPTERS, CONCEPTS
    from bwl.study.experiments.mechanism import RANGES, SEEN, run_mechanism

    overrides = {"runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "figures"),
                 "mechanism_attributes": ["hat"],  # every attribute takes minutes on 2 cores; the code path is the same
                 "mechanism_examples": 16, "mechanism_pairs": 2, "mechanism_seeds": [0]}
    nb = papermill.execute_notebook(str(ROOT / "notebooks" / "08_mechanism.ipynb"), str(tmp_path / "08.ipynb"),
                                    parameters={"profile": "smoke", "overrides": overrides, "interactive": False},
                                    kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)
    out = tmp_path / "figures" / "mechanism"
    written = ("decoding.png", "patching.png", "adapters.png", "decoding.csv", "patching.csv", "adapter-sizes.csv",
               "adapter-patching.csv", "decoding.md", "patching.md", "adapter-sizes.md", "adapter-patching.md",
               "config.json", "adapters.json")
    assert all((out / name).stat().st_size > 0 for name in written)
    rows = (out / "decoding.csv").read_text().splitlines()[1:]
    assert len(rows) == len(SD1.paper_blocks) * len(RANGES) and {r.split(",")[2] for r in rows} == {"hat"} < set(SEEN)
    patched = (out / "patching.csv").read_text().splitlines()[1:]
    assert len(patched) == len(SD1.paper_blocks) * (len(RANGES) + 1) and all(
        0 <= int(r.split(",")[3]) <= 2 for r in patched)
    sizes = (out / "adapter-sizes.csv").read_text().splitlines()[1:]
    assert {r.split(",")[0] for r in sizes} == set(ADAPTERS) and all(float(r.split(",")[2]) > 0 for r in sizes)
    readings = (out / "adapter-patching.csv").read_text().splitlines()[1:]
    assert len(readings) == len(CONCEPTS) * (2 + 2 * len(SD1.paper_blocks))
    shown = [o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("**early steps**" in t for t in shown) and any("identity gain" in t for t in shown)

    profile = load_profile("smoke", overrides)
    before = (out / "decoding.csv").stat().st_mtime_ns
    run_mechanism(profile)  # same model and settings: reused
    assert (out / "decoding.csv").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match=r"mechanism_attributes: unknown \['hats'\]; valid: shape"):
        run_mechanism(load_profile("smoke", {**overrides, "mechanism_attributes": ["hats"]}))


def test_update_size_is_the_frobenius_ratio_per_block_and_zero_before_training(pipe):
    from bwl.adapters.spec import AdapterSpec, add_adapter
    from bwl.study.experiments.adapter_blocks import update_sizes

    add_adapter(pipe.unet, AdapterSpec("lora", "IN1+OUT2", rank=2), "a")
    assert update_sizes(pipe.unet, "a") == {"IN1": 0.0, "OUT2": 0.0}  # lora_B starts at zero
    randomize_lora(pipe.unet)
    expected = {}
    for block, prefix in (("IN1", "down_blocks.1."), ("OUT2", "up_blocks.2.")):
        delta = base = 0.0
        for name, module in pipe.unet.named_modules():
            if name.startswith(prefix) and hasattr(module, "lora_A") and "a" in module.lora_A:
                product = (module.lora_B["a"].weight.flatten(1) @ module.lora_A["a"].weight.flatten(1)).detach()
                delta += float((product * module.scaling["a"]).pow(2).sum())
                base += float(module.base_layer.weight.pow(2).sum())
        expected[block] = (delta / base) ** 0.5
    found = update_sizes(pipe.unet, "a")
    assert set(found) == {"IN1", "OUT2"} and all(v > 0 for v in found.values())
    for block, value in expected.items():
        assert found[block] == pytest.approx(value, rel=1e-5)
    with pytest.raises(ValueError, match="adapter 'b' is on no layer"):
        update_sizes(pipe.unet, "b")


class MeanPixel:
    """A stand-in for the probes: every image's 'identity' and 'style' reading is its mean pixel value."""

    def __call__(self, images, prompts):
        values = [float(np.asarray(image, dtype=float).mean()) / 255 for image in images]
        return [{"identity": v, "style": v} for v in values]


def test_adapter_patching_reads_every_block_both_ways_and_a_null_adapter_changes_nothing(pipe):
    from bwl.adapters.spec import AdapterSpec, add_adapter
    from bwl.study.experiments.adapter_blocks import CONCEPTS, patch_adapters

    add_adapter(pipe.unet, AdapterSpec("lora", "all", rank=2), "identity")
    randomize_lora(pipe.unet, std=0.5)
    add_adapter(pipe.unet, AdapterSpec("lora", "all", rank=2), "style")  # lora_B zero: the null style adapter
    readings = patch_adapters(pipe, MeanPixel(), ["zkc, qrv"], [0], STEPS, size=64)
    by = {(r.concept, r.condition, r.block): r.value for r in readings}
    blocks = list(SD1.paper_blocks)
    assert set(by) == {(c, d, "") for c in CONCEPTS for d in ("with", "without")} | {
        (c, d, b) for c in CONCEPTS for d in ("gain", "loss") for b in blocks}
    style = [v for (c, _, _), v in by.items() if c == "style"]
    assert all(v == style[0] for v in style)  # a null adapter: with, without and every patch alike, bit for bit
    assert by[("identity", "with", "")] != by[("identity", "without", "")]
    moved = [b for b in blocks if by[("identity", "gain", b)] != by[("identity", "without", "")]]
    assert len(moved) == len(blocks)  # each block's output carries part of the identity adapter's change
