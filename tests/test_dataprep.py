"""Data preparation: WD14 tagging with a tiny ONNX tagger built here, captions, the editor, reg images."""

import numpy as np
import pytest
import torch
from PIL import Image

from bwl.data.captions import compose_caption, tag_frequency, write_captions
from bwl.data.datasets import prepare_folder, report_table, scan_dataset
from bwl.data.editor import CaptionEditor
from bwl.data.regularization import generate_regularization
from bwl.data.tagging import TaggerError, WD14Tagger, make_tagger, wd14_preprocess

# name, category, bias, weight on (B, G, R) channel means in 0..1 (the model sees BGR, as WD14 models do)
TAGS = [
    ("general", 9, 5.0, (0, 0, 0)), ("sensitive", 9, -5.0, (0, 0, 0)),
    ("questionable", 9, -5.0, (0, 0, 0)), ("explicit", 9, -5.0, (0, 0, 0)),
    ("dog", 0, 3.0, (0, 0, 0)),                   # 0.95, duplicates the class word
    ("animal", 0, 1.5, (0, 0, 0)),                # 0.82
    ("outdoors", 0, 0.0, (0, 0, 0)),              # 0.50, blacklisted below
    ("solo", 0, 0.5, (0, 0, 0)),                  # 0.62
    ("grass", 0, -1.0, (0, 0, 0)),                # 0.27 < general threshold
    ("blue_background", 0, -3.0, (30, 0, -30)),   # only where blue dominates red
    ("hatsune_miku", 4, 0.0, (0, 0, 0)),          # 0.50: passes the general threshold, not the character one
    ("snoopy", 4, 3.0, (0, 0, 0)),                # 0.95 character
]


class TinyWD14(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, len(TAGS))
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([w for *_, w in TAGS], dtype=torch.float32))
            self.linear.bias.copy_(torch.tensor([b for _, _, b, _ in TAGS], dtype=torch.float32))

    def forward(self, x):  # NHWC float32 0..255
        return torch.sigmoid(self.linear(x.mean(dim=(1, 2)) / 255.0))


@pytest.fixture
def wd14_dir(tmp_path):
    folder = tmp_path / "wd14"
    folder.mkdir()
    torch.onnx.export(TinyWD14(), (torch.zeros(1, 48, 48, 3),), str(folder / "model.onnx"),
                      input_names=["input_1:0"], output_names=["predictions_sigmoid"], dynamo=False)
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{c},100" for i, (n, c, _, _) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_wd14_preprocessing_pads_white_and_swaps_to_bgr():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    x = wd14_preprocess(img, 8)
    assert x.shape == (8, 8, 3) and x.dtype == np.float32
    assert (x[0] == 255).all()  # white padding above
    assert tuple(x[4, 4]) == (0.0, 0.0, 255.0)  # red in BGR


def test_wd14_on_real_photos(tmp_path, wd14_dir, dreambooth):
    prepare_folder(dreambooth / "dog", tmp_path / "train")
    results = write_captions(
        tmp_path / "train", WD14Tagger(wd14_dir), trigger="sks", class_word="dog", blacklist=["outdoors"]
    )
    assert len(results) == 5 and all(r.written for r in results)
    assert {r.caption for r in results} == {"sks, dog, snoopy, animal, solo"}
    assert (tmp_path / "train" / "00.txt").read_text().strip() == "sks, dog, snoopy, animal, solo"


def test_wd14_reads_color_through_bgr(tmp_path, wd14_dir):
    tagger = WD14Tagger(wd14_dir, general_threshold=0.35, character_threshold=0.4)
    blue, red = tagger([Image.new("RGB", (30, 30), (0, 0, 255)), Image.new("RGB", (30, 30), (255, 0, 0))])
    assert "blue background" in blue and "blue background" not in red
    assert "hatsune miku" in blue  # character threshold lowered
    assert "general" not in blue  # rating tags dropped


def test_existing_captions_are_kept_unless_overwrite(tmp_path, wd14_dir):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sks, hand written")
    tagger = WD14Tagger(wd14_dir)
    assert write_captions(tmp_path, tagger, "sks")[0].caption == "sks, hand written"
    assert (
        write_captions(tmp_path, tagger, "sks", overwrite=True)[0].caption == "sks, snoopy, dog, animal, solo, outdoors"
    )


