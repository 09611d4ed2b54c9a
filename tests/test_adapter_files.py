import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bwl.adapters.compose import load_adapter, load_adapters, set_block_weights
from bwl.adapters.files import AdapterFileError, read_info, read_metadata, read_tensors, save_adapter
from bwl.adapters.kohya import export_kohya, import_kohya
from bwl.adapters.report import inspect_adapter
from bwl.adapters.spec import AdapterSpec, add_adapter
from bwl.sd.pipeline import load_pipeline

from .conftest import assert_float32_equal, pipeline_bound, randomize_lora, render


def trained_file(pipe, path, spec, name="a", seed=0):
    add_adapter(pipe.unet, spec, name)
    randomize_lora(pipe.unet, seed=seed)
    return save_adapter(pipe.unet, path, spec, name, base_model="tiny-sd", trigger="sks", steps=123)


LOCON = AdapterSpec("locon", "upper+OUT0", rank=4, alpha=2, conv_rank=2, block_ranks={"OUT3": 8})


def test_round_trip_is_exact(pipe, tiny_dir, tmp_path):
    path = trained_file(pipe, tmp_path / "a.safetensors", LOCON)
    expected = render(pipe)
    fresh = load_pipeline(tiny_dir)
    load_adapter(fresh, path, "a")
    from peft.utils import get_peft_model_state_dict

    saved = read_tensors(path)
    reloaded = get_peft_model_state_dict(fresh.unet, adapter_name="a")
    assert set(saved) == {f"unet.{k}" for k in reloaded}
    assert all(torch.equal(saved[f"unet.{k}"], v) for k, v in reloaded.items())  # the file holds the weights exactly
    # in memory or loaded: two code paths for one function, equal up to float32 rounding on any CPU
    assert_float32_equal(render(fresh), expected, pipeline_bound(fresh), effect=render(load_pipeline(tiny_dir)))


def test_metadata_records_the_run(pipe, tmp_path):
    path = trained_file(pipe, tmp_path / "a.safetensors", LOCON)
    info = read_info(path)
    assert info.spec == dataclasses.replace(LOCON, architecture="sd1")  # the file records the layout it was made in
    assert read_metadata(path)["bwl_architecture"] == "sd1"
    assert (info.base_model, info.trigger, info.steps) == ("tiny-sd", "sks", 123)
    assert info.block_ranks["OUT09"] == 8 and info.block_ranks["IN01"] == 4 and "M00" not in info.block_ranks
    meta = read_metadata(path)
    assert meta["bwl_method"] == "locon" and meta["bwl_blocks"] == "IN0+OUT0+OUT3" and meta["bwl_version"]
    assert json.loads(meta["bwl_alpha"]) == 2


def test_kohya_export_loads_in_diffusers_with_alpha_not_rank(pipe, tiny_dir, tmp_path):
    path = trained_file(pipe, tmp_path / "a.safetensors", LOCON)
    expected = render(pipe)
    kohya = export_kohya(path, tmp_path / "a_kohya.safetensors")
    tensors = read_tensors(kohya)
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert tensors["lora_unet_up_blocks_3_attentions_0_proj_in.alpha"].item() == 2.0
    assert tensors["lora_unet_up_blocks_3_attentions_0_proj_in.lora_down.weight"].shape[0] == 8
    meta = read_metadata(kohya)
    args = json.loads(meta["ss_network_args"])
    assert len(args["block_dims"].split(",")) == 25
    assert args["block_dims"].split(",")[1:4] == ["4", "4", "0"]  # IN01, IN02; IN03 holds only the 3x3 downsampler
    assert args["conv_block_dims"].split(",")[1:4] == ["2", "2", "2"]
    assert args["block_dims"].split(",")[9:12] == ["0", "0", "0"]  # IN09..IN11 not trained
    assert args["block_dims"].split(",")[22:25] == ["8", "8", "8"]  # OUT09..OUT11
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2" and args["conv_dim"] == "2"
    fresh = load_pipeline(tiny_dir)
    fresh.load_lora_weights(str(kohya), adapter_name="k")
    bound = pipeline_bound(fresh)
    assert_float32_equal(render(fresh), expected, bound, effect=render(load_pipeline(tiny_dir)))
    imported = import_kohya(kohya, fresh, tmp_path / "imported.safetensors")
    again = load_pipeline(tiny_dir)
    load_adapter(again, imported, "i")
    assert_float32_equal(render(again), expected, bound)


def kohya_file(path, unet, ranks: dict[str, int], alpha: float, conv: bool = False):
    """A kohya-format file made from kohya's naming rules alone: lora_unet_ + module name with '_'."""
    tensors = {}
    for name, module in unet.named_modules():
        block = ".".join(name.split(".")[:2]) if name.startswith(("down_blocks.", "up_blocks.")) else name.split(".")[0]
        if block not in ranks:
            continue
        is_attn = (
            ".attentions." in name
            and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and ("proj_" in name or "transformer_blocks" in name)
        )
        is_conv = conv and isinstance(module, torch.nn.Conv2d) and (".resnets." in name or "samplers" in name)
        if not (is_attn or is_conv):
            continue
        r = ranks[block]
        key = "lora_unet_" + name.replace(".", "_")
        w = module.weight
        if w.ndim == 4:
            tensors[f"{key}.lora_down.weight"] = torch.randn(r, w.shape[1], *w.shape[2:])
            tensors[f"{key}.lora_up.weight"] = torch.zeros(w.shape[0], r, 1, 1)
        else:
            tensors[f"{key}.lora_down.weight"] = torch.randn(r, w.shape[1])
            tensors[f"{key}.lora_up.weight"] = torch.zeros(w.shape[0], r)
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(2, 32)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(32, 2)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    return path


