"""Pretraining the micro SD resumes from its checkpoints: an interrupted run ends where an uninterrupted one does."""

import json
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

    def crash_after_step_two(stage_dir, modules, optimizer, scheduler, step):
        save_checkpoint(stage_dir, modules, optimizer, scheduler, step)
        if stage_dir.name == "unet" and step == 2:
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


def test_raising_the_step_count_extends_the_record(tmp_path):
    pretrain(tiny_config(tmp_path, "run", unet_steps=2))
    pretrain(tiny_config(tmp_path, "run", unet_steps=3))
    record = json.loads((tmp_path / "run" / "model" / "pretrain.json").read_text())
    assert [(s["config"]["unet_steps"], s["resumed_unet_at"]) for s in record["sessions"]] == [(2, 0), (3, 2)]
    assert record["minutes"] == pytest.approx(sum(s["minutes"]["total"] for s in record["sessions"]), abs=0.11)
