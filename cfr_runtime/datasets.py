"""Readers for the released evaluation layouts and the `images/` + `masks/` copies in shared/data.

Every reader yields `Instance`s: one object to segment, loaded lazily as (uint8 RGB, int32 gt) where gt
is 1 = object, 0 = background, -1 = ignore. Mask encodings follow the RITM readers:
- "grabcut" (GrabCut, Berkeley): channel 0; 128 -> ignore, > 128 -> object.
- "anynonzero" (DAVIS, COCO_MVal): max over channels > 0 -> object.
- "voc" (PascalVOC): gray value 220 -> ignore, every other non-zero value one instance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import InputError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
ENCODINGS = ("grabcut", "anynonzero", "voc")


@dataclass(frozen=True)
class Instance:
    id: str
    image_path: Path
    mask_path: Path
    decode: Callable[[np.ndarray], np.ndarray]

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        return read_rgb(self.image_path), self.decode(_read_raw(self.mask_path))


def _decode(path: Path, what: str) -> np.ndarray:
    """BGR pixels of an image file, or an InputError. A JPEG without its end marker is refused: OpenCV
    decodes a truncated JPEG with only a warning on stderr, padding the missing rows with grey, and a
    scored run would silently measure the model on a damaged image."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-4096:]:
        raise InputError(f"{path}: truncated JPEG (no end-of-image marker); re-copy or re-download the {what}")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None  # = cv2.imread
    if bgr is None:
        raise InputError(f"{path}: not a readable {what}")
    return bgr


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(_decode(path, "image"), cv2.COLOR_BGR2RGB)


def _read_raw(path: Path) -> np.ndarray:
    return _decode(path, "mask")  # BGR, as RITM reads masks


def decode_grabcut(raw: np.ndarray) -> np.ndarray:
    ch0 = raw[..., 0].astype(np.int32) if raw.ndim == 3 else raw.astype(np.int32)
    gt = np.zeros(ch0.shape, np.int32)
    gt[ch0 > 128] = 1
    gt[ch0 == 128] = -1
    return gt


def decode_anynonzero(raw: np.ndarray) -> np.ndarray:
    m = raw.max(axis=2) if raw.ndim == 3 else raw
    return (m > 0).astype(np.int32)


def _decode_voc(value: int) -> Callable[[np.ndarray], np.ndarray]:
    def decode(raw: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(raw, cv2.COLOR_BGR2GRAY).astype(np.int32) if raw.ndim == 3 else raw.astype(np.int32)
        gt = (gray == value).astype(np.int32)
        gt[gray == 220] = -1
        return gt
    return decode


DECODERS = {"grabcut": decode_grabcut, "anynonzero": decode_anynonzero}


def _by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTS}


def _paired(images: Path, masks: Path, decode: Callable) -> list[Instance]:
    imgs = _by_stem(images)
    out = []
    for stem, mask in _by_stem(masks).items():
        image = imgs.get(stem)
        if image is None and stem[-1:].isalpha() and stem[:-1] in imgs:  # Berkeley '<id>a.png' -> '<id>.jpg'
            image = imgs[stem[:-1]]
        if image is None:
            raise InputError(f"{mask}: no image with stem {stem!r} in {images}")
        out.append(Instance(stem, image, mask, decode))
    return out


def guess_encoding(root: Path) -> str:
    name = root.name.lower()
    return "anynonzero" if ("davis" in name or "coco" in name) else "grabcut"


def open_dataset(root: str | Path, encoding: str | None = None) -> list[Instance]:
    """Instances of an evaluation set, from its released layout or the `images/` + `masks/` layout."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found")
    if encoding is not None and encoding not in DECODERS:
        raise InputError(f"unknown mask encoding {encoding!r}; choose one of {sorted(DECODERS)}")
    if (root / "JPEGImages").is_dir() and (root / "SegmentationObject").is_dir():
        return _pascal_voc(root)
    for images, masks in (("images", "masks"), ("data_GT", "boundary_GT"), ("img", "gt")):
        if (root / images).is_dir() and (root / masks).is_dir():
            enc = encoding or ("anynonzero" if images == "img" else
                               "grabcut" if images == "data_GT" else guess_encoding(root))
            return _paired(root / images, root / masks, DECODERS[enc])
    raise InputError(f"{root}: unknown dataset layout; expected images/+masks/, data_GT/+boundary_GT/, "
                     "img/+gt/ or JPEGImages/+SegmentationObject/")


def _pascal_voc(root: Path) -> list[Instance]:
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    names = split.read_text().split() if split.is_file() else sorted(p.stem for p in
                                                                     (root / "SegmentationObject").glob("*.png"))
    out = []
    for name in names:
        mask = root / "SegmentationObject" / f"{name}.png"
        raw = _read_raw(mask)
        gray = cv2.cvtColor(raw, cv2.COLOR_BGR2GRAY)
        for value in sorted(set(np.unique(gray).tolist()) - {0, 220}):
            out.append(Instance(f"{name}_{value}", root / "JPEGImages" / f"{name}.jpg", mask, _decode_voc(value)))
    return out


def iter_loaded(instances: list[Instance]) -> Iterator[tuple[Instance, np.ndarray, np.ndarray]]:
    for inst in instances:
        image, gt = inst.load()
        if image.shape[:2] != gt.shape:
            raise InputError(f"{inst.id}: image {image.shape[:2]} and mask {gt.shape} differ in size")
        yield inst, image, gt
