"""Files from the wild: text-encoder LoRA end to end, modules outside the nine blocks, shape checks before anything is
written, validated metadata, blocks SD1.x does not have, and one-line errors on the command line."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from bwl.__main__ import main
from bwl.adapters.compose import load_adapter, load_adapters, set_block_weights
from bwl.adapters.files import AdapterFileError, read_info, read_metadata, read_tensors
from bwl.adapters.kohya import export_kohya, import_kohya
from bwl.adapters.report import inspect_adapter
from bwl.adapters.text_encoder import text_encoder_targets
from bwl.sd.pipeline import load_pipeline
from bwl.sd.tiny import sd1_unet
from bwl.train import TrainConfig, train

from .conftest import assert_float32_equal, float32_bound
from .test_adapter_files import kohya_file, trained_file
from .test_data import write_images

PROMPTS = ["a photo of sks dog", "a red cat in the style of painting"]


def text_output(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def lora_pair(weight: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.randn(rank, weight.shape[1], *weight.shape[2:], generator=generator) * 0.3
    up = torch.randn(weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else []), generator=generator) * 0.3
    return down, up


def te_kohya_file(path, pipe, rank=2, alpha=1.0, extra_unet: dict | None = None, seed=0):
    """A kohya file with LoRA on every text-encoder layer kohya adapts (named by kohya's rules) and on the U-Net's
    up_blocks.3 attention projections."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in text_encoder_targets(pipe.text_encoder):
        key = "lora_te_text_model_" + name.replace(".", "_")
        weight = pipe.text_encoder.get_submodule(name).weight
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = lora_pair(weight, rank, g)
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    for name in ("up_blocks.3.attentions.0.proj_in", "up_blocks.3.attentions.0.proj_out", *(extra_unet or {})):
        weight = (extra_unet or {}).get(name)
        weight = pipe.unet.get_submodule(name).weight if weight is None else weight
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = lora_pair(weight, rank, g)
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                            "ss_max_train_steps": "not a number"})
    return path


def merged_text_encoder(pipe, path) -> torch.nn.Module:
    """The base text encoder with every lora_te_ module merged by hand: W + alpha / rank * up @ down."""
    tensors = read_tensors(path)
    merged = copy.deepcopy(pipe.text_encoder)
    for name in text_encoder_targets(merged):
        key = "lora_te_text_model_" + name.replace(".", "_")
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        scale = tensors[f"{key}.alpha"].item() / down.shape[0]
        merged.get_submodule(name).weight.data += scale * up @ down
    return merged


def test_text_encoder_lora_imports_exports_and_imports_again_and_base_weight_scales_it(pipe, tiny_dir, tmp_path):
    source = te_kohya_file(tmp_path / "te.safetensors", pipe)
    base = text_output(pipe)
    reference = merged_text_encoder(pipe, source)
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids)[0]
    assert (expected - base).abs().max() > 0.1

    first = import_kohya(source, pipe, tmp_path / "bwl.safetensors")
    te_keys = [k for k in read_tensors(first) if k.startswith("text_encoder.")]
    assert len(te_keys) == 2 * len(text_encoder_targets(pipe.text_encoder))
    report = inspect_adapter(first)
    assert report.text_encoder_modules == 12 and report.ranks["BASE"] == [2] and report.alphas["BASE"] == [1.0]
    exported = export_kohya(first, tmp_path / "kohya.safetensors")
    assert {k for k in read_tensors(exported) if k.startswith("lora_te_")} == {
        k for k in read_tensors(source) if k.startswith("lora_te_")}
    second = import_kohya(exported, pipe, tmp_path / "again.safetensors")
    first_tensors, second_tensors = read_tensors(first), read_tensors(second)
    assert first_tensors.keys() == second_tensors.keys()
    assert all(torch.equal(first_tensors[k], second_tensors[k]) for k in first_tensors)

    for path in (source, second):  # the raw kohya file and bwl's own file apply alike
        fresh = load_pipeline(tiny_dir)
        load_adapters(fresh, {"te": path})
        set_block_weights(fresh, {"te": {"BASE": 0}})
        assert torch.equal(text_output(fresh), base)
        set_block_weights(fresh, {"te": 1.0})  # LoRA layers or merged weights: equal up to float32 rounding
        assert_float32_equal(text_output(fresh), expected, float32_bound(fresh.text_encoder), effect=base)


