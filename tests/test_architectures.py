"""SDXL and SD 2.x in the toolkit, on tiny random pipelines saved with ``save_pretrained`` and loaded by path: block
maps detected from the U-Net's config, block-wise training for every method, files both ways (bwl's own, kohya's
SGM names, LyCORIS), block weights, refusals of a file for the other layout, and the block analyzer on any file.

kohya's and lora-block-weight's facts are written out here from their sources (sd-scripts' ``sdxl_model_util`` and
``networks/lora.py``, lora-block-weight's ``BLOCKID12``/``BLOCKID20``), independently of bwl's code."""

import re

import pytest
import torch
from safetensors.torch import save_file

from bwl.__main__ import main
from bwl.adapters.architectures import SD1, SD2, SDXL, architecture_of, kohya_slots, sgm_name
from bwl.adapters.blocks import BlockSpecError, block_weights, fine_block, parse_selection
from bwl.adapters.compose import load_adapter, set_block_weights
from bwl.adapters.files import AdapterFileError, read_metadata, read_tensors, save_adapter
from bwl.adapters.kohya import export_kohya, import_kohya
from bwl.adapters.report import inspect_adapter
from bwl.adapters.spec import AdapterSpec, add_adapter, find_targets
from bwl.sd.pipeline import load_pipeline
from bwl.sd.tiny import build_tiny_sd2_pipeline, build_tiny_sdxl_pipeline
from bwl.train import train

from .conftest import assert_float32_equal, float32_bound, randomize_lora
from .test_methods import IDS, INTERCHANGE, VARIANTS
from .test_train import config

LBW_BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
LBW_BLOCKID20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]


