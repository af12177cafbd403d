"""tests/support/png.py, the screenshot checker: it must decode every PNG row
filter exactly (a wrong decode could call a blank page rendered) and tell a
blank image from a busy one."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pytest

from tests.support import png


def paeth(left: int, up: int, corner: int) -> int:
    p = left + up - corner
    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
    return left if pa <= pb and pa <= pc else (up if pb <= pc else corner)


def filtered(kind: int, row: bytes, prev: bytes, bpp: int) -> bytes:
    """The encoder's side of a PNG filter (the decoder under test does the inverse)."""
    out = bytearray()
    for i, value in enumerate(row):
        left = row[i - bpp] if i >= bpp else 0
        corner = prev[i - bpp] if i >= bpp else 0
        predictor = (0, left, prev[i], (left + prev[i]) >> 1, paeth(left, prev[i], corner))[kind]
        out.append((value - predictor) & 0xFF)
    return bytes(out)


def write_png(path: Path, rows: list[bytes], width: int, colour_type: int) -> Path:
    bpp = png.CHANNELS[colour_type]
    data, prev = bytearray(), bytes(width * bpp)
    for y, row in enumerate(rows):
        kind = y % 5  # every filter type, in turn
        data += bytes([kind]) + filtered(kind, row, prev, bpp)
        prev = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, len(rows), 8, colour_type, 0, 0, 0)
    path.write_bytes(png.SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(data)))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("colour_type", [2, 6])
def test_every_filter_decodes_exactly(tmp_path, colour_type):
    rng = random.Random(colour_type)
    width = 61
    rows = [bytes(rng.randrange(256) for _ in range(width * png.CHANNELS[colour_type])) for _ in range(40)]
    image = png.decode(write_png(tmp_path / "random.png", rows, width, colour_type))
    assert (image.width, image.height) == (width, 40)
    assert image.rows == rows


def test_blank_and_busy_images(tmp_path):
    white = [b"\xff" * 3 * 40] * 30
    blank = write_png(tmp_path / "blank.png", white, 40, 2)
    assert png.colour_stats(blank) == png.ColourStats(40, 30, 1, 1.0)
    with pytest.raises(AssertionError, match="looks blank"):
        png.assert_not_blank(blank)

    # white with a band of grey shades across a third of it: "text" on a page
    rows = [bytes(v for x in range(40) for v in ((x * 6,) * 3 if 10 <= y < 20 else (255,) * 3)) for y in range(30)]
    stats = png.assert_not_blank(write_png(tmp_path / "busy.png", rows, 40, 2))
    assert stats.colours == 41 and stats.dominant_share == pytest.approx(2 / 3)


def test_not_a_png(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("<html></html>")
    with pytest.raises(png.PngError, match="not a PNG"):
        png.decode(path)
