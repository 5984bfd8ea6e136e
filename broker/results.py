"""Checks on what nodes return: a result must be an image of the format it claims.

Nodes are trusted to compute, not to be honest about bytes: a process that reached
the backend socket could return HTML as "image/png". Only the header is parsed
(Pillow reads the signature and the size chunk), so the check costs microseconds.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

# Output format names (as in task metadata) -> Pillow's format names.
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's signature and IHDR chunk (its CRC checked); None if it is not one.

    What Pillow's PNG open reads, without its per-call cost (a twentieth of the broker's time
    per task at high rates).
    """
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        return None
    width, height = struct.unpack(">II", data[16:24])
    return (width, height) if width and height else None


def check_image(data: bytes, declared: str, width: int | None = None, height: int | None = None) -> str | None:
    """None if `data` is an image of the declared format (and size, when given); else why not."""
    expected = FORMATS.get(declared)
    if expected is None:
        return f"unknown result format {declared!r}"
    size = png_size(data) if declared == "png" else None
    if size is not None:
        found = "PNG"
    else:
        try:
            with Image.open(io.BytesIO(data)) as image:
                found, size = image.format, image.size
        except Exception as exc:  # noqa: BLE001  (a hostile node's bytes: any failure means "not an image")
            return f"not an image ({type(exc).__name__})"
    if found != expected:
        return f"a {found} image where {expected} was declared"
    if width and height and size != (width, height):
        return f"{size[0]}x{size[1]} where {width}x{height} was declared"
    return None
