import random

import numpy as np
import pytest
from PIL import Image

from bwl.data.datasets import DatasetError, load_image, load_images, open_rgb, scan_dataset, shuffle_caption, split_tags


def write_images(folder, count=3, caption="sks, circle, red", size=80):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size + 16, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption)
    return folder


def test_kohya_repeat_folders_and_captions(tmp_path):
    write_images(tmp_path, count=2)
    write_images(tmp_path / "10_extra", count=1, caption="sks, square")
    (tmp_path / "notes.md").write_text("hi")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (tmp_path / "misc").mkdir()
    examples, skipped = scan_dataset(tmp_path, repeats=3)
    assert [(e.image.name, e.repeats, e.caption) for e in examples] == [
        ("00.png", 3, "sks, circle, red"), ("01.png", 3, "sks, circle, red"), ("00.png", 10, "sks, square")]
    reasons = {s.path.name: s.reason for s in skipped}
    assert reasons["notes.md"] == "not an image file" and reasons["empty.png"] == "empty file"
    assert "unreadable" in reasons["broken.jpg"] and "N_name" in reasons["misc"]


def test_missing_caption_falls_back_to_trigger_with_a_warning(tmp_path):
    write_images(tmp_path, count=1)
    (tmp_path / "00.txt").unlink()
    with pytest.warns(UserWarning, match=r"1 image\(s\) have no caption file \(00.png\); using 'sks, dog'"):
        examples, _ = scan_dataset(tmp_path, fallback_caption="sks, dog")
    assert examples[0].caption == "sks, dog"


def test_empty_dataset_is_an_error_naming_the_folder(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path)):
        scan_dataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "I;16", "L", "1"])
def test_every_mode_loads_as_rgb(tmp_path, mode):
    img = Image.new("RGB", (40, 30), (200, 50, 20)).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    out = open_rgb(path)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert open_rgb(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "w.png")
    assert open_rgb(tmp_path / "w.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 20), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "r.jpg", exif=exif)
    assert open_rgb(tmp_path / "r.jpg").size == (20, 60)


def test_resize_and_center_crop(tmp_path):
    arr = np.zeros((100, 200, 3), dtype=np.uint8)
    arr[:, 50:150] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", 64)
    assert out.size == (64, 64) and np.asarray(out)[32, 32].min() > 200 and np.asarray(out)[32, 1].max() > 200


def test_small_images_warn_once(tmp_path):
    for i in range(7):
        Image.new("RGB", (16, 16)).save(tmp_path / f"s{i}.png")
    with pytest.warns(
        UserWarning, match=r"7 image\(s\) smaller than the training resolution 64.*s0.png \(16x16\).*and 2 more"
    ) as caught:
        images = load_images(sorted(tmp_path.glob("*.png")), 64)
    assert len(caught) == 1 and all(img.size == (64, 64) for img in images)


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DatasetError, match="decompression bomb"):
        open_rgb(tmp_path / "bomb.png")


def test_truncated_image_is_an_error_naming_the_file(tmp_path):
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="t.jpg"):
        open_rgb(tmp_path / "t.jpg")


def test_shuffle_keeps_the_first_tokens():
    caption = "sks, a, b, c, d, e"
    outs = {shuffle_caption(caption, 1, random.Random(s)) for s in range(20)}
    assert len(outs) > 1 and all(o.startswith("sks, ") for o in outs)
    assert all(sorted(split_tags(o)) == sorted(split_tags(caption)) for o in outs)
    assert shuffle_caption(caption, 6, random.Random(0)) == caption


def test_truncated_jpeg_in_a_dataset_folder_is_skipped_and_listed(tmp_path):
    """``Image.verify()`` passes a truncated JPEG that then fails to load; the scan decodes, so it is skipped."""
    write_images(tmp_path, count=2)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cut.jpg", quality=90)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "cut.jpg") as img:
        img.verify()  # the old check: passes
    examples, skipped = scan_dataset(tmp_path)
    assert [e.image.name for e in examples] == ["00.png", "01.png"]
    assert [(s.path.name, s.reason) for s in skipped] == [("cut.jpg", "unreadable image (OSError)")]
    load_images([e.image for e in examples], 64)  # what is kept loads
