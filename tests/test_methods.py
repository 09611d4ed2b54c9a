"""Every adapter method (LoRA, LoCon, LoHa, LoKr, DoRA, OFT): block-wise training, files, LyCORIS interchange, per-block
learning rates and LoRA+. LyCORIS' math is written out here, independently of bwl and peft, from its docs and code."""

import json
import math

import pytest
import torch

from bwl.adapters import export_kohya, import_kohya, inspect_adapter, load_adapter, save_adapter, set_block_weights
from bwl.adapters.block_lr import block_lr_weights, kohya_preset
from bwl.adapters.blocks import BlockSpecError, paper_block
from bwl.adapters.files import AdapterFileError, read_metadata, read_tensors
from bwl.adapters.spec import AdapterSpec, add_adapter
from bwl.core.config import ConfigError
from bwl.sd.pipeline import load_pipeline
from bwl.study.design.runs import run_key
from bwl.train import TrainConfig, train
from bwl.train.run import TrainingRun

from .conftest import assert_float32_equal, float32_bound
from .test_train import config

VARIANTS = [("lora", False), ("locon", False), ("locon", True), ("lora", True), ("loha", False), ("lokr", False),
            ("oft", False)]
IDS = ["lora", "locon", "locon-dora", "lora-dora", "loha", "lokr", "oft"]
INTERCHANGE = [v for v in VARIANTS if v[0] != "oft"]
LYCORIS_KEY = r"^lora_unet_(down_blocks|mid_block|up_blocks)_[a-z0-9_]+\.({})$"
LYCORIS_TENSORS = {"lora": "alpha|lora_down\\.weight|lora_up\\.weight|dora_scale",
                   "loha": "alpha|hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b",
                   "lokr": "alpha|lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b"}


def unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), e).sample


