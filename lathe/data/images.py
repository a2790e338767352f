"""Image decoding for the data contract: bytes -> (H, W) or (H, W, 3) uint8, and the resize policies.

What happens to a source image (the same bytes give the same array on any machine: Pillow and
integer numpy arithmetic only, no float path):

- Formats: PNG, JPEG (an MPO, a camera's multi-picture JPEG, gives its first picture), BMP, TIFF;
  anything else is refused. The header size is checked against `max_pixels` before any pixel is
  decoded. EXIF orientation is not applied: pixels are used as stored.
- 16-bit gray (Pillow modes I;16, I;16B, I;16L, or I holding 0..65535) is scaled by its true depth,
  v * 255 / 65535 rounded to nearest (an exact .5 cannot occur), never clipped: a 10-bit image stored in
  16 bits (max 1023) comes out dark (max 4). Signed or 32-bit integer samples are refused.
- 16-bit colour (RGB, RGBA, gray+alpha PNG or TIFF): Pillow decodes it to 8 bits itself by keeping each
  sample's high byte (v >> 8, at most 1 below the gray rounding); that is taken as is.
  `bit_depth` records 16 for every 16-bit source, 8 for the rest (1-, 2- and 4-bit sources are
  expanded to 0..255 by Pillow).
- Alpha (RGBA, LA, PA, and a palette or tRNS transparency key) is composited over BLACK first,
  c * a / 255 rounded: fully transparent pixels become 0. (A tRNS key on 16-bit gray is ignored.)
- Colour (RGB, P, CMYK, YCbCr) to 1 channel: ITU-R 601-2 luma, L = (299 R + 587 G + 114 B) / 1000,
  exactly as Pillow's convert("L"). Gray to 3 channels: the gray value replicated, R = G = B.
- Resize policies: "squash" stretches to size x size (aspect ratio lost, no pixel lost); "pad" scales
  the longer side to `size` keeping the aspect ratio and centres the result on a black square (the
  extra pixel of an odd padding goes to the bottom/right). Both area-average (Pillow BOX).
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO, get_args

import numpy as np
from PIL import Image, UnidentifiedImageError

from lathe.data.contract import ResizePolicy
from lathe.errors import DataError

RESIZE_POLICIES: tuple[str, ...] = get_args(ResizePolicy)
DEFAULT_MAX_PIXELS = 50_000_000
FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # Pillow's names; an MPO is opened by the JPEG opener
GRAY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error)


@dataclass(frozen=True)
class Decoded:
    """One decoded image and what its source was."""

    pixels: np.ndarray  # (H, W) uint8 for channels=1, (H, W, 3) uint8 for channels=3
    bit_depth: int  # 8 or 16 (the source's true depth)
    mode: str  # PIL mode of the source
    width: int  # px
    height: int  # px


def _open_header(data: bytes | BinaryIO, where: str) -> Image.Image:
    """Parse the header with Pillow's own opener for one of FORMATS; no pixel is decoded yet. `data` is
    the file's bytes, or a seekable binary file (read lazily: a header check reads little).

    The openers are called directly rather than through Image.open, whose decompression-bomb check
    would refuse (or warn about) a large image before our `max_pixels` check could name its size.
    """
    Image.init()  # registers every opener in Image.OPEN (once)
    fp = io.BytesIO(data) if isinstance(data, bytes) else data
    prefix = fp.read(16)
    for fmt in FORMATS:
        factory, accept = Image.OPEN[fmt]
        accepted = accept(prefix) if accept is not None else True
        if not accepted or isinstance(accepted, str):  # a str is Pillow's "looks like it, but..." warning
            continue
        try:
            fp.seek(0)
            return factory(fp, "")
        except _DECODE_ERRORS as exc:
            raise DataError(f"{where}: cannot decode image ({fmt}: {exc})") from exc
    try:  # not one of ours: name the format if Pillow knows it
        fp.seek(0)
        with Image.open(fp) as im:
            other = im.format
    except UnidentifiedImageError as exc:
        raise DataError(f"{where}: cannot decode image (not a known image format)") from exc
    except (Image.DecompressionBombError, *_DECODE_ERRORS) as exc:
        raise DataError(f"{where}: cannot decode image ({exc})") from exc
    raise DataError(f"{where}: unsupported image format {other} (PNG, JPEG, BMP or TIFF)")


def _tiff_tag(im: Image.Image, tag: int, default: int) -> int:
    """The largest value of a TIFF tag (BitsPerSample 258, SampleFormat 339 may hold one per channel)."""
    value = getattr(im, "tag_v2", {}).get(tag, default)
    return max(value) if isinstance(value, tuple) else int(value)


def _bit_depth(im: Image.Image, data: bytes) -> int:
    """16 for a 16-bit source (even one Pillow already reduced to 8 bits), else 8."""
    if im.mode in GRAY16_MODES:
        return 16
    if im.format == "PNG":  # IHDR is the first chunk: bit depth at byte 24
        return 16 if data[12:16] == b"IHDR" and data[24] == 16 else 8
    if im.format == "TIFF":
        return 16 if _tiff_tag(im, 258, 8) > 8 else 8
    return 8


def _scale16(values: np.ndarray, where: str) -> np.ndarray:
    """(H, W) 16-bit gray -> (H, W) uint8: round(v * 255 / 65535) in integers, not clipped."""
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi > 65535:
        raise DataError(f"{where}: pixel values {lo}..{hi} do not fit 16 bits (signed/32-bit samples unsupported)")
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _planes(im: Image.Image, where: str) -> np.ndarray:
    """The loaded image as (H, W) gray or (H, W, 3) RGB uint8, alpha composited over black."""
    mode = im.mode
    if mode in GRAY16_MODES:
        if im.format == "TIFF" and (_tiff_tag(im, 258, 8) > 16 or _tiff_tag(im, 339, 1) == 2):
            raise DataError(f"{where}: unsupported image mode {mode} (signed or 32-bit integer samples)")
        return _scale16(np.asarray(im), where)
    if mode in ("L", "RGB") and "transparency" in im.info:  # a tRNS colour key
        im = im.convert("LA" if mode == "L" else "RGBA")
    elif mode in ("P", "PA"):  # palette (gray or colour), with its transparency if any
        im = im.convert("RGBA")
    elif mode in ("1", "RGBX", "CMYK", "YCbCr"):
        im = im.convert("L" if mode == "1" else "RGB")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise DataError(f"{where}: unsupported image mode {mode}")
    arr = np.asarray(im, dtype=np.uint8)  # (H, W) L, (H, W, 2) LA, (H, W, 3) RGB, (H, W, 4) RGBA
    if im.mode in ("LA", "RGBA"):
        alpha = arr[..., -1:].astype(np.uint16)
        arr = ((arr[..., :-1].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
        if im.mode == "LA":
            arr = arr[..., 0]
    return arr


def header_of(fp: BinaryIO, where: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from an image file's header, nothing decoded; DataError naming `where` when the
    file is not a supported image or its header is over `max_pixels` (a pre-run check of many files)."""
    im = _open_header(fp, where)
    problem = header_problem(im, max_pixels)
    if problem:
        raise DataError(f"{where}: {problem}")
    return im.size


