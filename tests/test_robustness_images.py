"""Bad images, as a careless user brings them: high bit depth, floats, palettes, alpha, CMYK, Lab, EXIF,
animations, broken files. Every one is read correctly or refused with one clear message."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from robustness_helpers import expect_error, huge_png_header, photos, png16, tiny_text_model_dir, tree
from sinkless.cli import main
from sinkless.errors import SinklessError
from sinkless.images import expand_paths, load_image, natural_crops

pytestmark = pytest.mark.robustness


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny random causal LM with a word-level tokenizer, as a model folder."""
    return tiny_text_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama")


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return natural_crops(1, seed=4)[0].resize((64, 64))


# -- read correctly --------------------------------------------------------------------------------
def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    pixels = _rgb(load_image(tmp_path / "grey16.png"))
    assert (pixels == 255).mean() < 0.01  # PIL's own convert("RGB") makes 99.6 % of them 255
    assert pixels.mean() == pytest.approx(127.5, abs=1.0)
    assert np.abs(pixels[..., 0] - ramp / 257.0).max() <= 0.5


def test_16bit_rgb_png_matches_its_8bit_twin(tmp_path, photo):
    eight = np.asarray(photo)
    png16(tmp_path / "rgb16.png", eight.astype(np.uint16) * 257)
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgb16.png")), eight)


def test_16bit_photo_scans_like_the_8bit_one(tmp_path, capsys):
    """The silently-wrong case end to end: the same photo as 8-bit and 16-bit PNG gives the same report."""
    import json

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    crop = natural_crops(1, seed=7)[0].resize((64, 64))
    crop.save(tmp_path / "a" / "photo.png")
    grey = np.asarray(crop.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(tmp_path / "b" / "photo.png")  # 16-bit grey
    crop.convert("L").save(tmp_path / "a" / "grey8.png")
    for folder, name in (("a", "grey8.png"), ("b", "photo.png")):
        assert main(["-q", "scan", str(tmp_path / folder / name), "--model", "planted-vit-tiny", "--out", str(tmp_path / f"out-{folder}")]) == 0
    capsys.readouterr()
    a = json.loads((tmp_path / "out-a" / "report.json").read_text())
    b = json.loads((tmp_path / "out-b" / "report.json").read_text())
    assert [row["norm_median"] for row in a["layers"]] == pytest.approx([row["norm_median"] for row in b["layers"]], rel=1e-5)


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_tiff(tmp_path, scale):
    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32) * scale
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    pixels = _rgb(load_image(tmp_path / "f.tif"))
    assert pixels.min() == 0 and pixels.max() == 255
    assert pixels.mean() == pytest.approx(127.5, abs=1.0)


