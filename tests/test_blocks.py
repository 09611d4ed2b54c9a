import pytest

from bwl.adapters.blocks import (
    FINE_BLOCKS,
    GROUPS,
    LBW_PRESETS,
    PAPER_BLOCKS,
    BlockSpecError,
    block_ranks,
    block_weights,
    fine_block,
    fine_blocks_of,
    format_blocks,
    lbw_weights,
    paper_block,
    paper_block_of_fine,
    parse_blocks,
)


def test_groups_are_the_papers():
    assert parse_blocks("upper") == ("IN0", "OUT3")
    assert parse_blocks("middle") == ("IN1", "OUT2")
    assert parse_blocks("bottom") == ("IN2", "OUT1")
    assert parse_blocks("all") == PAPER_BLOCKS
    assert parse_blocks("none") == ()


@pytest.mark.parametrize("spec", ["IN0+OUT3", "out3+in0", "Upper", "OUT3, IN0", ["in0", "OUT3"]])
def test_specs_are_case_insensitive_and_ordered(spec):
    assert parse_blocks(spec) == ("IN0", "OUT3")
    assert format_blocks(parse_blocks(spec)) == "upper"


def test_unknown_block_lists_valid_names():
    with pytest.raises(BlockSpecError) as err:
        parse_blocks("IN0+OUT9")
    assert "OUT9" in str(err.value) and "IN0" in str(err.value) and "upper" in str(err.value)


@pytest.mark.parametrize("name, fine", [
    ("down_blocks.0.attentions.0.proj_in", "IN01"),
    ("down_blocks.0.resnets.1.conv1", "IN02"),
    ("down_blocks.0.downsamplers.0.conv", "IN03"),
    ("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k", "IN05"),
    ("down_blocks.2.downsamplers.0.conv", "IN09"),
    ("down_blocks.3.resnets.0.conv2", "IN10"),
    ("down_blocks.3.resnets.1.time_emb_proj", "IN11"),
    ("mid_block.attentions.0.proj_out", "M00"),
    ("mid_block.resnets.1.conv1", "M00"),
    ("up_blocks.0.resnets.0.conv1", "OUT00"),
    ("up_blocks.0.upsamplers.0.conv", "OUT02"),
    ("up_blocks.1.attentions.0.proj_in", "OUT03"),
    ("up_blocks.2.resnets.2.conv_shortcut", "OUT08"),
    ("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", "OUT11"),
    ("lora_unet_up_blocks_3_attentions_0_proj_in", "OUT09"),
    ("conv_in", None),
    ("time_embedding.linear_1", None),
])
def test_fine_blocks_follow_kohya_get_block_index(name, fine):
    assert fine_block(name) == fine


def test_fine_and_paper_blocks_agree_on_every_unet_module(pipe):
    seen = set()
    for name, _ in pipe.unet.named_modules():
        fine = fine_block(name)
        if fine is not None:
            assert paper_block_of_fine(fine) == paper_block(name), name
            seen.add(fine)
    assert seen == set(FINE_BLOCKS) - {"IN00"}


def test_fine_blocks_of_paper_blocks_match_notes_table():
    assert fine_blocks_of("IN0") == ("IN01", "IN02", "IN03")
    assert fine_blocks_of("IN3") == ("IN10", "IN11")
    assert fine_blocks_of("MID") == ("M00",)
    assert fine_blocks_of("OUT0") == ("OUT00", "OUT01", "OUT02")
    assert fine_blocks_of("OUT3") == ("OUT09", "OUT10", "OUT11")


def test_lbw_presets_and_vectors():
    assert set(LBW_PRESETS) == {"NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5"}
    assert all(len(v) == 17 for v in LBW_PRESETS.values())
    outs = lbw_weights("OUTS")
    assert [k for k, v in outs.items() if v] == ["BASE", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
    assert outs["OUT00"] == 0 and outs["IN03"] == 0  # slots a 17-vector does not name stay 0, as in lora-block-weight
    assert lbw_weights("all0.5")["M00"] == 0.5
    v26 = lbw_weights([1] + [0] * 24 + [0.25])
    assert v26["OUT11"] == 0.25 and v26["BASE"] == 1
    assert lbw_weights("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0") == lbw_weights("OUTD")
    with pytest.raises(BlockSpecError, match="17 or 26"):
        lbw_weights([1, 2, 3])
    with pytest.raises(BlockSpecError, match="OUTALL"):
        lbw_weights("OUTSIDE")


def test_block_weights_forms():
    upper = block_weights("upper")
    assert upper["IN01"] == upper["OUT11"] == 1 and upper["OUT00"] == upper["M00"] == 0
    partial = block_weights({"OUT0": 0, "OUT11": 0.5})
    assert partial["OUT00"] == partial["OUT02"] == 0 and partial["OUT11"] == 0.5 and partial["IN01"] == 1
    assert set(block_weights(0.3).values()) == {0.3}
    assert block_weights("OUTALL")["OUT05"] == 1


def test_block_ranks_follow_kohya_block_dims():
    ranks = block_ranks("upper", 4, {"OUT3": 8, "IN02": 0, "MID": 2})
    assert ranks == {"IN01": 4, "IN03": 4, "M00": 2, "OUT09": 8, "OUT10": 8, "OUT11": 8}
    with pytest.raises(BlockSpecError, match=">= 0"):
        block_ranks("all", 4, {"IN0": -1})
    with pytest.raises(BlockSpecError, match="positive"):
        block_ranks("IN0", 0)
    assert block_ranks("none", 0) == {}


def test_every_group_is_valid():
    for name in GROUPS:
        assert set(parse_blocks(name)) <= set(PAPER_BLOCKS)
