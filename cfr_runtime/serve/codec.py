"""Bytes in and out of the service: uploads checked before they are decoded, masks as PNG, COCO RLE or polygon.

Uploads are refused on their header: the format (JPEG/PNG) and the pixel count are read by PIL without
decoding the pixels, so a 20 kB "decompression bomb" that claims 100k x 100k pixels costs nothing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import CfrError, InputError

FORMATS = ("png", "rle")
UPLOAD_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png"}


def http_error(cls: type[CfrError], status: int, message: str) -> CfrError:
    """A project error that carries the HTTP status the service answers it with."""
    exc = cls(message)
    exc.http_status = status  # type: ignore[attr-defined]
    return exc


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 12_000


def decode_upload(data: bytes, limits: UploadLimits) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 H x W x 3 RGB (EXIF orientation applied, as browsers show it).

    Raises InputError with status 413 (too many bytes or pixels), 415 (not JPEG/PNG) or 400 (corrupt).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise http_error(InputError, 413, f"upload is {len(data)} bytes; the limit is {limits.max_bytes}")
    if not data:
        raise http_error(InputError, 400, "empty upload; send the JPEG or PNG file as the request body")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise http_error(InputError, 415, "the upload is not a JPEG or PNG image") from None
    except Image.DecompressionBombError as exc:  # PIL's own header check fires first for absurd sizes
        raise http_error(InputError, 413, f"image is too large: {exc}") from None
    if img.format not in UPLOAD_FORMATS:
        raise http_error(InputError, 415, f"the upload is {img.format}; send JPEG or PNG")
    w, h = img.size
    if w < 1 or h < 1 or w * h > limits.max_pixels or max(w, h) > limits.max_side:
        raise http_error(InputError, 413, f"image is {w}x{h}; the limit is {limits.max_pixels} pixels and "
                                          f"{limits.max_side} px per side")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise http_error(InputError, 400, f"the {img.format} upload is corrupt or truncated ({exc})") from None
    return np.ascontiguousarray(rgb)


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (before any decoding)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise http_error(InputError, 413, f"request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise http_error(InputError, 413, f"request body passes the limit of {limit} bytes")
    return bytes(body)


def mask_png(mask: np.ndarray) -> bytes:
    """A 1-bit grayscale PNG (white = object): 4x faster to write than 8-bit, and read back as 0/255 by
    OpenCV (bool by PIL)."""
    ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255,
                           [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_BILEVEL, 1])
    if not ok:  # pragma: no cover - OpenCV fails only on unsupported arrays
        raise InputError("could not encode the mask as PNG")
    return buf.tobytes()


def mask_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE: column-major run lengths, starting with a (possibly empty) run of zeros."""
    h, w = mask.shape
    flat = np.asarray(mask, bool).ravel(order="F")
    if flat.size == 0:
        return {"size": [h, w], "counts": []}
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], edges, [flat.size])))
    if flat[0]:
        counts = np.concatenate(([0], counts))
    return {"size": [h, w], "counts": counts.tolist()}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Inverse of `mask_rle` (used by clients and tests)."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    values = np.arange(counts.size) % 2 == 1
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise InputError(f"RLE counts sum to {flat.size}, expected {h * w}")
    return flat.reshape((w, h)).T.copy()


def mask_polygon(mask: np.ndarray, epsilon: float = 1.0) -> list[list[int]]:
    """Outline of the largest connected region as [[x, y], ...] (empty when the mask is empty)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    largest = max(contours, key=cv2.contourArea)
    poly = cv2.approxPolyDP(largest, epsilon, True).reshape(-1, 2)
    return poly.astype(int).tolist()
