"""Combining an identity with a style beyond the plain merge, on the tiny model: ZipLoRA's merged file, K-LoRA, LoRA
Switch and LoRA Composite as inference modes, and joint training."""

import numpy as np
import pytest
import torch

from bwl.__main__ import main
from bwl.adapters.compose import load_adapter, load_adapters, set_block_weights
from bwl.adapters.files import read_metadata, read_tensors, save_adapter
from bwl.adapters.kohya import export_kohya, import_kohya
from bwl.adapters.modes import KLoRA, LoRAComposite, LoRASwitch
from bwl.adapters.spec import AdapterSpec, add_adapter
from bwl.sd.generate import generate
from bwl.sd.pipeline import load_pipeline
from bwl.train import train
from bwl.train.ziplora import ZipConfig, zip_loras

from .conftest import assert_float32_equal, float32_bound, randomize_lora
from .test_data import write_images
from .test_methods import unet_output
from .test_train import config

PROMPTS, SEEDS = ["a photo of sks dog"], [0, 1]


@pytest.fixture
def pair(tiny_dir, tmp_path):
    """An identity LoCon on every block and a style LoCon on upper, random, saved with their triggers."""
    files = {}
    for seed, (name, blocks, trigger) in enumerate((("identity", "all", "sks"), ("style", "upper", "zxq"))):
        pipe = load_pipeline(tiny_dir)
        spec = AdapterSpec("locon", blocks, rank=4)
        add_adapter(pipe.unet, spec, name)
        randomize_lora(pipe.unet, seed=seed)
        files[name] = save_adapter(pipe.unet, tmp_path / f"{name}.safetensors", spec, name, trigger=trigger)
    return files


def test_zip_with_mergers_at_one_is_the_plain_merge(tiny_dir, tmp_path, pair):
    zipped, losses = zip_loras(load_pipeline(tiny_dir), ZipConfig(str(pair["identity"]), str(pair["style"]),
                                                                   str(tmp_path / "zip.safetensors"), steps=0))
    assert losses == []
    merged = load_pipeline(tiny_dir)
    load_adapters(merged, {"identity": pair["identity"], "style": pair["style"]})
    set_block_weights(merged, {"identity": 1.0, "style": 1.0})
    one_file = load_pipeline(tiny_dir)
    load_adapter(one_file, zipped, "zip")
    assert_float32_equal(unet_output(one_file.unet), unet_output(merged.unet), float32_bound(merged.unet),
                         effect=unet_output(load_pipeline(tiny_dir).unet))
    tensors = read_tensors(zipped)
    down = tensors["unet.up_blocks.3.attentions.0.proj_in.lora_A.weight"]
    assert down.shape[0] == 8  # rank 4 + 4 where both adapters act; 4 where only the identity does
    assert tensors["unet.down_blocks.1.attentions.0.proj_in.lora_A.weight"].shape[0] == 4


def test_zip_learns_loads_in_diffusers_and_round_trips(tiny_dir, tmp_path, pair):
    out = tmp_path / "zip.safetensors"
    assert main(["zip", str(pair["identity"]), str(pair["style"]), str(out), "--model", str(tiny_dir),
                 "--steps", "30"]) == 0
    import json

    record = json.loads(read_metadata(out)["bwl_zip"])
    assert record["steps"] == 30 and record["similarity_lambda"] == 0.01 and record["identity_prompts"] == ["sks"]
    assert record["loss_last"] < 0.8 * record["loss_first"]
    pipe = load_pipeline(tiny_dir)
    pipe.load_lora_weights(str(out), adapter_name="zip")  # diffusers' own loader
    kohya = export_kohya(out, tmp_path / "kohya.safetensors")
    back = read_tensors(import_kohya(kohya, load_pipeline(tiny_dir), tmp_path / "back.safetensors"))
    original = read_tensors(out)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


def test_zip_losses_fall(tiny_dir, tmp_path, pair):
    _, losses = zip_loras(load_pipeline(tiny_dir), ZipConfig(str(pair["identity"]), str(pair["style"]),
                                                             str(tmp_path / "zip.safetensors"), steps=40,
                                                             samples=2, sample_steps=3))
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses


