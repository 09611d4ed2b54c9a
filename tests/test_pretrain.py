"""Pretraining the micro SD resumes from its checkpoints: an interrupted run ends where an uninterrupted one does."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bwl.toy.pretrain as pretrain_module
from bwl.toy.pretrain import PretrainConfig, pretrain


def tiny_config(tmp_path, name: str, unet_steps: int = 4) -> PretrainConfig:
    return PretrainConfig(
        work_dir=str(tmp_path / name / "work"),
        model_dir=str(tmp_path / name / "model"),
        vae_steps=2,
        vae_batch=4,
        unet_steps=unet_steps,
        unet_batch=4,
        dataset_size=8,
        checkpoint_every=1,
        log_every=1,
    )


def unet_weights(config: PretrainConfig) -> dict[str, torch.Tensor]:
    return load_file(next((Path(config.model_dir) / "unet").glob("*.safetensors")))


def test_killed_pretraining_resumes_to_the_same_model(tmp_path, monkeypatch):
    straight = tiny_config(tmp_path, "straight")
    pretrain(straight)

    interrupted = tiny_config(tmp_path, "interrupted")
    save_checkpoint = pretrain_module._checkpoint

    killed_at = {}

    def crash_after_step_two(stage_dir, modules, optimizer, scheduler, step, minutes=0.0):
        save_checkpoint(stage_dir, modules, optimizer, scheduler, step, minutes)
        if stage_dir.name == "unet" and step == 2:
            killed_at["minutes"] = minutes
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pretrain_module, "_checkpoint", crash_after_step_two)
    with pytest.raises(KeyboardInterrupt):
        pretrain(interrupted)
    monkeypatch.setattr(pretrain_module, "_checkpoint", save_checkpoint)
    pretrain(interrupted)

    expected, resumed = unet_weights(straight), unet_weights(interrupted)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    record = json.loads((tmp_path / "interrupted" / "model" / "pretrain.json").read_text())
    assert [s["resumed_unet_at"] for s in record["sessions"]] == [2]
    session = record["sessions"][0]  # the killed run's minutes, up to its last checkpoint, count in the record
    assert killed_at["minutes"] > 0 and session["minutes"]["interrupted_runs"] == round(killed_at["minutes"], 1)
    assert session["minutes_through"] > killed_at["minutes"]


def test_raising_the_step_count_extends_the_record(tmp_path):
    pretrain(tiny_config(tmp_path, "run", unet_steps=2))
    pretrain(tiny_config(tmp_path, "run", unet_steps=3))
    record = json.loads((tmp_path / "run" / "model" / "pretrain.json").read_text())
    assert [(s["config"]["unet_steps"], s["resumed_unet_at"]) for s in record["sessions"]] == [(2, 0), (3, 2)]
    assert record["minutes"] == pytest.approx(sum(s["minutes"]["total"] for s in record["sessions"]), abs=0.11)


def test_the_sdxl_shaped_toy_pretrains_reusing_the_sd_toys_vae_and_loads_as_sdxl_base_does(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from bwl.adapters.architectures import SDXL
    from bwl.adapters.spec import unet_architecture

    sd = tiny_config(tmp_path, "sd", unet_steps=1)
    pretrain(sd)
    config = PretrainConfig(architecture="sdxl", vae_from=sd.model_dir, work_dir=str(tmp_path / "xl" / "work"),
                            model_dir=str(tmp_path / "xl" / "model"), unet_steps=2, unet_batch=4, dataset_size=8,
                            checkpoint_every=1, log_every=1)
    assert PretrainConfig(architecture="sdxl").model_dir == "data/toy-sdxl"  # never the SD toy's folder by default
    pipe = StableDiffusionXLPipeline.from_pretrained(pretrain(config), torch_dtype=torch.float32)
    assert unet_architecture(pipe.unet) is SDXL and pipe.unet.config.sample_size == 16
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + \
        pipe.text_encoder_2.config.hidden_size
    same = load_file(next((Path(sd.model_dir) / "vae").glob("*.safetensors")))
    assert all(torch.equal(v, load_file(next((Path(config.model_dir) / "vae").glob("*.safetensors")))[k])
               for k, v in same.items())
    link = Path(config.model_dir) / "vae"  # one copy of the shared VAE: a relative link, as in data/toy-sdxl
    assert link.is_symlink() and not Path(os.readlink(link)).is_absolute()
    assert link.resolve() == (Path(sd.model_dir) / "vae").resolve()
    sd_vae = {f.name: f.read_bytes() for f in (Path(sd.model_dir) / "vae").iterdir()}
    pretrain(dataclasses.replace(config, unet_steps=3))  # saving again never writes through the link
    assert {f.name: f.read_bytes() for f in (Path(sd.model_dir) / "vae").iterdir()} == sd_vae
    assert link.is_symlink()
    image = pipe("circle, red, tophat", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    record = json.loads((Path(config.model_dir) / "pretrain.json").read_text())
    assert record["command"] == "python -m bwl pretrain --architecture sdxl"
    assert record["sessions"][0]["config"]["vae_from"] == sd.model_dir
    with pytest.raises(FileNotFoundError, match="vae_from='nowhere'"):
        pretrain(PretrainConfig(architecture="sdxl", vae_from="nowhere", work_dir=str(tmp_path / "w"),
                                model_dir=str(tmp_path / "m")))


def test_a_linked_vae_counts_in_the_models_fingerprint_as_a_copy_would(tmp_path):
    """Cells and adapters are keyed by the base model's files: the SDXL toy's linked VAE is part of them."""
    import shutil

    from bwl.core.hashing import fingerprint

    vae = tmp_path / "sd" / "vae"
    vae.mkdir(parents=True)
    (vae / "weights.safetensors").write_bytes(b"one")
    for name in ("copied", "linked"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
    shutil.copytree(vae, tmp_path / "copied" / "vae")
    (tmp_path / "linked" / "vae").symlink_to("../sd/vae", target_is_directory=True)
    assert fingerprint(tmp_path / "linked") == fingerprint(tmp_path / "copied")
    before = fingerprint(tmp_path / "linked")
    (vae / "weights.safetensors").write_bytes(b"two")
    assert fingerprint(tmp_path / "linked") != before
