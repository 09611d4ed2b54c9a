import pytest
import torch

from bwl.adapters.blocks import BlockSpecError
from bwl.adapters.spec import AdapterSpec, adapted_modules, add_adapter, find_targets, parameters_per_block

# Every Linear / 1x1 conv of an SD1.x Transformer2DModel (layers_per_block=1 transformer inside each attention).
ATTENTION_SUFFIXES = {
    "proj_in", "proj_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
    *(f"transformer_blocks.0.{attn}.{p}" for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")),
}
ATTENTIONS = {  # diffusers prefixes of the attention modules in SD1.x, per paper block
    "IN0": ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1"],
    "IN1": ["down_blocks.1.attentions.0", "down_blocks.1.attentions.1"],
    "IN2": ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1"],
    "IN3": [],
    "MID": ["mid_block.attentions.0"],
    "OUT0": [],
    "OUT1": [f"up_blocks.1.attentions.{i}" for i in range(3)],
    "OUT2": [f"up_blocks.2.attentions.{i}" for i in range(3)],
    "OUT3": [f"up_blocks.3.attentions.{i}" for i in range(3)],
}
SELECTIONS = {
    "upper": ["IN0", "OUT3"], "middle": ["IN1", "OUT2"], "bottom": ["IN2", "OUT1"],
    "all": list(ATTENTIONS), "OUT1": ["OUT1"],
}


@pytest.mark.parametrize("spec, blocks", SELECTIONS.items())
def test_lora_targets_exactly_the_selected_attention_modules(pipe, spec, blocks):
    add_adapter(pipe.unet, AdapterSpec("lora", spec, rank=4), "a")
    expected = {f"{prefix}.{suffix}" for b in blocks for prefix in ATTENTIONS[b] for suffix in ATTENTION_SUFFIXES}
    assert set(adapted_modules(pipe.unet, "a")) == expected


def test_locon_also_covers_resnets_of_out0_and_in3(pipe):
    add_adapter(pipe.unet, AdapterSpec("locon", "IN3+OUT0", rank=4, conv_rank=2), "a")
    names = set(adapted_modules(pipe.unet, "a"))
    resnet_parts = {"conv1", "conv2", "time_emb_proj"}
    expected = {f"down_blocks.3.resnets.{i}.{p}" for i in range(2) for p in resnet_parts}
    expected |= {f"up_blocks.0.resnets.{i}.{p}" for i in range(3) for p in resnet_parts | {"conv_shortcut"}}
    expected |= {"up_blocks.0.upsamplers.0.conv"}
    assert names == expected
    modules = adapted_modules(pipe.unet, "a")
    assert modules["up_blocks.0.resnets.0.conv1"].r["a"] == 2  # 3x3 conv at conv_rank
    assert modules["up_blocks.0.resnets.0.conv_shortcut"].r["a"] == 4  # 1x1 at the block's rank


def test_locon_all_adds_downsamplers_and_upsamplers(pipe):
    add_adapter(pipe.unet, AdapterSpec("locon", "all", rank=4), "a")
    names = set(adapted_modules(pipe.unet, "a"))
    assert {f"down_blocks.{i}.downsamplers.0.conv" for i in range(3)} <= names
    assert {f"up_blocks.{i}.upsamplers.0.conv" for i in range(3)} <= names
    assert not any(n.startswith(("conv_in", "conv_out", "time_embedding")) for n in names)


def test_per_block_ranks_give_those_ranks(pipe):
    spec = AdapterSpec("locon", "all", rank=4, alpha=2, block_ranks={"IN0": 8, "MID": 0, "OUT3": 16, "OUT11": 2})
    add_adapter(pipe.unet, spec, "a")
    modules = adapted_modules(pipe.unet, "a")
    assert not any(n.startswith("mid_block") for n in modules)
    assert modules["down_blocks.0.attentions.0.proj_in"].r["a"] == 8
    assert modules["up_blocks.3.attentions.0.proj_in"].r["a"] == 16
    assert modules["up_blocks.3.attentions.2.proj_in"].r["a"] == 2  # fine override wins
    assert modules["up_blocks.1.attentions.0.proj_in"].r["a"] == 4
    assert modules["up_blocks.1.attentions.0.proj_in"].scaling["a"] == pytest.approx(2 / 4)


def test_only_lora_is_trainable_and_text_encoder_frozen(pipe):
    add_adapter(pipe.unet, AdapterSpec("lora", "upper", rank=4), "a")
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    counts = parameters_per_block(pipe.unet, "a")
    assert counts["IN1"] == counts["MID"] == 0 and counts["IN0"] > 0 and counts["OUT3"] > 0
    assert sum(counts.values()) == sum(pipe.unet.get_parameter(n).numel() for n in trainable)


def test_bad_specs_are_refused(pipe):
    with pytest.raises(BlockSpecError, match="lora, locon, loha, lokr, oft"):
        AdapterSpec("vera")
    with pytest.raises(BlockSpecError, match="upper"):
        AdapterSpec("lora", "top")
    with pytest.raises(BlockSpecError, match="positive"):
        AdapterSpec("lora", "upper", rank=0)
    with pytest.raises(BlockSpecError, match=r"nothing to adapt in IN3 \(down_blocks.3: DownBlock2D, no attention"):
        add_adapter(pipe.unet, AdapterSpec("lora", "IN3", rank=4))  # IN3 has no attention
    with pytest.raises(BlockSpecError, match=r"finds nothing to adapt in IN3"):  # named, though IN2 holds attention
        add_adapter(pipe.unet, AdapterSpec("lora", "IN2+IN3", rank=4))


def test_targets_found_on_full_size_architecture():
    from bwl.sd.tiny import full_size_sd1_unet

    with torch.device("meta"):
        unet = full_size_sd1_unet()
    lora = find_targets(unet, "lora")
    locon = find_targets(unet, "locon")
    assert len(lora) == 16 * 12  # 16 transformers x 12 linear/1x1 modules each (192, as kohya counts)
    assert len(locon) > len(lora)


def test_a_second_adapter_on_a_channels_last_swapped_unet_targets_the_same_modules(pipe):
    """The fast path swaps Transformer2DModel's class (bwl.train.fast.channels_last); targets are found by isinstance,
    so an adapter added after the swap (a pipe trained twice on CUDA) still finds every attention block."""
    from bwl.train.fast import autocast_norms, channels_last

    first = {method: {t.name for t in find_targets(pipe.unet, method)} for method in ("lora", "locon")}
    add_adapter(pipe.unet, AdapterSpec(method="locon", blocks="all"), "first")
    assert channels_last.install(pipe.unet) > 0 and autocast_norms.install(pipe.unet) > 0
    for method in ("lora", "locon"):
        assert {t.name for t in find_targets(pipe.unet, method)} == first[method]
    add_adapter(pipe.unet, AdapterSpec(method="locon", blocks="all"), "second")
    assert set(adapted_modules(pipe.unet, "second")) == set(adapted_modules(pipe.unet, "first")) == first["locon"]