def two_all_block_adapters(tiny_dir, tmp_path):
    files = {}
    for seed, name in enumerate(("identity", "style")):
        pipe = load_pipeline(tiny_dir)
        add_adapter(pipe.unet, AdapterSpec("lora", "all", rank=4), name)
        randomize_lora(pipe.unet, seed=seed)
        files[name] = save_adapter(pipe.unet, tmp_path / f"{name}.safetensors", AdapterSpec("lora", "all", rank=4),
                                   name)
    pipe = load_pipeline(tiny_dir)
    load_adapters(pipe, files)
    return pipe


def images(pipe, extra=None):
    return [np.asarray(i) for i in generate(pipe, PROMPTS, SEEDS, steps=4, size=64, extra=extra)]


@pytest.mark.parametrize(("beta", "alpha", "alone"), [(1e9, 0.0, "style"), (0.0, 0.0, "identity")])
def test_klora_keeping_every_entry_with_the_style_factor_forced_is_one_adapter_everywhere(tiny_dir, tmp_path, beta,
                                                                                          alpha, alone):
    pipe = two_all_block_adapters(tiny_dir, tmp_path)
    mode = KLoRA(pipe, "identity", "style", k=None, alpha=alpha, beta=beta)
    assert all(mode.winner(layer, f) == alone for layer in mode.sums for f in (0.0, 0.5, 0.99))
    with mode.applied(4) as extra:
        combined = images(pipe, extra)
    set_block_weights(pipe, {alone: 1.0})
    assert all(np.array_equal(a, b) for a, b in zip(combined, images(pipe)))


def test_klora_sets_each_steps_winners_and_restores_the_merge(tiny_dir, tmp_path):
    pipe = two_all_block_adapters(tiny_dir, tmp_path)
    mode = KLoRA(pipe, "identity", "style")  # the reference's k, alpha and beta
    with mode.applied(4) as extra:
        for step in range(4):
            extra["callback_on_step_end"](pipe, step, None, {})
            following = (step + 1) % 4
            for name, module in mode.shared.items():
                assert module.active_adapters == [mode.winner(name, following / 4)], (name, step)
    assert all(sorted(m.active_adapters) == ["identity", "style"] for m in mode.shared.values())


def test_switch_and_composite_with_one_adapter_are_that_adapter(tiny_dir, tmp_path):
    pipe = two_all_block_adapters(tiny_dir, tmp_path)
    set_block_weights(pipe, {"style": 1.0})
    alone = images(pipe)
    with LoRASwitch(pipe, ["style"], every=2).applied(4) as extra:
        assert all(np.array_equal(a, b) for a, b in zip(images(pipe, extra), alone))
    with LoRAComposite(pipe, ["style"]).applied() as extra:
        assert all(np.array_equal(a, b) for a, b in zip(images(pipe, extra), alone))


def test_composite_averages_the_predictions_and_switch_alternates(tiny_dir, tmp_path):
    pipe = two_all_block_adapters(tiny_dir, tmp_path)
    each = []
    for name in ("identity", "style"):
        set_block_weights(pipe, {name: 1.0})
        each.append(unet_output(pipe.unet))
    with LoRAComposite(pipe, ["identity", "style"]).applied():
        assert torch.equal(unet_output(pipe.unet), torch.stack(each).mean(0))
    switch = LoRASwitch(pipe, ["identity", "style"], every=2)
    with switch.applied(6):
        for step, expected in enumerate(["identity", "identity", "style", "style", "identity", "identity"]):
            switch.select(step)
            assert torch.equal(unet_output(pipe.unet), each[["identity", "style"].index(expected)]), step