def test_inspect_reads_a_foreign_kohya_file(pipe, tmp_path):
    path = kohya_file(
        tmp_path / "foreign.safetensors",
        pipe.unet,
        {"down_blocks.1": 8, "up_blocks.0": 4, "up_blocks.2": 2},
        alpha=1,
        conv=True,
    )
    report = inspect_adapter(path)
    assert report.format == "kohya" and report.method == "locon"
    assert report.blocks == "IN1+OUT0+OUT2"
    assert report.ranks == {"IN1": [8], "OUT0": [4], "OUT2": [2], "BASE": [2]}  # BASE: the text encoder
    assert report.alphas["IN1"] == [1.0]
    assert report.text_encoder_modules == 1
    assert report.parameters["MID"] == 0 and report.parameters["IN1"] > 0
    assert "OUT0" in report.table()


def test_inspect_cli(pipe, tmp_path, capsys):
    from bwl.__main__ import main

    path = trained_file(pipe, tmp_path / "a.safetensors", AdapterSpec("lora", "middle", rank=4))
    main(["inspect", str(path)])
    out = capsys.readouterr().out
    assert "method:  lora" in out and "blocks:  middle" in out


def test_block_weight_zero_everywhere_is_the_base_model(pipe, tmp_path):
    base = render(pipe)
    trained_file(pipe, tmp_path / "a.safetensors", AdapterSpec("locon", "all", rank=4))
    assert not np.array_equal(render(pipe), base)
    set_block_weights(pipe, {"a": 0.0})
    assert np.array_equal(render(pipe), base)
    set_block_weights(pipe, {"a": "NONE"})
    assert np.array_equal(render(pipe), base)


@pytest.mark.parametrize(
    "method, block, prefix",
    [
        ("lora", "OUT3", "unet.up_blocks.3."),
        ("locon", "OUT0", "unet.up_blocks.0."),
        ("locon", "IN3", "unet.down_blocks.3."),
    ],
)
def test_block_weight_zero_equals_removing_that_block(pipe, tiny_dir, tmp_path, method, block, prefix):
    path = trained_file(pipe, tmp_path / "a.safetensors", AdapterSpec(method, "all", rank=4))
    tensors = read_tensors(path)
    assert any(k.startswith(prefix) for k in tensors)
    full = load_pipeline(tiny_dir)
    load_adapter(full, path, "a")
    set_block_weights(full, {"a": {block: 0}})
    stripped = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    (tmp_path / "stripped").mkdir()
    save_file(stripped, str(tmp_path / "stripped" / "s.safetensors"), metadata={"format": "pt"})
    removed = load_pipeline(tiny_dir)
    removed.load_lora_weights(str(tmp_path / "stripped" / "s.safetensors"), adapter_name="s")
    assert np.array_equal(render(full), render(removed))


def test_two_adapters_compose_with_weights(pipe, tiny_dir, tmp_path):
    identity = trained_file(pipe, tmp_path / "id.safetensors", AdapterSpec("lora", "all", rank=4), "id", seed=1)
    other = load_pipeline(tiny_dir)
    style = trained_file(other, tmp_path / "style.safetensors", AdapterSpec("locon", "upper", rank=4), "style", seed=2)
    fresh = load_pipeline(tiny_dir)
    base = render(fresh)
    load_adapters(fresh, {"id": identity, "style": style})
    set_block_weights(fresh, {"id": 1.0, "style": "upper"})
    both = render(fresh)
    set_block_weights(fresh, {"id": 1.0})
    id_only = render(fresh)
    set_block_weights(fresh, {"id": 1.0, "style": 0.0})
    assert np.array_equal(render(fresh), id_only)
    assert not np.array_equal(both, id_only) and not np.array_equal(id_only, base)
    set_block_weights(fresh, {})
    assert np.array_equal(render(fresh), base)
    with pytest.raises(KeyError, match="not loaded"):
        set_block_weights(fresh, {"missing": 1.0})


def test_pickle_and_foreign_architecture_are_refused(pipe, tiny_dir, tmp_path):
    (tmp_path / "evil.ckpt").write_bytes(b"not really")
    with pytest.raises(AdapterFileError, match="pickle"):
        load_adapter(pipe, tmp_path / "evil.ckpt", "x")
    wrong = {"unet.up_blocks.3.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 99, 1, 1),
             "unet.up_blocks.3.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4, 1, 1)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(AdapterFileError, match=r"up_blocks.3.attentions.0.proj_in.*\(4, 99, 1, 1\)"):
        load_adapter(pipe, tmp_path / "wrong.safetensors", "w")