def test_a_file_for_another_unet_width_is_refused_naming_the_module_and_shapes(pipe, tiny_dir, tmp_path, capsys):
    wider = sd1_unet(block_out_channels=(64, 64, 128, 128))
    kohya_file(tmp_path / "wide.safetensors", wider, {"up_blocks.3": 4}, alpha=1)
    out = tmp_path / "imported.safetensors"
    code = main(["import-kohya", str(tmp_path / "wide.safetensors"), str(out), "--model", str(tiny_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("bwl: error: ") and err.count("\n") == 1, err
    assert "up_blocks.3.attentions.0.proj_in" in err and "(4, 64, 1, 1)" in err and "(32, 32, 1, 1)" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "wide.safetensors"]
    with pytest.raises(AdapterFileError, match=r"proj_in: LoRA down \(4, 64, 1, 1\).*weight \(32, 32, 1, 1\)") as err:
        load_adapter(pipe, tmp_path / "wide.safetensors", "wide")
    assert len(str(err.value)) < 400
    narrow_te = te_kohya_file(tmp_path / "te.safetensors", pipe)
    tensors = read_tensors(narrow_te)
    tensors["lora_te_text_model_encoder_layers_1_mlp_fc2.lora_down.weight"] = torch.zeros(2, 99)
    save_file(tensors, str(tmp_path / "te_bad.safetensors"))
    with pytest.raises(AdapterFileError, match=r"text-encoder module encoder.layers.1.mlp.fc2: LoRA down \(2, 99\)"):
        import_kohya(tmp_path / "te_bad.safetensors", pipe, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_modules_outside_the_nine_blocks_are_listed_not_placed_and_import_drops_them_only_when_asked(
    pipe, tiny_dir, tmp_path, capsys
):
    path = te_kohya_file(tmp_path / "full.safetensors", pipe, extra_unet={"conv_in": None,
                                                                          "time_embedding.linear_1": None})
    report = inspect_adapter(path)
    assert set(report.not_placed) == {"conv_in", "time_embedding_linear_1"} and report.blocks == "OUT3"
    table = report.table()
    assert "not placed (outside the paper blocks): conv_in" in table and "time_embedding_linear_1" in table
    assert "unreadable kohya metadata: ss_max_train_steps" in table
    with pytest.raises(AdapterFileError, match="lora_unet_conv_in, lora_unet_time_embedding_linear_1; pass drop"):
        import_kohya(path, pipe, tmp_path / "refused.safetensors")
    assert not (tmp_path / "refused.safetensors").exists()
    out = tmp_path / "dropped.safetensors"
    assert main(["import-kohya", str(path), str(out), "--model", str(tiny_dir), "--drop-unplaced"]) == 0
    kept = inspect_adapter(out)
    assert kept.not_placed == {} and kept.blocks == "OUT3" and kept.text_encoder_modules == 12
    assert read_metadata(out)["bwl_steps"] == "0"


@pytest.mark.parametrize("key", ["lora_unet_down_blocks_9_attentions_0_proj_in", "unet.up_blocks.7.resnets.0.conv1"])
def test_a_block_sd1_does_not_have_is_an_error_naming_the_key_and_the_valid_blocks(tmp_path, key, capsys):
    down, up = (f"{key}.lora_down.weight", f"{key}.lora_up.weight") if key.startswith("lora_") else (
        f"{key}.lora_A.weight", f"{key}.lora_B.weight")
    save_file({down: torch.zeros(2, 8), up: torch.zeros(8, 2)}, str(tmp_path / "nine.safetensors"))
    with pytest.raises(AdapterFileError, match=rf"key '{key}.*a block SD 1.x does not have; valid blocks: "
                                                r"IN0 \(down_blocks.0\), .*MID \(mid_block\), .*OUT3 \(up_blocks.3\)"):
        inspect_adapter(tmp_path / "nine.safetensors")
    assert main(["inspect", str(tmp_path / "nine.safetensors")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


MALFORMED = [
    ("bwl_spec", "{not json", "'bwl_spec' is not JSON"),
    ("bwl_spec", "[1, 2]", "'bwl_spec' must be a JSON dict, got list"),
    ("bwl_spec", '{"method": "lora", "rnak": 4}', "'bwl_spec' is not an adapter spec"),
    ("bwl_block_ranks", '["IN01"]', "'bwl_block_ranks' must be a JSON dict, got list"),
    ("bwl_block_ranks", '{"IN99": 4}', "'bwl_block_ranks.IN99' must be a kohya fine block"),
    ("bwl_alpha", '"two"', "'bwl_alpha' must be a number or null"),
    ("bwl_steps", "many", "'bwl_steps' must be an integer >= 0"),
    ("bwl_method", "lorax", "'bwl_method' must be one of lora, locon"),
    ("bwl_blocks", "IN7", "'bwl_blocks' is not a block spec"),
    ("lora_adapter_metadata", "{oops", "'lora_adapter_metadata' is not JSON"),
    ("lora_adapter_metadata", "[]", "'lora_adapter_metadata' must be a JSON dict, got list"),
    ("lora_adapter_metadata", '{"r": 4, "lora_alpha": 2}', "has key 'r'; keys are unet.<field>"),
    ("lora_adapter_metadata", '{"unet.r": 4, "unet.lora_alpha": "2"}', "'lora_adapter_metadata: unet.lora_alpha'"),
    ("lora_adapter_metadata", '{"unet.r": 4, "unet.lora_alpha": 2, "unet.alpha_pattern": [1]}', "alpha_pattern"),
]


@pytest.mark.parametrize(("field", "value", "message"), MALFORMED)
def test_malformed_bwl_metadata_is_an_error_naming_the_field(pipe, tiny_dir, tmp_path, field, value, message):
    from bwl.adapters.spec import AdapterSpec

    good = trained_file(pipe, tmp_path / "good.safetensors", AdapterSpec("lora", "upper", rank=4, alpha=2))
    save_file(read_tensors(good), str(tmp_path / "bad.safetensors"), metadata={**read_metadata(good), field: value})
    bad = tmp_path / "bad.safetensors"
    for read in (inspect_adapter, read_info, lambda p: load_adapters(load_pipeline(tiny_dir), {"a": p})):
        with pytest.raises(AdapterFileError, match=f"bad.safetensors: metadata field .*{message}".replace("(", r"\(")
                           .replace(")", r"\)").replace("[", r"\[")):
            read(bad)


def test_unreadable_kohya_metadata_leaves_the_file_readable_from_its_tensors(pipe, tmp_path):
    path = kohya_file(tmp_path / "k.safetensors", pipe.unet, {"up_blocks.3": 4}, alpha=2)
    save_file(read_tensors(path), str(path), metadata={"ss_network_dim": "four", "ss_network_args": "{broken",
                                                      "ss_sd_model_name": "sd14"})
    report = inspect_adapter(path)
    assert report.metadata["ss_network_dim"] == "unreadable" and report.metadata["ss_network_args"] == "unreadable"
    assert report.metadata["ss_sd_model_name"] == "sd14"
    assert report.ranks["OUT3"] == [4] and report.alphas["OUT3"] == [2]


def test_named_failures_of_each_kind_are_one_line_on_the_command_line(tmp_path, tiny_dir, capsys):
    (tmp_path / "empty").mkdir()
    save_file({"unet.up_blocks.3.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 8)},
              str(tmp_path / "a.safetensors"), metadata={"lora_adapter_metadata": "[]"})
    train_flags = ["train", "--model", str(tiny_dir), "--resolution", "64", "--steps", "1",
                   "--output-dir", str(tmp_path / "run")]
    cases = {
        "BlockSpecError": [*train_flags, "--blocks", "IN0+OUT9"],
        "ConfigError": [*train_flags, "--steps", "-5"],
        "DatasetError": [*train_flags, "--instance-dir", str(tmp_path / "empty")],
        "AdapterFileError": ["inspect", str(tmp_path / "a.safetensors")],
    }
    for kind, argv in cases.items():
        assert main(argv) == 2, kind
        err = capsys.readouterr().err
        assert err.startswith("bwl: error: ") and err.count("\n") == 1 and "Traceback" not in err, (kind, err)
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_a_text_encoder_lora_trained_by_bwl_exports_with_kohya_names_and_loads_in_diffusers(tmp_path, tiny_dir):
    write_images(tmp_path / "images", count=2)
    config = TrainConfig(output_dir=str(tmp_path / "run"), model=str(tiny_dir), instance_dir=str(tmp_path / "images"),
                         resolution=64, steps=4, batch_size=2, repeats=1, checkpoint_every=2, learning_rate=1e-2,
                         train_text_encoder=True, text_encoder_lr=5e-3, blocks="upper")
    base = load_pipeline(tiny_dir)
    trained = load_pipeline(tiny_dir)
    path = train(config, pipe=trained)
    base_weights = base.text_encoder.state_dict()
    for name, weight in trained.text_encoder.state_dict().items():  # the text encoder's own weights are untouched
        assert "lora_" in name or torch.equal(weight, base_weights[name.replace(".base_layer", "")]), name
    assert read_info(path).spec.text_encoder
    report = inspect_adapter(path)
    assert report.text_encoder_modules == 12 and report.blocks == "upper"
    checkpoint = read_tensors(sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors"))[-1])
    assert any(k.startswith("model.text_encoder.") for k in checkpoint)

    ours = load_pipeline(tiny_dir)
    load_adapter(ours, path, "bwl")
    expected = text_output(ours)
    assert (expected - text_output(base)).abs().max() > 0  # the text encoder did train
    kohya = export_kohya(path, tmp_path / "kohya.safetensors")
    te_keys = [k for k in read_tensors(kohya) if k.startswith("lora_te_")]
    assert len(te_keys) == 36 and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_keys)
    theirs = load_pipeline(tiny_dir)
    theirs.load_lora_weights(str(kohya), adapter_name="k")  # diffusers' kohya path and bwl's: two code paths
    assert_float32_equal(text_output(theirs), expected, float32_bound(theirs.text_encoder))


def test_text_encoder_training_has_its_own_learning_rate_and_resumes_exactly(tmp_path, tiny_dir):
    from bwl.train.run import TrainingRun

    write_images(tmp_path / "images", count=2)
    # batch 2: at batch 1 two uninterrupted CPU runs already differ in the last bits (a kernel, not the resume)
    values = dict(model=str(tiny_dir), instance_dir=str(tmp_path / "images"), resolution=64, steps=4, batch_size=2,
                  repeats=1, checkpoint_every=2, learning_rate=1e-3, train_text_encoder=True, text_encoder_lr=2e-4)
    run = TrainingRun(TrainConfig(output_dir=str(tmp_path / "x"), **values))
    assert [g["lr"] for g in run.optimizer.param_groups] == [1e-3, 2e-4]
    assert sum(p.numel() for p in run.optimizer.param_groups[1]["params"]) == sum(
        p.numel() for n, p in run.text_encoder.named_parameters() if "lora_" in n)
    whole = train(TrainConfig(output_dir=str(tmp_path / "whole"), **values))
    train(TrainConfig(output_dir=str(tmp_path / "parts"), stop_after=2, **values))
    resumed = train(TrainConfig(output_dir=str(tmp_path / "parts"), resume=True, **values))
    a, b = read_tensors(whole), read_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(read_metadata(whole)["bwl_spec"])["text_encoder"] is True
