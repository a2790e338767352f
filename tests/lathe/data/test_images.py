import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from lathe.data.images import (
    DEFAULT_MAX_PIXELS,
    RESIZE_POLICIES,
    Decoded,
    decode_image,
    header_problem,
    pixel_stats,
    resize_image,
)
from lathe.errors import DataError


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): (H, W[, C]) uint16 samples."""
    h, w = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def old_ingest_resize(img: np.ndarray, size: int) -> np.ndarray:
    """lathe.data.ingest.resize as committed before the data contract (the bytes squash must keep)."""
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (6, 9), dtype=np.uint8)


def test_16bit_gray_png_is_scaled_by_its_true_depth():
    ramp = np.array([[0, 257, 32767, 32768, 65279, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")

    out = decode_image(data, "ramp.png", channels=1)

    assert out.pixels.dtype == np.uint8 and out.pixels.shape == (1, 6)
    assert out.pixels.tolist() == [[0, 1, 127, 128, 254, 255]]
    assert (out.bit_depth, out.mode, out.width, out.height) == (16, "I;16", 6, 1)
    exact = np.rint(ramp.astype(np.float64) * 255 / 65535)
    assert np.array_equal(out.pixels, exact.astype(np.uint8))


def test_10bit_data_in_16bit_png_is_not_clipped_or_stretched():
    ten_bit = np.linspace(0, 1023, 64, dtype=np.uint16).reshape(8, 8)
    data = encode(Image.fromarray(ten_bit), "PNG")

    out = decode_image(data, "tenbit.png", channels=1)

    assert int(out.pixels.max()) == 4 and int(out.pixels.min()) == 0
    assert out.bit_depth == 16


def test_16bit_big_endian_tiff_scales_like_png():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes()), "TIFF")

    out = decode_image(data, "be.tif", channels=3)

    assert out.bit_depth == 16 and out.pixels.shape == (1, 4, 3)
    assert out.pixels[..., 0].tolist() == [[0, 1, 128, 255]]
    assert np.array_equal(out.pixels[..., 0], out.pixels[..., 2])


def test_16bit_rgb_png_takes_what_pillow_decodes_and_records_depth_16():
    v = np.array([0x0000, 0x7F80, 0x80FF, 0xFFFF], dtype=np.uint16)
    data = png16(np.stack([v, v, v], axis=-1).reshape(1, 4, 3), color_type=2)

    out = decode_image(data, "rgb16.png", channels=3)

    assert out.bit_depth == 16 and out.mode == "RGB"
    assert out.pixels[0, :, 0].tolist() == [0, 127, 128, 255]  # Pillow keeps the high byte


def test_rgb_to_one_channel_is_pillow_luma():
    data = encode(Image.fromarray(RGB), "PNG")

    out = decode_image(data, "rgb.png", channels=1)

    want = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    assert out.pixels.shape == (6, 9) and np.array_equal(out.pixels, want)
    assert out.bit_depth == 8 and out.mode == "RGB"


def test_gray_to_three_channels_replicates_the_value():
    data = encode(Image.fromarray(GRAY), "PNG")

    out = decode_image(data, "gray.png", channels=3)

    assert out.pixels.shape == (6, 9, 3)
    for c in range(3):
        assert np.array_equal(out.pixels[..., c], GRAY)


def test_alpha_is_composited_over_black():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[0, :, 3] = 0  # transparent row
    rgba[1, 0, 3] = 255
    rgba[1, 1, 3] = 128
    data = encode(Image.fromarray(rgba), "PNG")

    gray = decode_image(data, "rgba.png", channels=1)
    colour = decode_image(data, "rgba.png", channels=3)

    assert gray.pixels.tolist() == [[0, 0], [200, 100]]  # 200 * 128 / 255 = 100.4
    assert colour.pixels[0].max() == 0 and colour.pixels[1, 0].tolist() == [200, 200, 200]
    assert gray.mode == "RGBA"


def test_gray_alpha_and_palette_transparency_become_black():
    la = encode(Image.new("LA", (2, 1), (90, 0)), "PNG")
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 200, 200])
    pal.putpixel((1, 0), 1)
    pal_data = encode(pal, "PNG", transparency=1)

    assert decode_image(la, "la.png", 1).pixels.tolist() == [[0, 0]]
    assert decode_image(pal_data, "p.png", 3).pixels.tolist() == [[[10, 20, 30], [0, 0, 0]]]


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "TIFF"])
def test_other_formats_decode(fmt):
    data = encode(Image.fromarray(RGB), fmt)

    out = decode_image(data, f"x.{fmt.lower()}", channels=3)

    assert isinstance(out, Decoded) and out.pixels.shape == (6, 9, 3) and out.pixels.dtype == np.uint8
    assert (out.width, out.height, out.bit_depth) == (9, 6, 8)
    if fmt != "JPEG":  # lossless
        assert np.array_equal(out.pixels, RGB)


def test_decoding_is_repeatable():
    data = encode(Image.fromarray(RGB), "JPEG", quality=80)

    a, b = decode_image(data, "a.jpg", 1), decode_image(data, "a.jpg", 1)

    assert np.array_equal(a.pixels, b.pixels)


def test_truncated_jpeg_is_a_data_error_naming_the_file():
    data = encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")

    with pytest.raises(DataError, match=r"^cells/0001\.jpg: cannot decode image \(") as err:
        decode_image(data[: len(data) // 2], "cells/0001.jpg", channels=1)
    assert "\n" not in str(err.value)


def test_garbage_bytes_are_a_data_error():
    with pytest.raises(DataError, match=r"^junk\.png: cannot decode image"):
        decode_image(b"this is not an image at all, just bytes", "junk.png", channels=1)


def test_broken_png_body_is_a_data_error():
    data = encode(Image.fromarray(GRAY), "PNG")

    with pytest.raises(DataError, match=r"^cut\.png: cannot decode image"):
        decode_image(data[:45], "cut.png", channels=1)


def huge_header_png() -> bytes:
    """A 1x1 PNG whose IHDR (and its CRC) is patched to claim 20000x20000 px."""
    png = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    png[16:24] = struct.pack(">II", 20000, 20000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def test_huge_header_is_refused_before_decoding():
    data = huge_header_png()

    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        decode_image(data, "huge.png", channels=1)
    elapsed = time.perf_counter() - start

    assert str(err.value) == ("huge.png: image header says 20000x20000 px (400000000 pixels), "
                              f"more than the limit of {DEFAULT_MAX_PIXELS} (data.max_pixels)")
    assert elapsed < 1.0


def test_pillow_bomb_warning_does_not_leak(recwarn):
    data = huge_header_png()

    with pytest.raises(DataError, match="more than the limit of 1000"):
        decode_image(data, "huge.png", channels=1, max_pixels=1000)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_gif_is_an_unsupported_format():
    data = encode(Image.fromarray(GRAY), "GIF")

    with pytest.raises(DataError, match=r"^anim\.gif: unsupported image format GIF \(PNG, JPEG, BMP or TIFF\)$"):
        decode_image(data, "anim.gif", channels=1)


def test_header_problem_names_format_and_size():
    gif = Image.open(io.BytesIO(encode(Image.fromarray(GRAY), "GIF")))
    png = Image.open(io.BytesIO(encode(Image.fromarray(GRAY), "PNG")))

    assert header_problem(gif) == "unsupported image format GIF (PNG, JPEG, BMP or TIFF)"
    assert header_problem(png, max_pixels=53) == (
        "image header says 9x6 px (54 pixels), more than the limit of 53 (data.max_pixels)")
    assert header_problem(png, max_pixels=54) is None and header_problem(png, None) is None


def test_channels_must_be_1_or_3():
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        decode_image(encode(Image.fromarray(GRAY), "PNG"), "x.png", channels=2)


def test_squash_on_gray_equals_the_former_ingest_resize():
    img = RNG.integers(0, 256, (37, 23), dtype=np.uint8)

    out = resize_image(img, 16, "squash")

    assert out.shape == (16, 16) and out.tobytes() == old_ingest_resize(img, 16).tobytes()


def test_pad_centres_a_wide_image_with_black_above_and_below():
    wide = np.full((10, 30), 200, dtype=np.uint8)  # 3:1

    out = resize_image(wide, 12, "pad")

    assert out.shape == (12, 12) and out.dtype == np.uint8
    assert out[:4].max() == 0 and out[8:].max() == 0  # 12 - 4 = 8 rows of padding, 4 above, 4 below
    assert (out[4:8] == 200).all()


def test_pad_odd_padding_goes_to_the_bottom_and_right_for_colour():
    tall = np.full((30, 10, 3), 90, dtype=np.uint8)  # 1:3, scaled to 11 x round(10*11/30) = 4 wide

    out = resize_image(tall, 11, "pad")

    assert out.shape == (11, 11, 3)
    cols = np.flatnonzero(out[5, :, 0])
    assert cols.tolist() == [3, 4, 5, 6]  # 7 columns of padding: 3 left, 4 right
    assert (out[:, cols] == 90).all()


def test_pad_of_a_square_equals_squash_and_squash_keeps_colour():
    img = RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)

    assert np.array_equal(resize_image(img, 8, "pad"), resize_image(img, 8, "squash"))
    assert resize_image(RGB, 5, "squash").shape == (5, 5, 3)


def test_pad_keeps_at_least_one_pixel_of_a_thin_line():
    line = np.full((1, 100), 255, dtype=np.uint8)

    out = resize_image(line, 10, "pad")

    assert out.shape == (10, 10) and out[4].tolist() == [255] * 10 and out.sum() == 255 * 10


def test_unknown_policy_lists_the_policies():
    with pytest.raises(ValueError, match="squash, pad"):
        resize_image(GRAY, 4, "crop")
    assert RESIZE_POLICIES == ("squash", "pad")


def test_pixel_stats():
    pixels = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    odd = np.array([[1, 2, 4]], dtype=np.uint8)

    assert pixel_stats(pixels) == (127.5, 127.5)
    assert pixel_stats(odd) == (2.3333, 1.2472)
    assert pixel_stats(RGB) == (round(float(RGB.mean()), 4), round(float(RGB.std()), 4))


def test_32bit_integer_tiff_is_refused():
    data = encode(Image.fromarray(np.array([[0, 1000, 70000]], dtype=np.int32)), "TIFF")

    with pytest.raises(DataError, match=r"^deep\.tif: unsupported image mode I \(signed or 32-bit"):
        decode_image(data, "deep.tif", channels=1)