def trained_file(tmp_path, tiny_dir, method, dora, name="a", **spec_values):
    """A random (non-zero) adapter of ``method`` on upper, saved; returns (file, that U-Net's output)."""
    pipe = load_pipeline(tiny_dir)
    spec = AdapterSpec(method=method, blocks="upper", rank=4, dora=dora, **spec_values)
    add_adapter(pipe.unet, spec, name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in pipe.unet.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
    path = save_adapter(pipe.unet, tmp_path / f"{method}{'-dora' if dora else ''}.safetensors", spec, name)
    return path, unet_output(pipe.unet)


def loaded_output(tiny_dir, path, weights=1.0) -> torch.Tensor:
    pipe = load_pipeline(tiny_dir)
    load_adapter(pipe, path, "x")
    set_block_weights(pipe, {"x": weights})
    return unet_output(pipe.unet)


@pytest.mark.parametrize("method,dora", VARIANTS, ids=IDS)
def test_training_touches_only_the_selected_blocks(tmp_path, tiny_dir, pipe, method, dora):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    final = train(config(tmp_path, tiny_dir, method=method, dora=dora, blocks="upper", steps=3), pipe=pipe)
    after = pipe.unet.state_dict()
    for key, value in before.items():
        peft_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(value, after.get(key, after.get(peft_key))), key
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and {paper_block(n) for n in trainable} == {"IN0", "OUT3"}
    assert {paper_block(k[len("unet."):]) for k in read_tensors(final)} == {"IN0", "OUT3"}
    report = inspect_adapter(final)
    assert report.method == (f"{method}-dora" if dora else method)
    assert {b for b, n in report.parameters.items() if n} == {"IN0", "OUT3"}


@pytest.mark.parametrize("method,dora", VARIANTS, ids=IDS)
def test_save_then_load_gives_the_same_unet_output(tmp_path, tiny_dir, method, dora):
    path, expected = trained_file(tmp_path, tiny_dir, method, dora)
    fresh = load_pipeline(tiny_dir)
    base = unet_output(fresh.unet)
    loaded = loaded_output(tiny_dir, path)
    # Added in memory or loaded from the file: two code paths, equal up to float32 rounding (their sums may run in
    # another order on another CPU); the same path twice is bit-identical.
    assert_float32_equal(loaded, expected, float32_bound(fresh.unet), effect=base)
    assert torch.equal(loaded_output(tiny_dir, path), loaded)
    assert torch.equal(loaded_output(tiny_dir, path, 0.0), base)  # weight 0 adds exact zeros: the base layer
    if method == "oft":
        with pytest.raises(ValueError, match="OFT.*0 or 1"):
            loaded_output(tiny_dir, path, 0.5)


@pytest.mark.parametrize("method,dora", INTERCHANGE, ids=[i for i in IDS if i != "oft"])
def test_export_then_import_gives_the_same_unet_output(tmp_path, tiny_dir, method, dora):
    path, expected = trained_file(tmp_path, tiny_dir, method, dora, alpha=2.0)  # alpha != rank: scales must carry
    kohya = export_kohya(path, tmp_path / "kohya.safetensors")
    back = import_kohya(kohya, load_pipeline(tiny_dir), tmp_path / "back.safetensors")
    for file in (kohya, back):
        out = loaded_output(tiny_dir, file)
        assert_float32_equal(out, expected, float32_bound(load_pipeline(tiny_dir).unet))


def lycoris_delta(tensors: dict, key: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight a LyCORIS module gives (W + scale * ΔW, DoRA-normalised per output row), by LyCORIS' rules."""
    t = {k[len(key) + 1:]: v.double() for k, v in tensors.items() if k.startswith(key + ".")}
    w, alpha = weight.double(), float(t["alpha"])
    flat = w.shape[0], w[0].numel()
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * alpha / rank
        return w + delta.reshape(w.shape)
    if any(k.startswith("lokr_") for k in t):
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        dim = t["lokr_w2_a"].shape[1] if "lokr_w2_a" in t else t["lokr_w1_a"].shape[1] if "lokr_w1_a" in t else None
        scale = alpha / dim if dim else 1.0  # both factors whole: LyCORIS scales by 1
        if w.ndim == 4:
            w2 = w2.reshape(w2.shape[0], -1, *w.shape[2:])
            w1 = w1[:, :, None, None]
        return w + (torch.kron(w1, w2) * scale).reshape(w.shape)
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    merged = w + (product * alpha / down.shape[0]).reshape(w.shape)
    if "dora_scale" in t:
        norm = merged.reshape(flat).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
        merged = merged * t["dora_scale"].reshape(norm.shape) / norm
    return merged


@pytest.mark.parametrize("method,dora", INTERCHANGE, ids=[i for i in IDS if i != "oft"])
def test_lycoris_files_follow_lycoris_rules(tmp_path, tiny_dir, method, dora):
    import re

    path, expected = trained_file(tmp_path, tiny_dir, method, dora, alpha=2.0)
    kohya = export_kohya(path, tmp_path / "kohya.safetensors")
    meta = read_metadata(kohya)
    args = json.loads(meta["ss_network_args"])
    family = method if method in ("loha", "lokr") else "lora"
    tensors = read_tensors(kohya)
    pattern = re.compile(LYCORIS_KEY.format(LYCORIS_TENSORS[family]))
    assert all(pattern.match(k) for k in tensors), [k for k in tensors if not pattern.match(k)][:3]
    if method in ("lora", "locon") and not dora:
        assert meta["ss_network_module"] == "networks.lora" and "algo" not in args
    else:
        assert meta["ss_network_module"] == "lycoris.kohya"
        assert args["algo"] == method and (args.get("dora_wd") == "True") == dora
        assert ("conv_dim" in args) == (method != "lora")
    if dora:
        scales = {k: v for k, v in tensors.items() if k.endswith("dora_scale")}
        ups = {k.replace("dora_scale", "lora_up.weight"): v for k, v in scales.items()}
        assert all(v.shape == (tensors[k].shape[0], *[1] * (tensors[k].ndim - 1)) for k, v in ups.items())
    base = load_pipeline(tiny_dir).unet  # the file's weights merged by LyCORIS' rules give the adapted U-Net
    prefixes = {k.rsplit(".", 1)[0] if k.endswith(".alpha") else None for k in tensors} - {None}
    with torch.no_grad():
        for name, module in base.named_modules():
            key = "lora_unet_" + name.replace(".", "_")
            if key in prefixes:
                module.weight.copy_(lycoris_delta(tensors, key, module.weight).float())
    merged = unet_output(base)  # merged weights vs peft's forward: different float paths, not bit-equal everywhere;
    assert (merged - expected).abs().max() <= 1e-3 * expected.abs().max()  # a wrong scale or layout is off by ~1e-1


def test_lokr_with_two_whole_factors_folds_the_scale(tmp_path, tiny_dir):
    path, _ = trained_file(tmp_path, tiny_dir, "lokr", False, alpha=2.0)  # rank 4 on 32-wide layers: whole factors
    tensors = read_tensors(export_kohya(path, tmp_path / "k.safetensors"))
    whole = [k for k in tensors if k.endswith(".lokr_w2") and k.replace("lokr_w2", "lokr_w1") in tensors]
    assert whole
    theirs, ours = read_tensors(path), whole[0].rsplit(".", 1)[0]
    module = ours[len("lora_unet_"):]
    original = next(v for k, v in theirs.items() if k.endswith(".lokr_w1") and k[5:-8].replace(".", "_") == module)
    assert torch.allclose(tensors[ours + ".lokr_w1"], original * 2.0 / 4)
    assert float(tensors[ours + ".alpha"]) == 4.0


def test_oft_is_refused_for_lycoris_and_bad_combinations_are_named(tmp_path, tiny_dir):
    path, _ = trained_file(tmp_path, tiny_dir, "oft", False)
    with pytest.raises(AdapterFileError, match="OFT"):
        export_kohya(path, tmp_path / "k.safetensors")
    assert not (tmp_path / "k.safetensors").exists()
    with pytest.raises(BlockSpecError, match="dora is supported on lora and locon"):
        AdapterSpec(method="loha", dora=True)
    with pytest.raises(BlockSpecError, match="text encoder takes plain LoRA"):
        AdapterSpec(method="lokr", text_encoder=True)
    with pytest.raises(BlockSpecError, match="oft.*no alpha"):
        AdapterSpec(method="oft", alpha=8)
    with pytest.raises(BlockSpecError, match="oft.*no 3x3 conv"):
        AdapterSpec(method="oft", conv_rank=8)
    with pytest.raises(BlockSpecError, match="one block size"):
        add_adapter(load_pipeline(tiny_dir).unet, AdapterSpec(method="oft", blocks="upper", block_ranks={"IN0": 8}))
    with pytest.raises(ConfigError, match="loraplus_lr_ratio.*loha"):
        TrainConfig(method="loha", loraplus_lr_ratio=16)


def test_kohya_presets_match_sd_scripts():
    n = 12
    assert kohya_preset("sine") == pytest.approx([math.sin(math.pi * (i / (n - 1)) / 2) for i in range(n)])
    assert kohya_preset("cosine") == pytest.approx([math.sin(math.pi * (i / (n - 1)) / 2) for i in reversed(range(n))])
    assert kohya_preset("linear+0.5") == pytest.approx([i / (n - 1) + 0.5 for i in range(n)])
    assert kohya_preset("reverse_linear")[0] == 1.0 and kohya_preset("zeros") == [0.0] * n
    weights = block_lr_weights({"down": [0.5, 0.5], "mid": 0.25, "up": "zeros+0.1"})
    assert weights["IN00"] == weights["IN01"] == 0.5 and weights["IN02"] == 1.0  # a short list is filled with 1
    assert weights["M00"] == 0.25 and weights["OUT00"] == weights["OUT11"] == pytest.approx(0.1)
    assert block_lr_weights({"upper": 2, "OUT11": 3})["IN01"] == 2 and block_lr_weights({"upper": 2, "OUT11": 3})[
        "OUT11"] == 3
    assert block_lr_weights({"OUT3": 0.05}, zero_threshold=0.1)["OUT09"] == 0


def test_block_learning_rates_and_loraplus_are_optimizer_groups(tmp_path, tiny_dir, pipe):
    cfg = config(tmp_path, tiny_dir, method="locon", blocks="upper", block_lr={"IN0": 0.5, "OUT3": 2.0},
                 loraplus_lr_ratio=4.0)
    run = TrainingRun(cfg, pipe=pipe)
    multipliers = {id(p): g["multiplier"] for g in run.optimizer.param_groups for p in g["params"]}
    rates = {id(p): g["lr"] for g in run.optimizer.param_groups for p in g["params"]}
    for name, param in pipe.unet.named_parameters():
        if param.requires_grad:
            expected = (0.5 if paper_block(name) == "IN0" else 2.0) * (4.0 if ".lora_B." in name else 1.0)
            assert multipliers[id(param)] == expected, name
            assert rates[id(param)] == pytest.approx(cfg.learning_rate * expected)
    assert sorted(g["multiplier"] for g in run.optimizer.param_groups) == [0.5, 2.0, 8.0]  # IN0 B = OUT3 A


def test_a_block_at_zero_learning_rate_is_not_created_and_is_recorded(tmp_path, tiny_dir, pipe):
    cfg = config(tmp_path, tiny_dir, method="locon", blocks="upper", steps=2, block_lr={"OUT3": 0})
    final = train(cfg, pipe=pipe)
    assert {paper_block(k[len("unet."):]) for k in read_tensors(final)} == {"IN0"}
    meta = read_metadata(final)
    assert json.loads(meta["bwl_block_lr"])["OUT09"] == 0 and json.loads(meta["bwl_block_lr"])["IN01"] == 1
    plain = config(tmp_path, tiny_dir, method="locon", blocks="upper")
    contents = {"model": "m", "instance_dir": "i"}
    keys = {run_key(c, contents) for c in (plain, cfg, config(tmp_path, tiny_dir, method="locon", blocks="upper",
                                                                  loraplus_lr_ratio=16.0))}
    assert len(keys) == 3
    assert "block_lr" not in plain.result_values()  # unset, it leaves existing run keys as they were


def test_oft_trains_on_every_block_of_a_small_model_and_skips_3x3_convs(tmp_path, tiny_dir, pipe):
    """peft's OFT rotates a 3x3 conv's unpadded input patches, which fails on the deep blocks' 1x1 feature maps:
    bwl's OFT leaves 3x3 convs out, so it trains on all blocks at 64 px."""
    final = train(config(tmp_path, tiny_dir, method="oft", blocks="all", steps=1), pipe=pipe)
    names = {k[len("unet."):].rsplit(".oft_R", 1)[0] for k in read_tensors(final)}
    assert any("resnets" in n and n.endswith("time_emb_proj") for n in names)
    assert not any(n.endswith(("conv1", "conv2")) or ".upsamplers." in n or ".downsamplers." in n for n in names)


@pytest.mark.parametrize("factor,decompose_both", [(4, True), (4, False), (-1, True)])
def test_lycoris_lokr_files_with_their_own_factor_load(tmp_path, tiny_dir, factor, decompose_both):
    """A LyCORIS LoKr file as LyCORIS writes it with ``factor`` and ``decompose_both``: imported and loaded as is, it
    gives the U-Net the file was made from."""
    from peft import LoKrConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from bwl.adapters.spec import AdapterSpec as Spec

    pipe = load_pipeline(tiny_dir)
    targets = list(Spec(method="lokr", blocks="upper").module_ranks(pipe.unet))
    pipe.unet.add_adapter(LoKrConfig(r=2, alpha=3.0, target_modules=targets, decompose_factor=factor,
                                     decompose_both=decompose_both), adapter_name="w")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if ".w." in name + "." and "lokr" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    expected = unet_output(pipe.unet)
    wild = {}
    for key, value in get_peft_model_state_dict(pipe.unet, adapter_name="w").items():
        module, tensor = key.rsplit(".", 1)
        wild[f"lora_unet_{module.replace('.', '_')}.{tensor}"] = value.contiguous()
        wild[f"lora_unet_{module.replace('.', '_')}.alpha"] = torch.tensor(3.0)
    save_file(wild, str(tmp_path / "wild.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    assert inspect_adapter(tmp_path / "wild.safetensors").method == "lokr"
    back = import_kohya(tmp_path / "wild.safetensors", load_pipeline(tiny_dir), tmp_path / "back.safetensors")
    for file in (tmp_path / "wild.safetensors", back):
        out = loaded_output(tiny_dir, file)
        assert_float32_equal(out, expected, float32_bound(load_pipeline(tiny_dir).unet))
    assert json.loads(read_metadata(export_kohya(back, tmp_path / "again.safetensors"))["ss_network_args"])[
        "factor"] == str(factor)


def test_methods_combine_in_one_pipeline_lora_family_first(tmp_path, tiny_dir):
    """peft stacks LoHa, LoKr and OFT layers on LoRA layers but not LoRA on theirs: load_adapters loads the LoRA
    family first, and load_adapter in the other order says so instead of failing inside peft."""
    from bwl.adapters import load_adapters

    files = {m: trained_file(tmp_path, tiny_dir, m, dora)[0] for m, dora in (("loha", False), ("locon", True))}
    alone = {m: loaded_output(tiny_dir, f) for m, f in files.items()}
    pipe = load_pipeline(tiny_dir)
    load_adapters(pipe, files)  # loha listed first, loaded second
    for name in files:
        set_block_weights(pipe, {name: 1.0})
        assert torch.equal(unet_output(pipe.unet), alone[name])
    set_block_weights(pipe, {"loha": 1.0, "locon": "upper"})
    assert not torch.equal(unet_output(pipe.unet), alone["loha"])
    pipe = load_pipeline(tiny_dir)
    load_adapter(pipe, files["loha"], "loha")
    with pytest.raises(AdapterFileError, match="load the LoRA-family adapters first"):
        load_adapter(pipe, files["locon"], "locon")
