"""Training sources behind one interface: `len(src)` and `src.get(i) -> Sample` (image, objects, ignore).

Readers: the `images/` + `masks/` folder (binary or instance-id masks), YOLO-seg polygon labels,
COCO-style instance JSON (polygons and RLE), SBD (`inst/*.mat`), the released evaluation layouts (for
validation) and synthetic scenes.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cfr_runtime.datasets import IMAGE_EXTS, open_dataset, read_rgb
from cfr_runtime.errors import InputError

from .synthetic import synthetic_scene


@dataclass
class Sample:
    image: np.ndarray  # uint8 H x W x 3 RGB
    objects: list[np.ndarray]  # bool H x W each
    ignore: np.ndarray | None = None  # bool H x W, pixels neither object nor background
    id: str = ""
    meta: dict = field(default_factory=dict)


class Source(ABC):
    """A training source; `get` drops objects smaller than `min_area` pixels."""

    min_area: int = 0

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> Sample: ...

    def get(self, index: int) -> Sample:
        s = self.load(index)
        s.objects = [m for m in s.objects if m.sum() >= self.min_area]
        return s


def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTS}


class FolderSource(Source):
    """`images/` + `masks/`; mask_mode 'binary' (> 127 is object), 'instances' (each id > 0), or 'auto'."""

    def __init__(self, root: str | Path, mask_mode: str = "auto", min_area: int = 0):
        root = Path(root)
        if not (root / "images").is_dir() or not (root / "masks").is_dir():
            raise InputError(f"{root}: expected images/ and masks/ folders")
        imgs, masks = _images(root / "images"), _images(root / "masks")
        self.pairs = [(s, imgs[s], masks[s]) for s in masks if s in imgs]
        if not self.pairs:
            raise InputError(f"{root}: no image/mask pairs with matching names")
        self.mask_mode, self.min_area = mask_mode, min_area

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> Sample:
        stem, img_path, mask_path = self.pairs[index]
        raw = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise InputError(f"{mask_path}: unreadable mask")
        if raw.ndim == 3:
            raw = raw.max(axis=2)
        mode = self.mask_mode
        if mode == "auto":
            values = np.unique(raw)
            mode = "binary" if set(values.tolist()) <= {0, 1, 255} else "instances"
        if mode == "binary":
            objects = [raw > (127 if raw.max() > 1 else 0)]
        else:
            objects = [raw == v for v in np.unique(raw) if v != 0]
        return Sample(read_rgb(img_path), objects, None, stem)


def polygon_mask(h: int, w: int, coords: list[float], normalised: bool) -> np.ndarray:
    pts = np.asarray(coords, np.float64).reshape(-1, 2)
    if normalised:
        pts = pts * [w, h]
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


class YoloSegSource(Source):
    """Ultralytics YOLO-seg: `images/` + `labels/*.txt`, one `class x1 y1 ... xn yn` polygon per line."""

    def __init__(self, root: str | Path, min_area: int = 1000):
        root = Path(root)
        imgs = _images(root / "images")
        labels = {p.stem: p for p in (root / "labels").glob("*.txt")}
        self.items = [(s, imgs[s], labels[s]) for s in sorted(labels) if s in imgs]
        if not self.items:
            raise InputError(f"{root}: no images/ with labels/*.txt")
        self.min_area = min_area

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Sample:
        stem, img_path, label_path = self.items[index]
        image = read_rgb(img_path)
        h, w = image.shape[:2]
        objects = []
        for line in label_path.read_text().splitlines():
            vals = line.split()
            if len(vals) >= 7:
                objects.append(polygon_mask(h, w, [float(v) for v in vals[1:]], normalised=True))
        return Sample(image, objects, None, stem)


def rle_counts(encoded: str) -> list[int]:
    """Decode COCO's compressed RLE string (the pycocotools LEB128-like scheme) into run lengths."""
    counts: list[int] = []
    p = 0
    while p < len(encoded):
        x, k, more = 0, 0, True
        while more:
            c = ord(encoded[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = rle_counts(counts)
    flat = np.zeros(h * w, bool)
    pos, val = 0, False
    for c in counts:
        flat[pos:pos + c] = val
        pos += c
        val = not val
    return flat.reshape(w, h).T  # COCO RLE is column-major


class CocoSource(Source):
    """COCO-style instance JSON (polygons, uncompressed or compressed RLE); `iscrowd` regions are ignored."""

    def __init__(self, annotations: str | Path, images_dir: str | Path, min_area: int = 1000):
        data = json.loads(Path(annotations).read_text())
        self.images_dir = Path(images_dir)
        self.images = {im["id"]: im for im in data["images"]}
        self.anns: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            self.anns.setdefault(a["image_id"], []).append(a)
        self.ids = [i for i in self.images if i in self.anns]
        self.min_area = min_area

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Sample:
        info = self.images[self.ids[index]]
        image = read_rgb(self.images_dir / info["file_name"])
        h, w = image.shape[:2]
        objects, ignore = [], np.zeros((h, w), bool)
        for a in self.anns[info["id"]]:
            seg = a["segmentation"]
            if isinstance(seg, list):
                m = np.zeros((h, w), bool)
                for poly in seg:
                    m |= polygon_mask(h, w, poly, normalised=False)
            else:
                m = rle_decode(seg)
            if a.get("iscrowd"):
                ignore |= m
            else:
                objects.append(m)
        return Sample(image, objects, ignore if ignore.any() else None, str(info["id"]))


class SBDSource(Source):
    """SBD: `img/*.jpg`, `inst/*.mat` (GTinst.Segmentation: instance ids, 255 = boundary ignore), split file."""

    def __init__(self, root: str | Path, split: str = "train", min_area: int = 0):
        self.root = Path(root)
        self.names = (self.root / f"{split}.txt").read_text().split()
        self.min_area = min_area

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> Sample:
        from scipy.io import loadmat

        name = self.names[index]
        inst = loadmat(str(self.root / "inst" / f"{name}.mat"))["GTinst"][0][0][0].astype(np.int32)
        objects = [inst == v for v in np.unique(inst) if v not in (0, 255)]
        ignore = inst == 255
        return Sample(read_rgb(self.root / "img" / f"{name}.jpg"), objects, ignore if ignore.any() else None, name)


class EvalSource(Source):
    """A released evaluation set (one object per instance, -1 -> ignore); for validation, never training."""

    def __init__(self, root: str | Path):
        self.instances = open_dataset(root)

    def __len__(self) -> int:
        return len(self.instances)

    def load(self, index: int) -> Sample:
        image, gt = self.instances[index].load()
        return Sample(image, [gt == 1], gt == -1, self.instances[index].id)


class SyntheticSource(Source):
    def __init__(self, n: int = 64, size: int = 256, seed: int = 0):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> Sample:
        image, masks = synthetic_scene(np.random.default_rng(self.seed * 100003 + index), self.size, self.size)
        return Sample(image, masks, None, f"synthetic{index}")


def check_source(spec: str) -> tuple[str, str]:
    """Split `KIND:PATH` and check what can be checked without reading the data: the paths exist, synthetic:N
    has a positive N. Returns (kind or "" when it is to be guessed, rest). Cheap, so a command line can refuse
    a mistyped --data before building a model or creating a run folder."""
    kind, _, rest = spec.partition(":") if ":" in spec and spec.split(":")[0] in _KINDS else ("", "", spec)
    if kind == "synthetic":
        if rest and not (rest.isdigit() and int(rest) > 0):
            raise InputError(f"{spec}: synthetic:N takes a positive number of scenes, got {rest!r}")
        return kind, rest
    paths = rest.split(":", 1) if kind == "coco" else [rest]
    if kind == "coco" and len(paths) != 2:
        raise InputError(f"{spec}: coco takes coco:ANNOTATIONS.json:IMAGES_DIR")
    for path in paths:
        if not path or not Path(path).exists():
            raise InputError(f"{spec}: no such path {path!r}" if path != spec else f"{spec}: no such path")
    return kind, rest


def open_source(spec: str) -> Source:
    """`KIND:PATH` or a bare PATH (kind guessed). Kinds: folder, yolo, coco (JSON:IMAGES), sbd, eval, synthetic:N."""
    kind, rest = check_source(spec)
    if kind == "synthetic":
        return SyntheticSource(int(rest or 64))
    path = Path(rest)
    if not kind:
        if (path / "labels").is_dir():
            kind = "yolo"
        elif (path / "inst").is_dir():
            kind = "sbd"
        elif (path / "images").is_dir() and (path / "masks").is_dir():
            kind = "folder"
        else:
            raise InputError(f"{spec}: cannot tell the dataset kind; prefix it with one of {sorted(_KINDS)}:")
    if kind == "folder":
        return FolderSource(path)
    if kind == "yolo":
        return YoloSegSource(path)
    if kind == "sbd":
        return SBDSource(path)
    if kind == "eval":
        return EvalSource(path)
    if kind == "coco":
        ann, _, images = rest.partition(":")
        return CocoSource(ann, images)
    raise InputError(f"unknown dataset kind {kind!r}")


_KINDS = {"folder", "yolo", "coco", "sbd", "eval", "synthetic"}