def test_joint_training_puts_both_concepts_in_one_adapter_and_resumes_exactly(tmp_path, tiny_dir):
    write_images(tmp_path / "style", count=2, caption="zxq, stripes")
    common = dict(joint_dir=str(tmp_path / "style"), joint_trigger="zxq", steps=6, checkpoint_every=3,
                  shuffle_tags=True)
    from bwl.train.batches import prepare_data

    data = prepare_data(config(tmp_path, tiny_dir, **common))
    assert {str(e.image.parent.name) for e in data.examples} == {"images", "style"}
    straight = train(config(tmp_path, tiny_dir, output_dir=str(tmp_path / "a"), **common))
    train(config(tmp_path, tiny_dir, output_dir=str(tmp_path / "b"), stop_after=3, **common))
    resumed = train(config(tmp_path, tiny_dir, output_dir=str(tmp_path / "b"), resume=True, **common))
    a, b = read_tensors(straight), read_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_combination_notebook_runs_every_method_on_the_smoke_profile_and_writes_its_answer(tmp_path):
    import csv
    import json

    import papermill

    from bwl.study.design.profile import ROOT, load_profile
    from bwl.study.design.vocabulary import Concept, joint, zipped
    from bwl.study.experiments.combine import REFERENCE, combine_grid, methods, run_combine
    from bwl.study.running.study import Study

    overrides = {"runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "figures"), "metrics": "probe",
                 "seeds": [0], "combine_block": "OUT2", "combine_weights": [[1.0, 0.5]], "combine_zip_steps": 3}
    nb = papermill.execute_notebook(str(ROOT / "notebooks" / "07_combination.ipynb"), str(tmp_path / "07.ipynb"),
                                    parameters={"profile": "smoke", "overrides": overrides, "interactive": False},
                                    kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)
    shown = [o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert sum("image/png" in d for d in shown) == 2 and any("vs block-wise LoRA" in d.get("text/markdown", "")
                                                              for d in shown)
    profile = load_profile("smoke", overrides)
    out = tmp_path / "figures" / "combine"
    board = (out / "leaderboard.md").read_text()
    labels = [m.label for m in methods(profile)]
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [r["method"] for r in rows] == labels and rows[0]["method"] == REFERENCE
    assert {r["method"]: r["one_file"] for r in rows}["K-LoRA"] == "no"
    assert {r["method"]: r["behind_merge"] for r in rows}["merge 1/0.5"] == "–"  # a point of the curve itself
    assert {r["method"]: r["optimization_steps"] for r in rows}["ZipLoRA"] == "3"
    assert all(float(r["time_vs_plain_merge"]) > 0 for r in rows)  # every cell was generated here, and timed
    assert {r["cell"] for r in csv.DictReader((out / "comparisons.csv").open())} == set(labels) - {REFERENCE}
    assert all((out / name).stat().st_size > 10_000 for name in ("pareto.png", "forest.png"))
    assert "| method | identity | style |" in board and json.loads((out / "config.json").read_text())["modes"] == {
        "K-LoRA": "k-lora", "LoRA Switch": "switch", "LoRA Composite": "composite"}

    study = Study(profile)  # joint and merged adapters: keyed like any other, recorded in their files
    files = study.adapter_files([joint("lora"), zipped("lora"), zipped("locon")])
    assert all(f.exists() for f in files.values())
    assert json.loads(read_metadata(files[zipped("locon")])["bwl_zip"])["steps"] == 3
    config = json.loads((files[joint("lora")].parent / "config.json").read_text())["train"]
    assert config["joint_dir"].endswith("style") and config["joint_trigger"] == "qrv"
    assert joint("lora").concept is Concept.BOTH and len(combine_grid(profile).columns()) == len(labels) + 3
    before = {f: f.stat().st_mtime_ns for f in (out / "leaderboard.csv", *files.values())}
    run_combine(profile)  # a rerun trains, merges and renders nothing, and adds its minutes to the first run's
    assert all(f.stat().st_mtime_ns == t for f, t in before.items() if f.suffix == ".safetensors")
    record = json.loads((out / "config.json").read_text())
    assert len(record["run_minutes"]) == 2 and record["minutes"] == round(sum(record["run_minutes"]), 1)
    run_combine(load_profile("smoke", {**overrides, "seeds": [1]}))  # another design starts its own record
    assert len(json.loads((out / "config.json").read_text())["run_minutes"]) == 1


def test_a_missing_sweep_names_the_key_that_replaces_it(tmp_path):
    from bwl.study.experiments.methods import best_single_block

    with pytest.raises(FileNotFoundError, match=r"sweep.csv: no block sweep; run `python -m bwl sweep` first, or set "
                                                r"combine_block"):
        best_single_block(tmp_path / "sweep.csv", "combine_block")


def test_a_method_is_behind_the_merge_where_some_weights_give_at_least_its_identity_and_style():
    from bwl.study.experiments.combine_tables import behind_merge

    curve = [{"method": "merge 1/1", "identity": 0.76, "style": 0.43},
             {"method": "merge 0.75/1", "identity": 0.54, "style": 0.52}]
    assert behind_merge({"identity": 0.45, "style": 0.27}, curve) == "merge 1/1"  # smaller margins 0.16 vs 0.09
    assert behind_merge({"identity": 0.40, "style": 0.50}, curve) == "merge 0.75/1"  # 1/1 has less style
    assert behind_merge({"identity": 0.86, "style": 0.01}, curve) == "no"
