"""Bytes in and out of the service: uploads checked before they are decoded, masks as PNG, COCO RLE or polygon.

Uploads are judged on their header first (`probe_upload`): the format, the pixel count and, where the format
allows a bound, whether the file holds enough data for the pixels it claims. PIL reads the header without
decoding the pixels, so a 20 kB "decompression bomb" that claims 100k x 100k pixels costs nothing, and the
service can reserve the memory a frame will need (`ImageHeader.pixels`) before it decodes it.

Formats: JPEG, PNG, BMP, TIFF, WebP and MPO (the JPEG-based format many cameras and phones write; its first,
primary image is used, as for multi-page TIFF and animated WebP). What the model sees is what a person sees:
EXIF orientation is applied (as browsers do), 16-bit grayscale is scaled to 8 bits (not clipped), and
transparent pixels are composited over a background colour, by default the one the cfr-serve page shows
under a transparent image (its body background, #1e1f22).

Data that cannot cover its claim: a PNG whose IDAT data is smaller than the claimed pixels deflated at
deflate's best ratio (1032:1), a Huffman-coded JPEG (or MPO) with fewer bytes than one bit per 8 x 8 block,
and an uncompressed BMP shorter than its pixel rows are refused before decoding. Formats whose coding has
no useful lower bound (RLE BMP, TIFF's LZW/fax codings, WebP, arithmetic-coded JPEG) are bounded instead:
the memory for the claimed size is reserved before decoding and decodes run a few at a time.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ..errors import CfrError, InputError, SessionNotFoundError, StateError

FORMATS = ("png", "rle")
UPLOAD_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "MPO")
PAGE_BACKGROUND = (0x1E, 0x1F, 0x22)  # style.css body background: what the page shows under transparency
DEFLATE_MAX_RATIO = 1032  # deflate cannot compress better than this (258-byte matches at >= 2 bits each)
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel
ORIENTATION = 0x0112  # the EXIF (and TIFF) orientation tag
B64_CHUNK = 1 << 20  # characters decoded per call: base64 decoding holds the GIL, so /health waits that long


def http_error(cls: type[CfrError], status: int, message: str) -> CfrError:
    """A project error that carries the HTTP status the service answers it with."""
    exc = cls(message)
    exc.http_status = status  # type: ignore[attr-defined]
    return exc


def status_of(exc: CfrError) -> int:
    """The HTTP status a project error is answered with: its own, else 404 / 409 / 400 by kind."""
    explicit = getattr(exc, "http_status", None)
    if explicit:
        return explicit
    if isinstance(exc, SessionNotFoundError):
        return 404
    if isinstance(exc, StateError):
        return 409
    return 400


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 12_000


@dataclass(frozen=True)
class ImageHeader:
    """What an upload claims, read from its header without decoding a pixel."""

    format: str
    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _open(data: bytes, limits: UploadLimits):
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise http_error(InputError, 413, f"upload is {len(data)} bytes; the limit is {limits.max_bytes}")
    if not data:
        raise http_error(InputError, 400, "empty upload; send the image file as the request body")
    accepted = ", ".join(UPLOAD_FORMATS)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise http_error(InputError, 415, f"the upload is not an image in a known format ({accepted})") from None
    except Image.DecompressionBombError as exc:  # PIL's own header check fires first for absurd sizes
        raise http_error(InputError, 413, f"image is too large: {exc}") from None
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as exc:
        raise http_error(InputError, 400, f"the upload's header is corrupt ({exc})") from None
    if img.format not in UPLOAD_FORMATS:
        raise http_error(InputError, 415, f"the upload is {img.format}; send {accepted}")
    return img


def probe_upload(data: bytes, limits: UploadLimits) -> ImageHeader:
    """Format, size and mode of an upload from its header, after every check that needs no decoding.

    Raises InputError with status 413 (too many bytes or pixels), 415 (not an accepted format) or 400 (corrupt,
    or too little data for the pixels it claims).
    """
    img = _open(data, limits)
    header = ImageHeader(img.format, *img.size, img.mode)
    check_size(header, limits)
    check_density(data, header)
    return header


def check_size(header: ImageHeader, limits: UploadLimits) -> None:
    w, h = header.width, header.height
    if w < 1 or h < 1 or w * h > limits.max_pixels or max(w, h) > limits.max_side:
        raise http_error(InputError, 413, f"image is {w}x{h}; the limit is {limits.max_pixels} pixels and "
                                          f"{limits.max_side} px per side")


def check_density(data: bytes, header: ImageHeader) -> None:
    """Refuse a file too small to hold the pixels its header claims, where the format gives a lower bound."""
    bound = {"PNG": _png_min_bytes, "JPEG": _jpeg_min_bytes, "MPO": _jpeg_min_bytes,
             "BMP": _bmp_min_bytes}.get(header.format)
    need, have = bound(data, header) if bound else (0, 0)
    if have < need:
        raise http_error(InputError, 400, (
            f"the {header.format} claims {header.width}x{header.height} pixels but holds {have} bytes of image "
            f"data, fewer than the {need} such a frame needs at the least: the file is truncated, corrupt or a "
            "decompression bomb"))


def _png_min_bytes(data: bytes, header: ImageHeader) -> tuple[int, int]:
    """(the least IDAT bytes the IHDR's pixels can deflate to, the IDAT bytes present)."""
    if len(data) < 33:
        return 1, 0
    depth, colour = data[24], data[25]
    bits = depth * PNG_CHANNELS.get(colour, 1)
    raw = header.height * (1 + (header.width * bits + 7) // 8)  # one filter byte per row
    idat, pos = 0, 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += min(length, len(data) - pos - 8)
        elif kind == b"IEND":
            break
        pos += 12 + length
    return raw // DEFLATE_MAX_RATIO, idat


def _jpeg_min_bytes(data: bytes, header: ImageHeader) -> tuple[int, int]:
    """(one bit per 8 x 8 luma block, the bytes present): every Huffman-coded scan that carries DC codes at
    least one bit per block. Arithmetic-coded JPEGs (SOF9-SOF15) have no such bound: (0, len)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if 0xC9 <= marker <= 0xCF and marker != 0xCC:
            return 0, len(data)
        if 0xC0 <= marker <= 0xC3 or marker == 0xDA:
            break
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    blocks = -(-header.width // 8) * -(-header.height // 8)
    return blocks // 8, len(data)


def _bmp_min_bytes(data: bytes, header: ImageHeader) -> tuple[int, int]:
    """(pixel offset + rows, the bytes present) for uncompressed BMPs; RLE and embedded JPEG/PNG: (0, len)."""
    if len(data) < 34:
        return 1, 0
    offset = struct.unpack("<I", data[10:14])[0]
    bpp = struct.unpack("<H", data[28:30])[0]
    compression = struct.unpack("<I", data[30:34])[0] if struct.unpack("<I", data[14:18])[0] >= 40 else 0
    if compression not in (0, 3, 6):  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS
        return 0, len(data)
    stride = (header.width * bpp + 31) // 32 * 4
    return offset + stride * header.height, len(data)


def decode_upload(data: bytes, limits: UploadLimits, background: tuple[int, int, int] = PAGE_BACKGROUND,
                  header: ImageHeader | None = None) -> np.ndarray:
    """Image bytes -> uint8 H x W x 3 RGB as a person sees it (see the module docstring), after `probe_upload`'s
    checks (pass its `header` to skip them). Raises InputError (413, 415 or 400)."""
    from PIL import ImageOps

    if header is None:
        header = probe_upload(data, limits)
    img = _open(data, limits)
    try:
        img.load()
        if img.getexif().get(ORIENTATION, 1) not in (None, 1):  # exif_transpose copies even when upright
            img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img, background)
    except CfrError:  # to_rgb's own refusal (a ValueError too) keeps its status and words
        raise
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as exc:
        raise http_error(InputError, 400, f"the {header.format} upload is corrupt or truncated ({exc})") from None
    if rgb.shape[:2] != (header.height, header.width) and rgb.shape[:2] != (header.width, header.height):
        raise http_error(InputError, 400, f"the {header.format} decoded to {rgb.shape[1]}x{rgb.shape[0]}, not the "
                                          f"{header.width}x{header.height} its header claims")
    return np.ascontiguousarray(rgb)


def to_rgb(img, background: tuple[int, int, int] = PAGE_BACKGROUND) -> np.ndarray:
    """A decoded PIL image -> uint8 RGB: 16-bit grayscale scaled by 255/65535 (PIL's convert would clip it to
    255), transparency composited over `background`, 32-bit float refused (no range to scale it by)."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I"):  # I;16, I;16B, I;16L (16-bit) and I (32-bit int: read as 16-bit, clipped)
        a = np.asarray(img)
        gray = ((np.clip(a, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        key = img.info.get("transparency")
        if isinstance(key, int):  # a 16-bit grayscale PNG's tRNS: the pixels of that (16-bit) value are transparent
            rgb[a == key] = background
        return rgb
    if mode == "F":
        raise http_error(InputError, 415, "32-bit floating-point images are not accepted; save it as 8 or 16 bit")
    if mode == "La":  # gray + premultiplied alpha (TIFF): PIL converts it to LA and to nothing else
        img, mode = img.convert("LA"), "LA"
    if mode in ("RGBA", "LA", "PA", "RGBa") or (mode in ("1", "L", "P", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return np.asarray(Image.alpha_composite(base, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB") if mode != "RGB" else img)


def parse_json(raw: bytes, what: str) -> Any:
    """JSON from request bytes; InputError 400 for bytes that are not JSON or nest too deeply to parse."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise http_error(InputError, 400, f"the {what} nests too deeply to be parsed") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise http_error(InputError, 400, f"the {what} is not JSON ({exc})") from None


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


def b64decode(text: str) -> bytes:
    """Strict base64 (as `base64.b64decode(validate=True)`), decoded a megabyte of text at a time so the worker
    lets the event loop run between pieces (a 27 MB frame in one call holds the GIL for tens of ms)."""
    import base64
    import binascii

    if len(text) % 4 or "=" in text[:-2]:
        raise binascii.Error("incorrect length or padding")
    return b"".join(base64.b64decode(text[i:i + B64_CHUNK], validate=True) for i in range(0, len(text), B64_CHUNK))


class EncodedImage:
    """An uploaded image as `SessionStore.replay` wants it: the header (for the memory reservation) before the
    pixels, each computed once. `data` may be the file's bytes or its base64 text (CVAT's `image`)."""

    def __init__(self, data: bytes | str, limits: UploadLimits, background: tuple[int, int, int] = PAGE_BACKGROUND,
                 what: str = "image"):
        self._data, self.limits, self.background, self.what = data, limits, background, what
        self._blob: bytes | None = None
        self._header: ImageHeader | None = None

    @property
    def blob(self) -> bytes:
        if self._blob is None:
            data = self._data
            if isinstance(data, str):
                import binascii

                if len(data) > self.limits.max_bytes * 4 // 3 + 4:
                    raise http_error(InputError, 413, f"the {self.what} is {len(data)} base64 characters; the "
                                                      f"limit is {self.limits.max_bytes} bytes decoded")
                try:
                    data = b64decode(data)
                except (binascii.Error, ValueError):
                    raise http_error(InputError, 400, f"the {self.what} is not valid base64") from None
            self._blob = data
        return self._blob

    def header(self) -> ImageHeader:
        if self._header is None:
            self._header = probe_upload(self.blob, self.limits)
        return self._header

    def __call__(self) -> np.ndarray:
        return decode_upload(self.blob, self.limits, self.background, self.header())
