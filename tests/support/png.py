"""Just enough PNG decoding to tell a rendered page from a blank screenshot,
with the standard library only (no imaging library in the test environment).

    stats = colour_stats(path)   # width, height, distinct colours, share of the commonest
    assert_not_blank(path)

Handles what headless Chromium writes: 8-bit RGB or RGBA, not interlaced.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {2: 3, 6: 4}  # colour type -> bytes per pixel (RGB, RGBA)
# SWAR byte-wise addition modulo 256 of two whole rows held as big integers
# (the "Up" filter, most of Chromium's rows, without a per-byte Python loop)
LOW7 = 0x7F
HIGH1 = 0x80


@dataclass(frozen=True)
class Image:
    width: int
    height: int
    channels: int
    rows: list[bytes]  # unfiltered scanlines


@dataclass(frozen=True)
class ColourStats:
    width: int
    height: int
    colours: int  # distinct pixel values
    dominant_share: float  # fraction of pixels with the commonest value (the background)


class PngError(ValueError):
    pass


def _chunks(data: bytes) -> tuple[bytes, bytes]:
    """The IHDR body and the concatenated IDAT bodies."""
    if data[:8] != SIGNATURE:
        raise PngError("not a PNG file")
    pos, header, idat = 8, b"", []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if not header or not idat:
        raise PngError("PNG without IHDR or IDAT")
    return header, b"".join(idat)


def _add_rows(a: bytes, b: bytes) -> bytes:
    n = len(a)
    low, high = int.from_bytes(bytes([LOW7]) * n), int.from_bytes(bytes([HIGH1]) * n)
    x, y = int.from_bytes(a), int.from_bytes(b)
    return (((x & low) + (y & low)) ^ ((x ^ y) & high)).to_bytes(n)


def _unfilter(kind: int, line: bytes, prev: bytes, bpp: int) -> bytes:
    if kind == 0:
        return line
    if kind == 2:
        return _add_rows(line, prev)
    out = bytearray(line)
    for i in range(len(out)):
        left = out[i - bpp] if i >= bpp else 0
        up = prev[i]
        if kind == 1:
            out[i] = (out[i] + left) & 0xFF
        elif kind == 3:
            out[i] = (out[i] + ((left + up) >> 1)) & 0xFF
        elif kind == 4:
            corner = prev[i - bpp] if i >= bpp else 0
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            predictor = left if pa <= pb and pa <= pc else (up if pb <= pc else corner)
            out[i] = (out[i] + predictor) & 0xFF
        else:
            raise PngError(f"unknown PNG filter type {kind}")
    return bytes(out)


def decode(path: Path) -> Image:
    header, idat = _chunks(Path(path).read_bytes())
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour_type not in CHANNELS or interlace:
        raise PngError(f"unsupported PNG: depth {depth}, colour type {colour_type}, interlace {interlace}")
    bpp = CHANNELS[colour_type]
    stride = width * bpp
    raw = zlib.decompress(idat)
    if len(raw) != height * (stride + 1):
        raise PngError(f"PNG data is {len(raw)} bytes, expected {height * (stride + 1)}")
    rows, prev = [], bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        prev = _unfilter(raw[start], raw[start + 1 : start + 1 + stride], prev, bpp)
        rows.append(prev)
    return Image(width, height, bpp, rows)


def colour_stats(path: Path) -> ColourStats:
    image = decode(path)
    counts: Counter[bytes] = Counter()
    step = image.channels
    for row in image.rows:
        counts.update(row[i : i + step] for i in range(0, len(row), step))
    pixels = image.width * image.height
    return ColourStats(image.width, image.height, len(counts), counts.most_common(1)[0][1] / pixels)


def assert_not_blank(path: Path, min_colours: int = 16, max_dominant_share: float = 0.98) -> ColourStats:
    """A page with text on it: anti-aliased glyphs give many colours, and the
    background does not cover (nearly) everything."""
    stats = colour_stats(path)
    assert stats.colours >= min_colours and stats.dominant_share <= max_dominant_share, (
        f"{path.name} looks blank: {stats.colours} colours, background {stats.dominant_share:.1%} of the pixels"
    )
    return stats
