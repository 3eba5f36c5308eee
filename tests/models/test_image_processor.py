"""The image processor's bad-input corpus: every odd image becomes the picture a viewer shows, or is refused by name.

Images are written at test time (16-bit, float, transparent, truncated, oversized...); the expected pixels are
computed by hand from the values written, not by the code under test.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mmgpt.models.image_processor import BadImageError, ImageNotFoundError, ImageProcessor, open_image

S = 5  # images are S x S: the processor's output is then the converted picture itself, with no resize
# No normalization: the output is the RGB picture in [0, 1], comparable with hand-made pixels.
PLAIN = ImageProcessor(img_size=S, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def pixels(image) -> np.ndarray:
    """The processor's picture as uint8 ``(S, S, 3)``: it divided 8-bit values by 255, so this is exact."""
    return (PLAIN(image).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


RNG = np.random.default_rng(0)
GRAY16 = RNG.integers(0, 65536, (S, S)).astype(np.uint16)
UNIT = RNG.random((S, S)).astype(np.float32)
RGB8 = RNG.integers(0, 256, (S, S, 3)).astype(np.uint8)
ALPHA = RNG.integers(0, 256, (S, S)).astype(np.uint8)


def gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    # c * a + 255 * (1 - a), with a = alpha / 255: what shows through a transparent pixel is a white page.
    return np.rint(255 - (255 - rgb.astype(np.float64)) * alpha[..., None] / 255).astype(np.uint8)


def palette_with_transparent_index(path):
    image = Image.fromarray((np.arange(S * S).reshape(S, S) % 2).astype(np.uint8), "P")
    image.putpalette([200, 10, 10, 10, 10, 200])  # index 0: red, index 1: blue
    image.save(path, transparency=0)  # index 0 is transparent
    return path


def rgb_with_transparent_colour(path):
    rgb = np.zeros((S, S, 3), np.uint8)
    rgb[:, : S // 2] = (1, 2, 3)  # the colour marked transparent (PNG tRNS)
    rgb[:, S // 2 :] = (40, 50, 60)
    Image.fromarray(rgb).save(path, transparency=(1, 2, 3))
    return path


def rgba_sideways(path):
    # Stored with EXIF orientation 6, "rotate 90 degrees clockwise to view".
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.dstack([RGB8, ALPHA]), "RGBA").save(path, exif=exif)
    return path


def saved(array, mode, name, **kwargs):
    def build(tmp_path):
        path = tmp_path / name
        Image.fromarray(array, mode).save(path, **kwargs)  # mode None: from the dtype (uint16 -> I;16)
        return path

    return build


# (name, build(tmp_path) -> a path or a PIL image, the expected uint8 RGB picture (S, S, 3)).
CONVERTED = [
    ("png_16bit_gray", saved(GRAY16, None, "g16.png"), gray3(np.rint(GRAY16 / 257).astype(np.uint8))),
    (
        "pil_16bit_big_endian",
        lambda _: Image.frombytes("I;16B", (S, S), GRAY16.astype(">u2").tobytes()),
        gray3(np.rint(GRAY16 / 257).astype(np.uint8)),
    ),
    ("tiff_32bit_int", saved(GRAY16.astype(np.int32), "I", "i32.tiff"), gray3(np.rint(GRAY16 / 257).astype(np.uint8))),
    ("tiff_float_unit", saved(UNIT, "F", "f.tiff"), gray3(np.rint(UNIT * 255).astype(np.uint8))),
    ("png_rgba_half_transparent", saved(np.dstack([RGB8, ALPHA]), "RGBA", "rgba.png"), over_white(RGB8, ALPHA)),
    ("png_rgba_opaque", saved(np.dstack([RGB8, np.full((S, S), 255, np.uint8)]), "RGBA", "opaque.png"), RGB8),
    (
        "png_rgba_fully_transparent",
        saved(np.dstack([RGB8, np.zeros((S, S), np.uint8)]), "RGBA", "clear.png"),
        np.full((S, S, 3), 255, np.uint8),
    ),
    (
        "png_gray_alpha",
        saved(np.dstack([RGB8[..., 0], ALPHA]), "LA", "la.png"),
        gray3(over_white(gray3(RGB8[..., 0]), ALPHA)[..., 0]),
    ),
    (
        "png_palette_transparent_index",
        lambda tmp_path: palette_with_transparent_index(tmp_path / "p.png"),
        np.where((np.arange(S * S).reshape(S, S, 1) % 2) == 0, [255, 255, 255], [10, 10, 200]).astype(np.uint8),
    ),
    (
        "png_rgb_transparent_colour",
        lambda tmp_path: rgb_with_transparent_colour(tmp_path / "trns.png"),
        np.concatenate([np.full((S, S // 2, 3), 255), np.tile([40, 50, 60], (S, S - S // 2, 1))], 1).astype(np.uint8),
    ),
    (
        "png_rgba_exif_sideways",
        lambda tmp_path: rgba_sideways(tmp_path / "side.png"),
        np.rot90(over_white(RGB8, ALPHA), k=-1),  # turned clockwise as a viewer shows it, then composited
    ),
    # 8-bit pixels in a 32-bit integer image (Image.fromarray of an int array, convert("I")) stay 8-bit.
    ("int_image_8bit_values", lambda _: Image.fromarray(RGB8[..., 2].astype(np.int32), "I"), gray3(RGB8[..., 2])),
    ("pil_gray_converted_to_I", lambda _: Image.fromarray(RGB8[..., 0], "L").convert("I"), gray3(RGB8[..., 0])),
    # Float images get the same overshoot tolerance as float tensors, clamped.
    (
        "float_image_resample_overshoot",
        lambda _: Image.fromarray(UNIT * 1.08 - 0.04, "F"),
        gray3(np.rint(np.clip(UNIT * 1.08 - 0.04, 0, 1) * 255).astype(np.uint8)),
    ),
    # Ordinary 8-bit modes are untouched: exactly PIL's own conversion.
    ("png_gray_8bit", saved(RGB8[..., 1], "L", "l.png"), gray3(RGB8[..., 1])),
    ("png_rgb_8bit", saved(RGB8, "RGB", "rgb.png"), RGB8),
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in CONVERTED], ids=[c[0] for c in CONVERTED])
def test_odd_images_become_the_picture_a_viewer_shows(tmp_path, build, expected):
    given = build(tmp_path)
    picture = pixels(given)
    assert picture.shape == expected.shape and picture.dtype == np.uint8
    np.testing.assert_array_equal(picture, expected)


def test_converted_images_go_through_the_processor_unchanged():
    # The same picture whether it arrives 16-bit or as float: no hidden second conversion after to_rgb.
    expected = torch.from_numpy(np.rint(GRAY16 / 257)).float().div(255).expand(3, S, S)
    torch.testing.assert_close(PLAIN(Image.fromarray(GRAY16)), expected, atol=0, rtol=0)
    as_float = Image.fromarray((np.rint(GRAY16 / 257) / 255).astype(np.float32), "F")
    torch.testing.assert_close(PLAIN(as_float), expected, atol=0, rtol=0)


# A 32-bit integer ("I") image: 0..255 is 8-bit pixels, as integer tensors read; 256..65535 is 16-bit (/ 257).
@pytest.mark.parametrize(
    "value, expected",
    [(0, 0), (1, 1), (200, 200), (255, 255), (256, 1), (40000, round(40000 / 257)), (65535, 255)],
)
def test_int_image_is_8bit_up_to_255_and_16bit_beyond(value, expected):
    image = Image.fromarray(np.full((S, S), value, np.int32), "I")
    np.testing.assert_array_equal(pixels(image), np.full((S, S, 3), expected, np.uint8))


def test_int_image_with_one_value_over_255_is_read_as_16bit_throughout():
    values = np.full((S, S), 200, np.int32)
    values[0, 0] = 40000
    expected = np.rint(values / 257).astype(np.uint8)  # 200 -> 1: the image is 16-bit, every pixel with it
    np.testing.assert_array_equal(pixels(Image.fromarray(values, "I")), gray3(expected))


@pytest.mark.parametrize(
    "value, expected",
    [(1.0000001, 255), (1.04, 255), (-0.03, 0), (-0.0, 0), (0.5, 128), (1.0, 255)],
)
def test_float_image_takes_the_float_tensor_tolerance(value, expected):
    image = Image.fromarray(np.full((S, S), value, np.float32), "F")
    np.testing.assert_array_equal(pixels(image), np.full((S, S, 3), expected, np.uint8))
    # The same value as a float tensor is accepted too (and clamped the same way).
    torch.testing.assert_close(PLAIN(torch.full((1, S, S), value)), torch.full((3, S, S), min(max(value, 0.0), 1.0)))


def huge_png(side):
    def build(tmp_path, monkeypatch):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
        path = tmp_path / f"bomb{side}.png"
        Image.new("RGB", (side, side)).save(path)
        return path

    return build


def file_bytes(name, data: bytes):
    def build(tmp_path, monkeypatch):
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return build


def png_bytes(size=(16, 16)) -> bytes:
    import io

    out = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (*size, 3)).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def jpeg_bytes() -> bytes:
    import io

    out = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(out, "JPEG")
    return out.getvalue()


def in_memory(image):
    return lambda tmp_path, monkeypatch: image


def float_tiff(values, name):
    def build(tmp_path, monkeypatch):
        path = tmp_path / name
        Image.fromarray(np.asarray(values, np.float32), "F").save(path)
        return path

    return build


# (name, build(tmp_path, monkeypatch) -> input, error class, regex the message must match).
REFUSED = [
    ("missing_file", lambda tmp_path, _: tmp_path / "nope.png", ImageNotFoundError, r"not found: .*nope\.png"),
    ("empty_file", file_bytes("empty.png", b""), BadImageError, r"cannot read image .*empty\.png"),
    ("text_as_png", file_bytes("text.png", b"not an image"), BadImageError, r"cannot read image .*text\.png"),
    ("truncated_png", file_bytes("cut.png", png_bytes()[:100]), BadImageError, r"cannot read image .*cut\.png"),
    ("truncated_jpeg", file_bytes("cut.jpg", jpeg_bytes()[:300]), BadImageError, r"cannot read image .*cut\.jpg"),
    (
        "png_garbage_after_signature",
        file_bytes("noise.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
        BadImageError,
        r"cannot read image .*noise\.png",
    ),
    (
        "bomb_under_twice_the_limit",  # PIL only warns here; mmgpt refuses before decoding
        huge_png(18),
        BadImageError,
        r"image .*bomb18\.png is too large to decode safely: 18x18 = 324 pixels, more than "
        r"PIL\.Image\.MAX_IMAGE_PIXELS = 300",
    ),
    ("bomb_over_twice_the_limit", huge_png(30), BadImageError, r"image .*bomb30\.png is too large to decode safely"),
    (
        "float_tiff_nan_and_inf",
        float_tiff([[0.5, np.nan, np.inf], [np.nan, 0.0, 1.0]], "nan.tiff"),
        BadImageError,
        r"image .*nan\.tiff holds 2 NaN and 1 infinite values \(of 6\)",
    ),
    (
        "float_tiff_0_to_255",
        float_tiff([[0.0, 128.0], [255.0, 3.0]], "f255.tiff"),
        BadImageError,
        r"image .*f255\.tiff: a float \(PIL mode 'F'\) image with values in \[0, 255\]; expected \[0, 1\]",
    ),
    (
        "float_tiff_just_past_overshoot",
        float_tiff([[0.5, 1.06]], "f106.tiff"),
        BadImageError,
        r"image .*f106\.tiff: a float \(PIL mode 'F'\) image with values in \[0\.5, 1\.06\]",
    ),
    (
        "float_image_values_printed_with_digits",
        in_memory(Image.fromarray(np.array([[-0.0512345, 0.5]], np.float32), "F")),
        BadImageError,
        r"values in \[-0\.0512345, 0\.5\]",
    ),
    (
        "int_image_over_16bit",
        in_memory(Image.fromarray(np.array([[0, 70000]], np.int32), "I")),
        BadImageError,
        r"PIL mode 'I'\) image with values in \[0, 70000\]",
    ),
    (
        "int_image_negative",
        in_memory(Image.fromarray(np.array([[-5, 0], [7, 9]], np.int32), "I")),
        BadImageError,
        r"the image: a 32-bit integer \(PIL mode 'I'\) image with values in \[-5, 9\]",
    ),
    ("zero_size_image", in_memory(Image.new("RGB", (0, 0))), BadImageError, r"the image is empty \(0x0 pixels\)"),
    (
        "premultiplied_gray_alpha",
        in_memory(Image.new("La", (2, 2))),
        BadImageError,
        r"the image: cannot convert PIL mode 'La' to RGB",
    ),
]


@pytest.mark.parametrize("build, error, match", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_unusable_images_are_refused_naming_what_was_wrong(tmp_path, monkeypatch, build, error, match):
    given = build(tmp_path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, never only a warning that a training log buries
        with pytest.raises(error, match=match):
            ImageProcessor(img_size=8)(given)


def test_the_owner_is_named_and_a_missing_file_is_still_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gone\.png \(sample vqa/3, q\.jsonl line 3\)"):
        open_image(tmp_path / "gone.png", "sample vqa/3, q.jsonl line 3")
    assert issubclass(BadImageError, ValueError)  # callers that caught ValueError still catch every refusal


U8 = torch.from_numpy(RGB8).permute(2, 0, 1).contiguous()  # (3, S, S) uint8
A8 = torch.from_numpy(ALPHA)[None]  # (1, S, S)

# (name, tensor, expected (3, S, S) float picture in [0, 1]).
TENSORS_READ = [
    ("uint8", U8, U8.float() / 255),
    ("int64_0_255", U8.long(), U8.float() / 255),  # torch.tensor(list of ints) gives int64
    ("int16_0_255", U8.short(), U8.float() / 255),
    ("float32_unit", U8.float() / 255, U8.float() / 255),
    ("float64_unit", U8.double() / 255, U8.float() / 255),
    ("float16_unit", (U8.float() / 255).half(), (U8.float() / 255).half().float()),
    # A bicubic resize's overshoot at sharp edges, clamped as PIL's uint8 output clamps it.
    ("float_resample_overshoot", (U8.float() / 255 * 1.08 - 0.04), (U8.float() / 255 * 1.08 - 0.04).clamp(0, 1)),
    ("gray_1hw", U8[:1], (U8[:1].float() / 255).expand(3, S, S)),
    ("rgba_4hw", torch.cat([U8, A8]), U8.float() / 255 * (A8.float() / 255) + (1 - A8.float() / 255)),
]


@pytest.mark.parametrize("tensor, expected", [c[1:] for c in TENSORS_READ], ids=[c[0] for c in TENSORS_READ])
def test_image_tensors_read_by_dtype_and_channels(tensor, expected):
    out = PLAIN(tensor)
    assert out.dtype == torch.float32 and out.shape == (3, S, S)
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=0)


def with_values(values, dtype=torch.float32):
    x = torch.full((3, S, S), 0.5, dtype=dtype)
    x.view(-1)[: len(values)] = torch.tensor(values, dtype=dtype)
    return x


# (name, tensor or other input, error class, regex the message must match).
TENSORS_REFUSED = [
    ("float_0_255", U8.float(), BadImageError, r"must hold values in \[0, 1\], got \[\d+, \d+\]: pass 0\.\.255 "
     r"pixels as uint8 or divide them by 255"),
    ("float_normalized", with_values([-1.0, 1.0]), BadImageError, r"got \[-1, 1\].*not one normalized already"),
    ("float_just_past_overshoot", with_values([1.06]), BadImageError, r"got \[0\.5, 1\.06\]"),
    ("float_nan", with_values([float("nan")]), BadImageError, r"holds 1 NaN and 0 infinite values \(of 75\)"),
    ("float_inf", with_values([float("inf"), -float("inf")]), BadImageError, r"holds 0 NaN and 2 infinite values"),
    ("int64_over_255", with_values([300], torch.int64), BadImageError, r"\(torch\.int64\) must hold pixel values "
     r"0\.\.255, got \[0, 300\]"),
    ("int32_negative", with_values([-1], torch.int32), BadImageError, r"got \[-1, 0\]"),
    ("bool_mask", torch.ones(3, S, S, dtype=torch.bool), BadImageError, r"dtype torch\.bool is not an image"),
    ("complex", torch.zeros(3, S, S, dtype=torch.complex64), BadImageError, r"dtype torch\.complex64 is not an image"),
    ("hw_without_channels", torch.zeros(S, S), BadImageError, r"got \(5, 5\).*pass image\[None\]"),
    ("batch_of_one", torch.zeros(1, 3, S, S), BadImageError, r"a batch of shape \(1, 3, 5, 5\)"),
    ("channels_last", torch.zeros(S, S, 3), BadImageError, r"got \(5, 5, 3\).*image\.permute\(2, 0, 1\)"),
    ("two_channels", torch.zeros(2, S, S), BadImageError, r"shape \(3, H, W\), got \(2, 5, 5\)"),
    ("zero_width", torch.zeros(3, S, 0), BadImageError, r"shape \(3, 5, 0\) is empty"),
    ("numpy_array", np.zeros((3, S, S)), TypeError, r"got ndarray"),
]


@pytest.mark.parametrize("given, error, match", [c[1:] for c in TENSORS_REFUSED], ids=[c[0] for c in TENSORS_REFUSED])
def test_image_tensors_refused_with_what_was_expected(given, error, match):
    with pytest.raises(error, match=match):
        ImageProcessor(img_size=8)(given)


def test_image_processor_resizes_and_rejects_bad_input(tmp_path):
    proc = ImageProcessor(img_size=32)
    assert proc(Image.new("RGB", (50, 20), (255, 0, 0))).shape == (3, 32, 32)
    red = proc(torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 48, 64))  # a plain red float image
    torch.testing.assert_close(red, torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 32, 32))
    with pytest.raises(FileNotFoundError, match="image file not found"):
        proc(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*bad\.png"):
        proc(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"shape \(3, H, W\), got \(32, 32, 3\)"):
        proc(torch.zeros(32, 32, 3))
    with pytest.raises(TypeError, match="got ndarray"):
        proc(torch.zeros(3, 32, 32).numpy())


def eps_bytes() -> bytes:
    """A small picture as Encapsulated PostScript: a program that PIL would hand to Ghostscript to draw."""
    import io

    out = io.BytesIO()
    Image.new("RGB", (S, S), (200, 30, 30)).save(out, "EPS")
    return out.getvalue()


@pytest.fixture
def no_subprocess(monkeypatch):
    """Records (and stops) every program PIL tries to start; it also forgets whether Ghostscript was found."""
    import subprocess

    from PIL import EpsImagePlugin

    started = []

    def refuse(*args, **kwargs):
        started.append(args[0] if args else kwargs.get("args"))
        raise OSError("no programs in this test")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "check_call", refuse)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return started


def test_postscript_is_refused_without_starting_a_program(tmp_path, no_subprocess):
    path = tmp_path / "scene.eps"
    path.write_bytes(eps_bytes())
    for given in (path, str(path)):
        with pytest.raises(BadImageError, match=r"cannot read image .*scene\.eps: not an image in a format mmgpt "
                                                r"reads \(PNG, JPEG, WEBP, GIF, BMP, TIFF\)"):
            PLAIN(given)
    disguised = tmp_path / "scene.png"  # the name does not matter: PIL goes by the bytes
    disguised.write_bytes(eps_bytes())
    with pytest.raises(BadImageError, match=r"scene\.png: not an image in a format mmgpt reads"):
        open_image(disguised)
    assert no_subprocess == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"])
def test_every_accepted_format_opens(tmp_path, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    picture = Image.new("RGB", (S, S), (0, 0, 255))
    picture.save(path, fmt, **({"save_all": True, "append_images": [picture]} if fmt == "MPO" else {}))
    assert open_image(path).size == (S, S)


def test_a_fifo_or_a_directory_is_refused_without_opening_it(tmp_path):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    with pytest.raises(BadImageError, match=r"image .*pipe\.png is not a regular file"):
        open_image(fifo)
    with pytest.raises(BadImageError, match=r"is not a regular file"):
        open_image(tmp_path)
