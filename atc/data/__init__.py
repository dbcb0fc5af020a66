"""Datasets for training and evaluation, behind one entry point.

    from atc.data import build_dataset
    dataset, info = build_dataset("digits", split="val", input_size=64)
    info.num_classes, info.multilabel, info.mean, info.std     # also info["num_classes"], ...

Names and on-disk layouts (``root`` is the dataset folder; ``digits`` needs none, it ships with scikit-learn):

- ``imagenet``: ``root/{train,val}/<class>/<image>``
- ``nabirds``: ``root/{images.txt,image_class_labels.txt,train_test_split.txt,classes.txt,hierarchy.txt,images/}``
- ``coco``: ``root/{train2014,val2014}/`` + ``root/annotations/instances_{train,val}2014.json`` (multi-label)
- ``nuswide``: ``root/nus_wid_data.csv`` + images (ASL variant, multi-label)
- ``digits``: scikit-learn's 8x8 digits, upsampled to ``input_size``, fixed stratified 80/20 split
"""

from __future__ import annotations

from atc.data.common import DatasetError, FileListDataset, load_image
from atc.data.datasets import DATASETS, MULTILABEL_DATASETS, SPLITS, DatasetInfo, build_dataset
from atc.data.loaders import ShardSampler, build_loaders, build_train_sampler, usable_workers

__all__ = ["build_dataset", "build_loaders", "build_train_sampler", "ShardSampler", "usable_workers", "DatasetInfo",
           "DatasetError", "DATASETS", "MULTILABEL_DATASETS", "load_image", "FileListDataset", "SPLITS"]
