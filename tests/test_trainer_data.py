"""Training data: readers, SUEM modes, click simulation, augmentation."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from trainer.data import suem
from trainer.data.augment import augment, train_augmentator
from trainer.data.clicks import add_error_clicks, initial_points
from trainer.data.dataset import TrainSet
from trainer.data.sources import (
    CocoSource,
    EvalSource,
    FolderSource,
    SBDSource,
    SyntheticSource,
    YoloSegSource,
    open_source,
    rle_decode,
)


def _square(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_suem_modes_do_what_the_paper_says():
    h = w = 20
    img = np.full((h, w, 3), 10, np.uint8)
    other = np.full((h, w, 3), 200, np.uint8)
    src = _square(h, w, 2, 12, 2, 12)
    obj = _square(h, w, 8, 16, 8, 16)
    # simple: the source object on another image; target is the source object
    image, target = suem.simple(img, src, other, alpha=1.0)
    assert np.array_equal(target, src) and (image[src] == 10).all() and (image[~src] == 200).all()
    # exclusion: the pasted object is removed from the target and shows in the image
    image, target = suem.exclusion(img, src, other, obj)
    assert np.array_equal(target, src & ~obj) and (image[obj] == 200).all() and (image[~obj] == 10).all()
    # union: the pasted object is added to the target
    image, target = suem.union(img, src, other, obj)
    assert np.array_equal(target, src | obj) and (image[obj] == 200).all()
    # mixing: blended pixels, target unchanged
    image, target = suem.object_mixing(img, src, other, obj, alpha=0.5)
    assert np.array_equal(target, src) and (image[obj] == 105).all() and (image[~obj] == 10).all()
    image, target = suem.image_mixing(img, src, other, alpha=0.75)
    assert np.array_equal(target, src) and (np.abs(image.astype(int) - 57) <= 1).all()


def test_suem_wrapper_probabilities():
    rng = np.random.default_rng(0)
    draws = SyntheticSource(8, 64)
    sample = draws.get(0)
    off = suem.Suem(suem.SuemConfig.off(), lambda: draws.get(1))
    image, target, _, modes = off(sample, sample.objects[0], rng)
    assert modes == [] and np.array_equal(image, sample.image)
    always = suem.Suem(suem.SuemConfig(1.0, 1.0, (0.0, 1.0, 0.0), 1.0), lambda: draws.get(2))
    _, _, _, modes = always(sample, sample.objects[0], rng)
    assert modes == ["simple", "union", "image_mixing"]


def _rle_encode(mask):
    flat = mask.T.ravel()
    counts, val, run = [], False, 0
    for v in flat:
        if v == val:
            run += 1
        else:
            counts.append(run)
            val, run = v, 1
    counts.append(run)
    return counts


def _compress(counts):
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_coco_polygons_rle_and_crowd(tmp_path):
    img = np.zeros((30, 40, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "a.jpg"), img)
    m = _square(30, 40, 5, 15, 20, 35)
    ann = {"images": [{"id": 1, "file_name": "a.jpg", "height": 30, "width": 40}],
           "annotations": [
               {"image_id": 1, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]], "iscrowd": 0},
               {"image_id": 1, "segmentation": {"size": [30, 40], "counts": _compress(_rle_encode(m))}, "iscrowd": 0},
               {"image_id": 1, "segmentation": {"size": [30, 40], "counts": _rle_encode(_square(30, 40, 20, 25, 0, 5))},
                "iscrowd": 1}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    s = CocoSource(tmp_path / "ann.json", tmp_path, min_area=0).get(0)
    assert len(s.objects) == 2 and np.array_equal(s.objects[1], m)
    assert s.objects[0][5, 5] and not s.objects[0][20, 20]
    assert s.ignore.sum() == 25
    assert np.array_equal(rle_decode({"size": [30, 40], "counts": _rle_encode(m)}), m)


def test_yolo_folder_sbd_eval_synthetic(tmp_path, data_dir):
    coco = YoloSegSource(data_dir / "train" / "COCO128-seg")
    assert len(coco) == 126 and all(o.sum() >= 1000 for o in coco.get(0).objects)
    ecssd = FolderSource(data_dir / "train" / "ECSSD")
    assert len(ecssd) == 926 and len(ecssd.get(0).objects) == 1
    inst = FolderSource(data_dir / "train" / "COCO128-seg")
    assert len(inst.get(0).objects) >= 1  # instance-id masks, one object per id
    from scipy.io import savemat

    (tmp_path / "sbd" / "img").mkdir(parents=True)
    (tmp_path / "sbd" / "inst").mkdir()
    cv2.imwrite(str(tmp_path / "sbd" / "img" / "x.jpg"), np.zeros((10, 12, 3), np.uint8))
    seg = np.zeros((10, 12), np.uint8)
    seg[1:4, 1:4], seg[6:9, 6:9], seg[5, :] = 1, 2, 255
    savemat(str(tmp_path / "sbd" / "inst" / "x.mat"),
            {"GTinst": {"Segmentation": seg, "Boundaries": np.zeros(1), "Categories": np.array([1, 2])}})
    (tmp_path / "sbd" / "train.txt").write_text("x\n")
    s = SBDSource(tmp_path / "sbd").get(0)
    assert [int(o.sum()) for o in s.objects] == [9, 9] and s.ignore.sum() == 12
    assert isinstance(open_source(str(tmp_path / "sbd")), SBDSource)
    ev = EvalSource(data_dir / "GrabCut").get(0)
    assert ev.ignore is not None and len(ev.objects) == 1
    assert len(open_source("synthetic:5")) == 5


def test_augmentation_crops_and_keeps_masks_aligned():
    s = SyntheticSource(2, 300).get(0)
    aug = train_augmentator(128)
    aug.set_random_seed(0)
    out = augment(s, aug)
    assert out.image.shape == (128, 128, 3) and all(m.shape == (128, 128) for m in out.objects)
    s.ignore = s.objects[0].copy()
    out = augment(s, aug)
    assert out.ignore is not None and out.ignore.shape == (128, 128)


def test_initial_points_layout():
    rng = np.random.default_rng(0)
    target = _square(64, 64, 20, 40, 20, 40)
    for _ in range(20):
        pts = initial_points(target, None, 6, rng)
        pos, neg = pts[:6], pts[6:]
        valid_pos = pos[pos[:, 2] >= 0]
        assert len(valid_pos) >= 1 and valid_pos[0, 2] == 0
        assert all(target[int(y), int(x)] for y, x, _ in valid_pos)
        assert all(not target[int(y), int(x)] for y, x, o in neg if o >= 0)
        orders = pts[pts[:, 2] >= 0, 2]
        assert sorted(orders.tolist()) == list(range(len(orders)))


def test_error_clicks_go_to_the_larger_error():
    gt = np.zeros((1, 40, 40), np.float32)
    gt[0, 5:35, 5:35] = 1
    probs = np.zeros((1, 40, 40), np.float32)  # everything missed: a positive click inside
    pts = np.full((1, 8, 3), -1, np.float32)
    pts[0, 0] = (20, 20, 0)
    out = add_error_clicks(probs, gt, pts, np.random.default_rng(0))
    y, x, o = out[0, 1]
    assert o == 1 and gt[0, int(y), int(x)] == 1 and 10 <= y <= 30
    probs[:] = 1  # everything foreground: a negative click in the background
    out = add_error_clicks(probs, gt, pts, np.random.default_rng(0))
    y, x, o = out[0, 4]
    assert o == 1 and gt[0, int(y), int(x)] == 0


def test_trainset_is_reproducible(data_dir):
    ds = TrainSet([FolderSource(data_dir / "train" / "ECSSD")], 96, max_points=6, seed=3)
    ds.reseed(5)
    a = ds.batch(2)
    ds.reseed(5)
    b = ds.batch(2)
    for k in a:
        assert np.array_equal(a[k], b[k])
    assert a["image"].shape == (2, 3, 96, 96) and a["points"].shape == (2, 12, 3)
    assert set(np.unique(a["target"])) <= {-1.0, 0.0, 1.0}


def test_no_sample_error():
    with pytest.raises(ValueError, match="no training samples"):
        TrainSet([], 64)