def sd_scripts_sdxl_map() -> list[tuple[str, str]]:
    """(SGM prefix, diffusers prefix) pairs as sd-scripts' ``sdxl_model_util.make_unet_conversion_map`` lists them."""
    layers = []
    for i in range(3):
        for j in range(2):
            layers += [(f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."),
                       (f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")]
        for j in range(3):
            layers += [(f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."),
                       (f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}.")]
        layers += [(f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."),
                   (f"output_blocks.{3 * i + 2}.2.", f"up_blocks.{i}.upsamplers.0.")]
    layers += [("middle_block.1.", "mid_block.attentions.0.")]
    layers += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    resnet = [("in_layers.2.", "conv1."), ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."),
              ("skip_connection.", "conv_shortcut.")]
    pairs = []
    for sgm, hf in layers:
        pairs += [(sgm + s, hf + h) for s, h in resnet] if "resnets" in hf else [(sgm, hf)]
    return pairs


def by_hand(diffusers_name: str) -> str | None:
    """A diffusers module name in the original model, by the longest matching prefix of sd-scripts' map."""
    name = diffusers_name + "."
    matches = [(sgm, hf) for sgm, hf in sd_scripts_sdxl_map() if name.startswith(hf)]
    if not matches:
        return None
    sgm, hf = max(matches, key=lambda pair: len(pair[1]))
    return (sgm + name[len(hf):]).rstrip(".")


@pytest.fixture(scope="session")
def xl_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def sd2_dir(tmp_path_factory):
    return build_tiny_sd2_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd2", seed=0)


@pytest.fixture
def xl(xl_dir):
    return load_pipeline(xl_dir)


def xl_output(unet) -> torch.Tensor:
    """The SDXL U-Net's prediction for fixed random inputs, pooled text embedding and size ids included."""
    g, config = torch.Generator().manual_seed(0), unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    x, e = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), e, added_cond_kwargs=added).sample


def test_block_maps_follow_kohya_and_lora_block_weight(xl, pipe, sd2_dir):
    assert architecture_of(xl.unet.config) is SDXL and architecture_of(pipe.unet.config) is SD1
    assert architecture_of(load_pipeline(sd2_dir).unet.config) is SD2
    assert list(SDXL.lbw_short) == LBW_BLOCKID12 and list(SDXL.lbw_full) == LBW_BLOCKID20
    assert len(SD1.lbw_short) == 17 and len(SD1.lbw_full) == 26 and len(kohya_slots(SD1)) == 25
    assert len(kohya_slots(SDXL)) == 23  # sd-scripts: 1 + 9 + 3 + 9 + 1
    assert SDXL.groups["upper"] == ("IN0", "OUT2") and SDXL.groups["bottom"] == ("IN2", "OUT0")
    assert SD1.groups["upper"] == ("IN0", "OUT3") and SD1.groups["middle"] == ("IN1", "OUT2")
    checked = 0
    for name, _ in xl.unet.named_modules():
        expected = by_hand(name)
        if expected is not None and name.count(".") >= 4:
            assert sgm_name(name, SDXL) == expected, name
            assert fine_block(expected) == fine_block(name), name  # kohya's slot from either name
            checked += 1
    assert checked > 100
    with pytest.raises(BlockSpecError, match="not a layout bwl has a block map for"):
        architecture_of({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                         "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]})


def test_selections_read_in_the_layout():
    assert parse_selection("upper", SDXL) == ("IN01", "IN02", "IN03", "OUT06", "OUT07", "OUT08")
    assert parse_selection("OUT00+OUT01", SDXL) == ("OUT00", "OUT01")  # B-LoRA's content and style blocks
    vector = ",".join(["0"] * 11 + ["1", "1"] + ["0"] * 7)  # 20 values: BASE, IN00..IN08, M00, OUT00..OUT08
    assert parse_selection(vector, SDXL) == ("OUT00", "OUT01")
    assert block_weights("upper", SDXL)["OUT08"] == 1 and block_weights("upper", SDXL)["OUT00"] == 0
    assert set(block_weights(vector, SDXL)) == set(LBW_BLOCKID20)
    with pytest.raises(BlockSpecError, match="unknown block 'IN3'; valid on SDXL: IN0, IN1, IN2, MID, OUT0"):
        AdapterSpec("lora", "IN3", architecture="sdxl")
    with pytest.raises(BlockSpecError, match="12 or 20 values"):
        block_weights([1.0] * 17, SDXL)


def test_lora_on_blocks_without_attention_is_refused_naming_them(xl):
    with pytest.raises(BlockSpecError, match=r"lora on SDXL finds nothing to adapt in IN0 \(down_blocks.0: "
                                             r"DownBlock2D, no attention\), OUT2 \(up_blocks.2: UpBlock2D"):
        add_adapter(xl.unet, AdapterSpec("lora", "upper"))
    add_adapter(xl.unet, AdapterSpec("locon", "upper"))  # LoCon has resnets to adapt there


SELECTIONS = {"group": ("middle", {"IN04", "IN05", "IN06", "OUT03", "OUT04", "OUT05"}),
              "fine block": ("OUT01", {"OUT01"}),
              "20-value vector": (",".join(["1"] + ["0"] * 10 + ["1", "1"] + ["0"] * 7), {"OUT00", "OUT01"})}


@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize(("method", "dora"), VARIANTS, ids=IDS)
def test_training_adapts_only_the_selection_and_keeps_base_weights(tmp_path, xl_dir, xl, method, dora, selection):
    blocks, selected = SELECTIONS[selection]
    fine = selected & {t.fine_block for t in find_targets(xl.unet, method)}  # a downsampler holds no attention
    assert fine and (fine == selected or method in ("lora", "oft"))
    before = {k: v.clone() for k, v in xl.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in xl.text_encoder_2.state_dict().items()}
    final = train(config(tmp_path, xl_dir, method=method, dora=dora, blocks=blocks, steps=2, batch_size=1), pipe=xl)
    after = xl.unet.state_dict()
    for key, value in before.items():
        peft_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(value, after.get(key, after.get(peft_key))), key
    assert all(torch.equal(v, xl.text_encoder_2.state_dict()[k]) for k, v in text_before.items())
    trainable = {fine_block(n) for n, p in xl.unet.named_parameters() if p.requires_grad}
    assert trainable == fine
    assert {fine_block(k[len("unet."):].rsplit(".", 2)[0]) for k in read_tensors(final)} == fine
    assert read_metadata(final)["bwl_architecture"] == "sdxl"


def test_text_encoders_train_and_resume_exactly(tmp_path, xl_dir):
    common = dict(method="lora", blocks="all", train_text_encoder=True, steps=6, checkpoint_every=3,
                  shuffle_tags=True, random_flip=True)
    straight = train(config(tmp_path, xl_dir, output_dir=str(tmp_path / "a"), **common))
    stopped = config(tmp_path, xl_dir, output_dir=str(tmp_path / "b"), stop_after=3, **common)
    train(stopped)
    resumed = train(config(tmp_path, xl_dir, output_dir=str(tmp_path / "b"), resume=True, **common))
    a, b = read_tensors(straight), read_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("text_encoder_2.") for k in a) and any(k.startswith("text_encoder.") for k in a)


def lora_file(pipe, path, spec, name="a"):
    add_adapter(pipe.unet, spec, name)
    randomize_lora(pipe.unet)
    return save_adapter(pipe.unet, path, spec, name, base_model="tiny-sdxl", trigger="sks", steps=1)


def test_bwl_file_loads_in_diffusers_as_in_memory(tmp_path, xl_dir, xl):
    path = lora_file(xl, tmp_path / "a.safetensors", AdapterSpec("lora", "all", rank=4))
    expected = xl_output(xl.unet)
    fresh = load_pipeline(xl_dir)
    fresh.load_lora_weights(str(path), adapter_name="a")  # diffusers' own SDXL loader
    assert_float32_equal(xl_output(fresh.unet), expected, float32_bound(fresh.unet),
                         effect=xl_output(load_pipeline(xl_dir).unet))


@pytest.mark.parametrize(("method", "dora"), INTERCHANGE, ids=[i for i, v in zip(IDS, VARIANTS) if v in INTERCHANGE])
def test_kohya_export_import_round_trips(tmp_path, xl_dir, xl, method, dora):
    spec = AdapterSpec(method, "all", rank=4, dora=dora)
    add_adapter(xl.unet, spec, "a")
    with torch.no_grad():
        for param in xl.unet.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    path = save_adapter(xl.unet, tmp_path / "a.safetensors", spec, "a")
    kohya = export_kohya(path, tmp_path / "k.safetensors")
    keys = read_tensors(kohya)
    assert all(re.match(r"^lora_unet_(input_blocks|middle_block|output_blocks)_\d+_", k) for k in keys), list(keys)[:3]
    assert read_metadata(kohya)["ss_base_model_version"] == "sdxl_base_v1-0"
    back = read_tensors(import_kohya(kohya, load_pipeline(xl_dir), tmp_path / "back.safetensors"))
    original = read_tensors(path)
    assert back.keys() == original.keys()
    if method != "lokr":  # LyCORIS folds peft's LoKr scale into w1 (test_methods checks the output)
        assert all(torch.equal(back[k], original[k]) for k in original)


def handwritten_kohya_file(pipe, path, rank=2):
    """A LoCon file written from sd-scripts' rules alone: every Linear and Conv2d of the U-Net's transformers and
    resnets under its SGM name, and every attention/MLP Linear of both text encoders under lora_te1_/lora_te2_."""
    g, tensors = torch.Generator().manual_seed(3), {}

    def add(key, layer):
        shape = layer.weight.shape
        down = (rank, shape[1], *shape[2:]) if layer.weight.ndim == 4 else (rank, shape[1])
        up = (shape[0], rank, 1, 1) if layer.weight.ndim == 4 else (shape[0], rank)
        tensors.update({f"{key}.lora_down.weight": torch.randn(down, generator=g) * 0.1,
                        f"{key}.lora_up.weight": torch.randn(up, generator=g) * 0.1,
                        f"{key}.alpha": torch.tensor(1.0)})

    containers = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
    for name, module in pipe.unet.named_modules():
        if type(module).__name__ in containers:
            for child, layer in module.named_modules():
                if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and by_hand(f"{name}.{child}"):
                    add("lora_unet_" + by_hand(f"{name}.{child}").replace(".", "_"), layer)
    for prefix, encoder in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for name, layer in encoder.named_modules():
            if re.search(r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$", name):
                tail = name if name.startswith("text_model.") else f"text_model.{name}"
                add(prefix + tail.replace(".", "_"), layer)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_base_model_version":
                                            "sdxl_base_v1-0"})
    return path


def test_a_handwritten_kohya_sdxl_file_imports_applies_and_exports_with_its_names(tmp_path, xl_dir, xl):
    source = handwritten_kohya_file(xl, tmp_path / "kohya.safetensors")
    report = inspect_adapter(source)
    assert report.architecture == "SDXL" and all(report.parameters[b] for b in SDXL.paper_blocks)
    assert report.text_encoders.keys() == {"text_encoder", "text_encoder_2"}
    converted = import_kohya(source, load_pipeline(xl_dir), tmp_path / "bwl.safetensors")
    base = xl_output(xl.unet)
    load_adapter(xl, converted, "k")
    set_block_weights(xl, {"k": 1.0})
    assert (xl_output(xl.unet) - base).abs().max() > 1e-3
    again = export_kohya(converted, tmp_path / "again.safetensors")
    assert set(read_tensors(again)) == set(read_tensors(source))


def test_block_weight_zero_gives_the_base_layers_and_base_zero_the_base_text_encoders(tmp_path, xl_dir, xl):
    spec = AdapterSpec("lora", "all", rank=4, text_encoder=True)
    from bwl.adapters.text_encoder import add_text_encoder_adapter

    add_adapter(xl.unet, spec, "a")
    for encoder in (xl.text_encoder, xl.text_encoder_2):
        add_text_encoder_adapter(encoder, 4, None, "a")
    randomize_lora(xl.unet)
    for encoder in (xl.text_encoder, xl.text_encoder_2):
        randomize_lora(encoder)
    path = save_adapter(xl.unet, tmp_path / "a.safetensors", spec, "a",
                        text_encoder={"text_encoder": xl.text_encoder, "text_encoder_2": xl.text_encoder_2})
    base = load_pipeline(xl_dir)
    pipe = load_pipeline(xl_dir)
    load_adapter(pipe, path, "a")
    set_block_weights(pipe, {"a": {"OUT0": 0.0, "BASE": 0.0}})
    modules = dict(base.unet.named_modules())
    layers = [(n, m) for n, m in pipe.unet.named_modules() if n.startswith("up_blocks.0.") and hasattr(m, "base_layer")]
    assert layers
    for name, layer in layers:
        x = torch.randn(2, layer.base_layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(layer(x), modules[name](x)), name
    ids = base.tokenizer(["a photo of sks dog"], padding="max_length", return_tensors="pt").input_ids
    for attribute in ("text_encoder", "text_encoder_2"):
        with torch.no_grad():
            assert torch.equal(getattr(pipe, attribute)(ids)[0], getattr(base, attribute)(ids)[0]), attribute


def test_a_file_for_the_other_layout_is_refused_in_one_line_with_a_module_and_both_shapes(tmp_path, pipe, xl, xl_dir,
                                                                                           tiny_dir):
    sd1_file = lora_file(pipe, tmp_path / "sd1.safetensors", AdapterSpec("lora", "all", rank=4))
    xl_file = lora_file(xl, tmp_path / "xl.safetensors", AdapterSpec("lora", "all", rank=4))
    shapes = r"LoRA down \(\d+, \d+(, 1, 1)?\) and up \(\d+, \d+(, 1, 1)?\) do not fit its weight \(\d+, \d+"
    for file, target, words in ((sd1_file, load_pipeline(xl_dir), "an SD 1.x file on an SDXL U-Net"),
                                (xl_file, load_pipeline(tiny_dir), "an SDXL file on an SD 1.x U-Net")):
        with pytest.raises(AdapterFileError) as caught:
            load_adapter(target, file, "x")
        message = str(caught.value)
        assert "\n" not in message and re.search(rf"U-Net module \S+: {shapes}.*{words}", message), message
    kohya = export_kohya(xl_file, tmp_path / "xl-kohya.safetensors")  # SGM names reach the SD 1.x model's modules
    with pytest.raises(AdapterFileError, match=rf"{shapes}.*an SDXL file on an SD 1.x U-Net"):
        import_kohya(kohya, load_pipeline(tiny_dir), tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_sd2_shaped_pipeline_trains_loads_and_round_trips(tmp_path, sd2_dir):
    final = train(config(tmp_path, sd2_dir, method="locon", blocks="upper", steps=2))
    assert read_metadata(final)["bwl_architecture"] == "sd2"
    pipe = load_pipeline(sd2_dir)
    assert {t.paper_block for t in find_targets(pipe.unet, "lora")} == {"IN0", "IN1", "IN2", "MID", "OUT1", "OUT2",
                                                                      "OUT3"}
    kohya = export_kohya(final, tmp_path / "k.safetensors")
    assert read_metadata(kohya)["ss_v2"] == "True" and read_metadata(kohya)["ss_base_model_version"] == "sd_v2"
    back = read_tensors(import_kohya(kohya, pipe, tmp_path / "back.safetensors"))
    assert back.keys() == read_tensors(final).keys()


@pytest.mark.parametrize("model", ["sdxl", "sd1"])
def test_analyze_writes_the_block_effect_chart_and_table_for_any_file(tmp_path, xl_dir, tiny_dir, model, capsys):
    model_dir = xl_dir if model == "sdxl" else tiny_dir
    pipe = load_pipeline(model_dir)
    path = lora_file(pipe, tmp_path / "a.safetensors", AdapterSpec("locon", "all", rank=4))
    out = tmp_path / "effects"
    assert main(["analyze", str(path), "--model", str(model_dir), "--prompt", "a photo of sks dog",
                 "--seeds", "2", "--steps", "2", "--out", str(out)]) == 0
    table = (out / "block_effects.md").read_text()
    blocks = SDXL.paper_blocks if model == "sdxl" else SD1.paper_blocks
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == list(blocks)
    assert all(re.search(r"\| \d+\.\d\d ± \d+\.\d\d \|", line) for line in table.splitlines()[2:])
    assert (out / "block_effects.png").stat().st_size > 0 and (out / "block_effects.csv").exists()
    assert capsys.readouterr().out.strip().endswith(table.strip().splitlines()[-1])


def test_paper_xl_profile_is_the_paper_on_sdxl_and_the_study_path_runs_on_a_tiny_sdxl(tmp_path, xl_dir):
    from bwl.study import Study, load_profile

    p = load_profile("paper-xl")
    assert p.model == "stabilityai/stable-diffusion-xl-base-1.0" and p.resolution == 1024
    assert p.train["steps"] == 11000 and p.train["batch_size"] == 2 and p.metrics == "reference"
    assert "fig2" not in p.grids  # LoRA on SDXL's upper pair (no attention) trains nothing
    study = Study(load_profile("smoke", {"model": str(xl_dir), "build_tiny": False, "grids": ["fig4b"], "seeds": [0],
                                         "runs_dir": str(tmp_path / "runs"), "figures_dir": str(tmp_path / "figures")}))
    study.prepare_data()
    logs = []
    study.train_all(log=logs.append)
    study.run_grids(log=logs.append)
    assert any("fig4b: 6 cells" in line for line in logs), logs
    style_upper = next((tmp_path / "runs").rglob("style_locon_upper*/adapter.safetensors"))
    assert read_metadata(style_upper)["bwl_architecture"] == "sdxl"
    assert inspect_adapter(style_upper).blocks == "upper" and inspect_adapter(style_upper).parameters["OUT2"] > 0


def test_the_block_vocabulary_stays_torch_free():
    import ast
    from pathlib import Path

    import bwl.adapters.architectures as architectures
    import bwl.adapters.blocks as blocks

    for module in (architectures, blocks):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"torch", "diffusers", "transformers", "peft", "numpy"}, (module.__name__, imported)
