"""The broker's check of what nodes return (broker/results.py), without sockets."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

from broker.results import check_image, png_size
from tests.fakes import png_bytes


def encoded(fmt: str, size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format=fmt)
    return buf.getvalue()


def test_the_png_header_gives_the_size_pillow_reads() -> None:
    for size in [(16, 16), (1024, 768), (1, 4096)]:
        data = png_bytes(size=size)
        assert png_size(data) == size == Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize("data, declared, verdict", [
    (png_bytes(), "png", None),
    (png_bytes(size=(32, 16)), "png", "32x16 where 16x16 was declared"),
    (png_bytes()[:20], "png", "not an image"),  # cut inside the header
    (png_bytes()[:29] + b"\0\0\0\0" + png_bytes()[33:], "png", "not an image"),  # IHDR checksum broken
    (png_bytes()[:16] + struct.pack(">II", 0, 16) + png_bytes()[24:], "png", "not an image"),
    (b"<html>PNG</html>", "png", "not an image"),
    (encoded("JPEG"), "png", "a JPEG image where PNG was declared"),
    (png_bytes(), "jpeg", "a PNG image where JPEG was declared"),
    (encoded("WEBP"), "webp", None),
    (encoded("JPEG", (16, 8)), "jpeg", "16x8 where 16x16 was declared"),
    (png_bytes(), "gif", "unknown result format 'gif'"),
])
def test_a_result_is_the_declared_image_of_the_declared_size(data: bytes, declared: str, verdict: str | None) -> None:
    got = check_image(data, declared, 16, 16)
    if verdict is None:
        assert got is None
    else:
        assert got is not None and got.startswith(verdict), got
