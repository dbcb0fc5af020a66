"""atc.data: every dataset family from tiny fixtures in its real on-disk format; clear errors."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from atc.data import DatasetError, build_dataset


def _img(path, color=(255, 0, 0), size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_digits_split_and_pixels_match_sklearn():
    from sklearn.datasets import load_digits

    train, info = build_dataset("digits", split="train", input_size=8)
    val, _ = build_dataset("digits", split="val", input_size=8)
    assert (info.num_classes, info.multilabel, info["num_classes"]) == (10, False, 10)
    assert len(train) + len(val) == 1797 and len(val) == 360
    # Stratified: every class present in val with roughly a fifth of its images.
    assert np.bincount(val.targets, minlength=10).min() >= 30
    raw = load_digits()
    # At the native 8x8 size (crop 1.0, no resize) the tensor is the sklearn image, normalised.
    from atc.data.digits import digits_split_indices

    idx = digits_split_indices("val")
    assert not set(idx) & set(digits_split_indices("train"))
    x, y = val[3]
    expected = torch.tensor(np.round(raw.images[idx[3]] * 255 / 16) / 255, dtype=torch.float32)
    assert y == raw.target[idx[3]]
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x[0] * 0.5 + 0.5, expected, atol=1e-6)
    # Deterministic split and upsampling to the requested size.
    again, _ = build_dataset("digits", split="val", input_size=48)
    assert again[3][0].shape == (3, 48, 48) and again.targets == val.targets


def test_imagenet_folder(tmp_path):
    for cls, color in (("n02", (0, 255, 0)), ("n01", (255, 0, 0))):
        for split in ("train", "val"):
            for i in range(2):
                _img(tmp_path / split / cls / f"{i}.JPEG", color)
    ds, info = build_dataset("imagenet", tmp_path, "val", input_size=32)
    assert info.num_classes == 2 and info.classes == ["n01", "n02"]
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 0
    # Red image -> channel 0 high after un-normalising.
    red = x[0] * info.std[0] + info.mean[0]
    assert torch.allclose(red, torch.ones_like(red), atol=1e-2)
    train, _ = build_dataset("imagenet", tmp_path, "train", input_size=32, is_train=True)
    assert train[1][0].shape == (3, 32, 32)


def test_nabirds_files(tmp_path):
    # Original class ids 7 and 3 (non-contiguous) -> contiguous 1 and 0.
    rows = [("a1", "0001/a.jpg", 7, 1), ("a2", "0001/b.jpg", 7, 0), ("b1", "0002/c.jpg", 3, 1), ("b2", "0002/d.jpg", 3, 0)]
    (tmp_path / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, _, _ in rows))
    (tmp_path / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (tmp_path / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    (tmp_path / "classes.txt").write_text("3 Robin\n7 Crow\n0 Birds\n")
    (tmp_path / "hierarchy.txt").write_text("3 0\n7 0\n")
    for _, p, _, _ in rows:
        _img(tmp_path / "images" / p)
    train, info = build_dataset("nabirds", tmp_path, "train", input_size=16)
    val, _ = build_dataset("nabirds", tmp_path, "val", input_size=16)
    assert info.num_classes == 2 and info.classes == ["Robin", "Crow"]
    assert sorted(train.targets) == [0, 1] and len(val) == 2
    assert train.files[0].name == "a.jpg" and train.targets[0] == 1


def test_coco_multilabel(tmp_path):
    cats = [{"id": 5, "name": "bus"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    images = [{"id": 10, "file_name": "x.jpg", "width": 20, "height": 16},
              {"id": 11, "file_name": "y.jpg", "width": 20, "height": 16},
              {"id": 12, "file_name": "unlabelled.jpg", "width": 20, "height": 16}]
    anns = [{"id": 1, "image_id": 10, "category_id": 5, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0}]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    for im in images:
        _img(tmp_path / "val2014" / im["file_name"])
    ds, info = build_dataset("coco", tmp_path, "val", input_size=16)
    assert info.multilabel and info.num_classes == 3 and info.classes == ["person", "car", "bus"]
    assert len(ds) == 2  # the image without annotations is left out
    assert ds[0][1].tolist() == [1.0, 0.0, 1.0] and ds[1][1].tolist() == [0.0, 1.0, 0.0]
    assert ds[0][0].shape == (3, 16, 16)
    with pytest.raises(DatasetError, match="instances_train2014.json"):
        build_dataset("coco", tmp_path, "train")


def test_nuswide_csv(tmp_path):
    rows = [("filepath", "label", "split_name"), ("a/1.jpg", "['sky', 'clouds']", "train"),
            ("a/2.jpg", "['water']", "val"), ("b/3.jpg", "['sky']", "val")]
    with open(tmp_path / "nus_wid_data.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    for p, _, _ in rows[1:]:
        _img(tmp_path / "images" / p)
    ds, info = build_dataset("nuswide", tmp_path, "val", input_size=16)
    assert info.classes == ["clouds", "sky", "water"] and info.multilabel
    assert len(ds) == 2 and ds[0][1].tolist() == [0, 0, 1] and ds[1][1].tolist() == [0, 1, 0]
    train, _ = build_dataset("nuswide", tmp_path, "train", input_size=16, is_train=True)
    assert train[0][1].tolist() == [1, 1, 0] and train[0][0].shape == (3, 16, 16)


def test_errors_name_what_is_missing(tmp_path):
    with pytest.raises(DatasetError, match="needs a root folder"):
        build_dataset("imagenet", None)
    with pytest.raises(DatasetError, match=r"val.*split folder"):
        build_dataset("imagenet", tmp_path, "val")
    with pytest.raises(DatasetError, match="images.txt"):
        build_dataset("nabirds", tmp_path, "train")
    with pytest.raises(DatasetError, match="nus_wid_data.csv"):
        build_dataset("nuswide", tmp_path, "train")
    with pytest.raises(DatasetError, match="unknown dataset"):
        build_dataset("cifar", tmp_path)
    bad = tmp_path / "im" / "val" / "c0" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image")
    ds, _ = build_dataset("imagenet", tmp_path / "im", "val", input_size=16)
    with pytest.raises(DatasetError, match="broken.jpg"):
        ds[0]