def test_float_tiff_with_nan_is_refused(tmp_path):
    values = np.ones((8, 8), dtype=np.float32)
    values[2, 3] = np.nan
    Image.fromarray(values, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(SinklessError, match="NaN"):
        load_image(tmp_path / "nan.tif")


def test_32bit_integer_image_with_16bit_values(tmp_path):
    values = np.full((8, 8), 40000, dtype=np.int32)
    Image.fromarray(values).save(tmp_path / "i32.tif")
    assert _rgb(load_image(tmp_path / "i32.tif")).mean() == pytest.approx(40000 / 257, abs=1)


def test_palette_png(tmp_path, photo):
    photo.quantize(64).save(tmp_path / "p.png")
    diff = np.abs(_rgb(load_image(tmp_path / "p.png")) - _rgb(photo))
    assert diff.mean() < 12


def test_palette_with_transparency_goes_on_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    image.save(tmp_path / "pt.png", transparency=0)
    assert (np.asarray(load_image(tmp_path / "pt.png")) == 255).all()


def test_rgba_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red where opaque, garbage colour where transparent
    rgba[:4, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels = np.asarray(load_image(tmp_path / "a.png"))
    assert (pixels[:4] == [200, 0, 0]).all() and (pixels[4:] == 255).all()


def test_grey_with_alpha(tmp_path):
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")
    assert (np.asarray(load_image(tmp_path / "la.png")) == 255).all()


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk(tmp_path, photo, suffix):
    photo.convert("CMYK").save(tmp_path / f"c{suffix}", quality=95)
    assert np.abs(_rgb(load_image(tmp_path / f"c{suffix}")) - _rgb(photo)).mean() < 8


def test_lab_tiff(tmp_path, photo):
    from PIL import ImageCms

    lab = ImageCms.applyTransform(photo, ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"))
    lab.save(tmp_path / "lab.tif")
    assert np.abs(_rgb(load_image(tmp_path / "lab.tif")) - _rgb(photo)).mean() < 4  # PIL's convert("RGB") is off by ~100


def test_one_bit_image(tmp_path):
    Image.new("1", (8, 8), 1).save(tmp_path / "b.png")
    assert (np.asarray(load_image(tmp_path / "b.png")) == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° when shown
    image.save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(tmp_path / "anim.gif"))[0, 0].tolist() == [255, 0, 0]


def test_tiny_image_scans(tmp_path, capsys):
    Image.new("RGB", (1, 1), (90, 20, 30)).save(tmp_path / "dot.png")
    assert main(["-q", "scan", str(tmp_path / "dot.png"), "--model", "planted-vit-tiny", "--out", str(tmp_path / "o")]) == 0
    assert "planted-vit-tiny" in capsys.readouterr().out


def test_uppercase_suffix_and_unicode_name(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "Ünïcødé.PNG")
    assert [p.name for p in expand_paths([str(tmp_path)], (".png",))] == ["Ünïcødé.PNG"]


def test_hidden_files_in_a_folder_are_skipped(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    (tmp_path / "._photo.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork on a USB stick
    assert [p.name for p in expand_paths([str(tmp_path)], (".png",))] == ["photo.png"]


# -- refused with one message ---------------------------------------------------------------------
def _bad(tmp_path, name: str, data: bytes):
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()[:300]


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.png", b"", "cannot read"),
        ("truncated.png", None, "cannot read"),
        ("notes.png", b"these are my notes, not a picture\n", "cannot read"),
        ("html.jpg", b"<html><body>404 Not Found</body></html>", "cannot read"),
    ],
    ids=["empty", "truncated", "text-named-png", "html-named-jpg"],
)
def test_broken_image_files(tmp_path, capsys, name, data, message):
    path = _bad(tmp_path, name, _truncated_png() if data is None else data)
    expect_error(["scan", path, "--model", "planted-vit-tiny", "--out", str(tmp_path / "out")], capsys, contains=message, root=tmp_path)


def test_decompression_bomb(tmp_path, capsys):
    path = huge_png_header(tmp_path / "bomb.png", 30000, 30000)
    expect_error(["scan", str(path), "--model", "planted-vit-tiny", "--out", str(tmp_path / "out")], capsys, contains="too large", root=tmp_path)


def test_folder_without_images(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    expect_error(["scan", str(tmp_path / "empty"), "--model", "planted-vit-tiny", "--out", str(tmp_path / "out")], capsys,
                 contains="holds no input files", root=tmp_path)


def test_glob_matching_nothing(tmp_path, capsys):
    expect_error(["scan", str(tmp_path / "*.webp"), "--model", "planted-vit-tiny", "--out", str(tmp_path / "out")], capsys,
                 contains="no file matches", root=tmp_path)


def test_a_glob_matching_folders_takes_their_images(tmp_path):
    """``'im*'`` stands for what the shell would pass (the folder ``imgs``): its images, as the folder itself gives."""
    photos(tmp_path / "imgs", 2)
    photos(tmp_path / "imgs" / "deeper", 1)  # a folder's subfolders are not read, by the folder or by the pattern
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "top.png").write_bytes((tmp_path / "imgs" / sorted(p.name for p in (tmp_path / "imgs").glob("*.png"))[0]).read_bytes())
    suffixes = (".png",)
    assert expand_paths([str(tmp_path / "im*")], suffixes) == expand_paths([str(tmp_path / "imgs")], suffixes)
    assert expand_paths([str(tmp_path / "*")], suffixes) == [*expand_paths([str(tmp_path / "imgs")], suffixes), tmp_path / "top.png"]
    recursive = expand_paths([str(tmp_path / "**")], suffixes)  # every image once (and the files it names: the text too)
    assert len(recursive) == len(set(recursive)) and sorted(p.suffix for p in recursive) == [".png"] * 4 + [".txt"]
    with pytest.raises(SinklessError, match="no file matches"):
        expand_paths([str(tmp_path / "imgs" / "deep*" / "*.jpg")], suffixes)
    one = tmp_path / "imgs" / "photo0.png"  # a file named twice (by itself, by its folder, by a pattern) is read once
    assert expand_paths([str(one), str(tmp_path / "imgs"), str(tmp_path / "imgs" / "*.png")], suffixes) == \
        [one, *(p for p in expand_paths([str(tmp_path / "imgs")], suffixes) if p != one)]


def test_broken_symlink(tmp_path, capsys):
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    expect_error(["scan", str(tmp_path / "link.png"), "--model", "planted-vit-tiny", "--out", str(tmp_path / "out")], capsys,
                 contains="input not found", root=tmp_path)


def test_one_bad_image_among_good_ones_writes_nothing(tmp_path, capsys):
    photos(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    expect_error(["scan", str(tmp_path / "imgs"), "--model", "planted-vit-tiny", "--out", str(tmp_path / "out")], capsys,
                 contains="zz-broken.jpg", root=tmp_path)


def test_image_to_a_text_model(tmp_path, capsys, text_model):
    photos(tmp_path / "imgs", 1)
    expect_error(["scan", str(tmp_path / "imgs" / "photo0.png"), "--model", str(text_model), "--out", str(tmp_path / "out")], capsys,
                 contains="is an image but the model is a language model", root=tmp_path)


def test_load_image_of_a_folder(tmp_path):
    (tmp_path / "x.png").mkdir()
    with pytest.raises(SinklessError, match="is a folder"):
        load_image(tmp_path / "x.png")
    assert tree(tmp_path) == {"x.png/": ("dir", 0)}


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF", "GIF"])
def test_other_formats(tmp_path, photo, fmt):
    path = tmp_path / f"photo.{fmt.lower()}"
    photo.save(path, fmt)
    assert load_image(path).size == photo.size


def test_png_content_with_a_jpg_name(tmp_path, photo):
    photo.save(tmp_path / "really-a-png.jpg", "PNG")
    assert np.array_equal(np.asarray(load_image(tmp_path / "really-a-png.jpg")), np.asarray(photo))


def test_16bit_tiff(tmp_path):
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "w.tif")
    assert (np.asarray(load_image(tmp_path / "w.tif")) == 255).all()
    Image.fromarray(np.full((8, 8), 257 * 100, dtype=np.uint16)).save(tmp_path / "g.tif")
    assert (np.asarray(load_image(tmp_path / "g.tif")) == 100).all()


def test_extreme_aspect_ratio_and_spaces_in_the_name(tmp_path, capsys):
    Image.new("RGB", (2000, 10), (30, 60, 90)).save(tmp_path / "a very wide strip.png")
    assert main(["-q", "scan", str(tmp_path / "a very wide strip.png"), "--model", "planted-vit-tiny", "--out", str(tmp_path / "o")]) == 0


def test_multipage_tiff_first_page(tmp_path):
    pages = [Image.new("RGB", (8, 8), colour) for colour in ((0, 255, 0), (255, 0, 0))]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    assert np.asarray(load_image(tmp_path / "pages.tif"))[0, 0].tolist() == [0, 255, 0]
