"""Input images: data URIs or base64 in JSON, files in multipart; checked before queueing.

Only bytes sent in the request are ever read: a string that is not base64 is an
error, never a server path. Images over the byte limit get 413; only PNG, JPEG
and WebP are accepted; the pixel count is bounded before decoding (no bombs).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image

from http_front.errors import ApiError

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.-]+)*);base64,(?P<data>.*)$", re.S)


def from_base64(value: object, field: str) -> bytes:
    """Bytes of a data URI or bare base64 string."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"invalid {field}", f"{field} must be a data URI or base64 string")
    match = _DATA_URI.match(value.strip())
    data = match.group("data") if match else value.strip()
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ApiError(413, f"{field} is too large", f"{field} exceeds {MAX_IMAGE_BYTES // (1024 * 1024)} MB")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"invalid {field}",
                       f"{field} is not valid base64 (file paths are not accepted)") from None


def inspect(data: bytes, field: str) -> tuple[int, int]:
    """Check size, format and pixel count; returns (width, height). Decodes fully to catch truncation."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ApiError(413, f"{field} is too large", f"{field} exceeds {MAX_IMAGE_BYTES // (1024 * 1024)} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
            if image.width * image.height > MAX_PIXELS:
                raise ApiError(400, f"{field} has too many pixels",
                               f"{field} is {image.width}x{image.height}; at most {MAX_PIXELS} pixels")
            image.load()
    except ApiError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ApiError(400, f"invalid {field}",
                       f"{field} is not a PNG, JPEG or WebP image ({type(exc).__name__})") from None
    return image.width, image.height