def header_problem(im: Image.Image, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """What is wrong with an opened (not loaded) image by its header alone: a format other than PNG,
    JPEG, BMP or TIFF, or more than `max_pixels` pixels (None: no limit); None if nothing."""
    if im.format not in (*FORMATS, "MPO"):
        return f"unsupported image format {im.format} (PNG, JPEG, BMP or TIFF)"
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        return (f"image header says {width}x{height} px ({width * height} pixels), "
                f"more than the limit of {max_pixels} (data.max_pixels)")
    return None


def decode_image(data: bytes, where: str, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode PNG/JPEG/BMP/TIFF bytes to `channels` (1 or 3) uint8 planes; errors name `where`."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _open_header(data, where) as im:
            width, height = im.size
            problem = header_problem(im, max_pixels)
            if problem:
                raise DataError(f"{where}: {problem}")
            try:
                im.load()
            except Image.DecompressionBombError as exc:
                raise DataError(f"{where}: {width}x{height} px is above Pillow's limit "
                                f"(PIL.Image.MAX_IMAGE_PIXELS) as well as ours ({exc})") from exc
            except _DECODE_ERRORS as exc:
                raise DataError(f"{where}: cannot decode image ({exc})") from exc
            mode, depth = im.mode, _bit_depth(im, data)
            try:
                planes = _planes(im, where)
            except _DECODE_ERRORS as exc:  # a conversion Pillow cannot do for this image
                raise DataError(f"{where}: cannot decode image ({exc})") from exc
    if channels == 3 and planes.ndim == 2:
        planes = np.repeat(planes[:, :, None], 3, axis=2)
    elif channels == 1 and planes.ndim == 3:
        planes = np.asarray(Image.fromarray(planes).convert("L"), dtype=np.uint8)
    return Decoded(pixels=np.ascontiguousarray(planes), bit_depth=depth, mode=mode, width=width, height=height)


def _box(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area-averaged resize of (H, W[, 3]) uint8 to (height, width[, 3])."""
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BOX), dtype=np.uint8)


def resize_image(pixels: np.ndarray, size: int, policy: str) -> np.ndarray:
    """(H, W[, 3]) uint8 -> (size, size[, 3]) uint8 by `policy` ("squash" or "pad", see the module doc)."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {policy!r}; use one of {', '.join(RESIZE_POLICIES)}")
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"expected (H, W) or (H, W, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    if policy == "squash":
        return _box(pixels, size, size)
    height, width = pixels.shape[:2]
    long_side, short_side = max(height, width), min(height, width)
    short = max(1, round(short_side * size / long_side))  # px after scaling
    new_h, new_w = (size, short) if height >= width else (short, size)
    out = np.zeros((size, size, *pixels.shape[2:]), dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2  # odd padding: extra pixel bottom/right
    out[top : top + new_h, left : left + new_w] = _box(pixels, new_w, new_h)
    return out


def pixel_stats(pixels: np.ndarray) -> tuple[float, float]:
    """(mean, std) of the 8-bit values over all pixels and channels, rounded to 4 decimals.

    Sums are exact integers and the division and square root are correctly rounded, so the figures
    do not depend on the machine's summation order.
    """
    n = int(pixels.size)
    if n == 0:
        raise ValueError("pixel_stats of an empty image")
    values = pixels.astype(np.int64)
    total, squares = int(values.sum()), int((values * values).sum())
    return round(total / n, 4), round(math.sqrt((n * squares - total * total) / (n * n)), 4)