def test_compose_caption_order_dedupe_blacklist_replace():
    caption = compose_caption(
        ["dog", "Solo", "solo", "sks", "grass", "1girl"], "sks", "dog", blacklist=["GRASS"], replace={"1girl": "girl"}
    )
    assert caption == "sks, dog, Solo, girl"


def test_missing_onnxruntime_says_how_to_install(monkeypatch, wd14_dir):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(TaggerError, match=r"pip install 'bwl\[tagger\]'"):
        WD14Tagger(wd14_dir)


def test_unknown_tagger_and_missing_files(tmp_path):
    with pytest.raises(TaggerError, match="wd14, none"):
        make_tagger("deepdanbooru")
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(TaggerError, match="selected_tags.csv"):
        WD14Tagger(tmp_path)
    assert make_tagger("none")([Image.new("RGB", (4, 4))]) == [{}]


def test_tag_frequency_counts_like_kohya(tmp_path):
    folder = tmp_path / "25_sks"
    folder.mkdir()
    (folder / "a.txt").write_text("sks, Dog, solo")
    (folder / "b.txt").write_text("sks, dog,, grass, grass")
    assert tag_frequency([folder]) == {"25_sks": {"sks": 2, "dog": 2, "solo": 1, "grass": 2}}


def test_prepare_folder_reports_and_never_touches_originals(tmp_path, wd14_dir):
    src = tmp_path / "originals"
    src.mkdir()
    Image.new("RGB", (300, 200), "blue").save(src / "big.png")
    Image.new("RGB", (20, 20), "blue").save(src / "tiny.png")
    (src / "big.txt").write_text("sks, blue")
    (src / "readme.pdf").write_bytes(b"%PDF")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    report = prepare_folder(src, tmp_path / "train", resolution=100, repeats=25, name="sks")
    notes = {r.source.name: r.note for r in report}
    assert (
        notes["big.png"] == "resized to 150x100"
        and "smaller than 64" in notes["tiny.png"]
        and "not an image" in notes["readme.pdf"]
    )
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert "| tiny.png |" in report_table(report)
    examples, _ = scan_dataset(tmp_path / "train")
    assert [(e.image.name, e.repeats, e.caption) for e in examples] == [("big.png", 25, "sks, blue")]


def test_editor_adds_removes_and_saves(tmp_path):
    for i, caption in enumerate(["sks, red, grass", "sks, grass", "sks, blue"]):
        Image.new("RGB", (32, 32)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(caption)
    editor = CaptionEditor(tmp_path)
    assert editor.remove_tag("Grass") == 2
    editor.tag_input.value = "smile"
    editor.add_button.click()
    editor.boxes[tmp_path / "2.png"].value = "sks, blue, smile, hand edited"
    assert (tmp_path / "0.txt").read_text() == "sks, red, grass"  # nothing written before save
    editor.save_button.click()
    assert [(tmp_path / f"{i}.txt").read_text().strip() for i in range(3)] == [
        "sks, red, smile", "sks, smile", "sks, blue, smile, hand edited"]
    assert editor.save() == 0
    assert "| 1.png | sks, smile |" in editor.table()


def test_regularization_images_resume_and_load_as_reg(tmp_path, pipe):
    folder = tmp_path / "reg"
    assert generate_regularization(pipe, folder, "dog", count=6, batch_size=4, steps=2) == 6
    assert generate_regularization(pipe, folder, "dog", count=6, batch_size=4, steps=2) == 0
    examples, skipped = scan_dataset(folder, is_reg=True)
    assert len(examples) == 6 and not skipped and all(e.caption == "dog" and e.is_reg for e in examples)
    first = np.asarray(Image.open(folder / "reg_00003.png"))
    (folder / "reg_00003.png").unlink()
    assert generate_regularization(pipe, folder, "dog", count=6, batch_size=4, steps=2) == 1
    again = np.asarray(Image.open(folder / "reg_00003.png")).astype(int)
    assert np.abs(again - first).max() <= 2  # seeded per image; only batch-size rounding differs
