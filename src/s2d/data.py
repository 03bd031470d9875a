"""Datasets -> DataLoaders with the model's own preprocessing.

Named assets (``fashion-mnist``: official 60k/10k split with a fixed 5k validation slice of train;
``rotten-tomatoes``: fixed seeded stratified 80/10/10 split) and generic user data: CSV / JSONL text
with user-named columns, an image folder with one sub-folder per class, ``.npz`` arrays (``x``, ``y``).
A generic single file is split 80/10/10 (stratified, seed ``SPLIT_SEED``). Images are kept as uint8 and
converted per batch: grey -> 3 channels, resized (bilinear) to the model's size, normalised.
Text is tokenised per batch with dynamic padding.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from s2d.assets import fetch
from s2d.collate import ImageCollate, PromptCollate, TextCollate
from s2d.models import ModelBundle

logger = logging.getLogger(__name__)

SPLIT_SEED = 1234          # fixed once and for all: rotten-tomatoes and generic single-file splits
FMNIST_VAL_SIZE = 5000     # validation slice taken from the official Fashion-MNIST train set
FMNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                 "Bag", "Ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    num_labels: int
    label_names: list[str]


class _Items(Dataset):
    """Items (texts or uint8 image tensors) with integer labels."""

    def __init__(self, items: Sequence[str] | torch.Tensor, labels: torch.Tensor):
        self.items, self.labels = items, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.items[i], int(self.labels[i])


# ----------------------------------------------------------------------------- splits / subsets

def stratified_split(labels: np.ndarray, fractions=(0.8, 0.1, 0.1), seed: int = SPLIT_SEED) -> list[np.ndarray]:
    """Per-class seeded permutation cut at ``fractions``; returns sorted index arrays."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    bounds = np.cumsum(fractions)[:-1]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for k, chunk in enumerate(np.split(idx, np.round(bounds * len(idx)).astype(int))):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices with class proportions kept (largest remainders), deterministic in ``seed``."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[: n - take.sum()]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


# ----------------------------------------------------------------------------- readers

def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def _fashion_mnist() -> tuple[list, list[str]]:
    root = fetch("fashion-mnist", progress=False)
    out = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        x = _read_idx(root / f"{stem}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
        y = _read_idx(root / f"{stem}-labels-idx1-ubyte.gz", 8).astype(np.int64)
        out[split] = (torch.from_numpy(x.copy()), y)
    x, y = out["train"]
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    val, train = np.sort(perm[:FMNIST_VAL_SIZE]), np.sort(perm[FMNIST_VAL_SIZE:])
    return [(x[train], y[train]), (x[val], y[val]), out["test"]], FMNIST_LABELS


def _rotten_tomatoes() -> tuple[list[str], np.ndarray, list[str]]:
    path = fetch("rotten-tomatoes", progress=False) / "rotten_tomatoes_corpus_full.csv.bz2"
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] != "plot"]
    names = ["rotten", "fresh"]
    return [r["text"] for r in rows], np.array([names.index(r["category"]) for r in rows]), names


def _require_classes(labels: np.ndarray, path: Path, what: str) -> None:
    """ValueError naming the file unless ``labels`` hold at least two distinct classes."""
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError(f"{path}: {what} holds {len(present)} distinct class(es) "
                         f"({', '.join(map(str, present[:3]))}); classification needs at least 2")


def _labels_from_values(values: list, path: Path, column: str) -> tuple[np.ndarray, list[str]]:
    if any(v is None or str(v).strip() == "" for v in values):
        raise ValueError(f"{path}: empty value in label column {column!r}")
    _require_classes(np.array([str(v) for v in values]), path, f"label column {column!r}")
    try:
        ints = np.array([int(str(v)) for v in values])
    except ValueError:
        names = sorted({str(v) for v in values})
        return np.array([names.index(str(v)) for v in values]), names
    if ints.min() < 0:
        raise ValueError(f"{path}: label column {column!r} has negative label {ints.min()}")
    return ints, [str(i) for i in range(ints.max() + 1)]


def _read_rows(path: Path, fmt: str) -> tuple[list[dict], list[str]]:
    """The rows of a CSV / JSONL file as dicts, and its column names; one-line errors naming the file."""
    try:
        if fmt == "csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                return list(reader), list(reader.fieldnames or [])
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}: line {i} is not valid JSON ({err.msg})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}: line {i} is not a JSON object")
                    rows.append(row)
        return rows, sorted({k for r in rows for k in r})
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise ValueError(f"{path}: malformed CSV ({err})") from None


def _read_table(path: Path, fmt: str, text_column: str, label_column: str):
    rows, columns = _read_rows(path, fmt)
    if not rows:
        raise ValueError(f"{path}: dataset is empty (no rows)")
    for col in (text_column, label_column):
        if col not in columns or any(col not in r for r in rows):
            raise ValueError(f"{path}: column {col!r} not found (columns: {', '.join(map(str, columns))})")
    texts = [str(r[text_column]) for r in rows]
    labels, names = _labels_from_values([r[label_column] for r in rows], path, label_column)
    return texts, labels, names


def _read_image_folder(path: Path, size: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{path}: image folder needs one sub-folder per class, found none")
    images, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(f) as im:
                        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                except OSError as err:
                    raise ValueError(f"{f}: cannot read image ({err})") from None
                images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
                labels.append(c)
    if not images:
        raise ValueError(f"{path}: dataset is empty (no image files in {', '.join(classes)})")
    _require_classes(np.array(labels), path, "the image folder (one sub-folder per class)")
    return torch.stack(images), np.array(labels), classes


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive; one-line errors for a file that is not one, or a damaged one."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        kind = "an .npy array" if head == b"\x93NUM" else "empty" if not head else "not a zip archive"
        raise ValueError(f"{path}: not an .npz file ({kind}); write one with numpy.savez(path, x=..., y=...)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path}: truncated or damaged .npz archive ({err})") from None
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: unreadable .npz archive ({err})") from None


def _read_npz(path: Path) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    arrays = _load_npz(path)
    for key in ("x", "y"):
        if key not in arrays:
            raise ValueError(f"{path}: array {key!r} missing (found: {', '.join(arrays) or 'none'})")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = np.moveaxis(x, -1, 1)  # channels-last -> channels-first
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{path}: field 'x' must have shape (N, H, W), (N, C, H, W) or (N, H, W, C) with "
                         f"C in (1, 3); got {tuple(arrays['x'].shape)}")
    if len(x) == 0:
        raise ValueError(f"{path}: dataset is empty (field 'x' has 0 rows)")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{path}: field 'y' must have shape ({len(x)},), got {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError(f"{path}: field 'y' must hold integer labels >= 0 (dtype {y.dtype}, min {y.min()})")
    _require_classes(y, path, "field 'y'")
    if np.issubdtype(x.dtype, np.floating):  # floats in [0, 1] -> uint8
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"{path}: float field 'x' must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        x = np.round(x * 255)
    return torch.from_numpy(x.astype(np.uint8)), y.astype(np.int64), [str(i) for i in range(int(y.max()) + 1)]


# ----------------------------------------------------------------------------- entry point

def _detect_format(path: Path, data_format: str | None) -> str:
    if data_format:
        if data_format not in ("csv", "jsonl", "imagefolder", "npz"):
            raise ValueError(f"data_format must be csv, jsonl, imagefolder or npz, got {data_format!r}")
        return data_format
    if path.is_dir():
        return "imagefolder"
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".npz": "npz"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: cannot tell the data format from the suffix; pass data_format")
    return fmt


def _load_splits(dataset: str, fmt_arg: str | None, text_column: str, label_column: str, size: int) -> tuple:
    """-> (modality, [(items, labels)] * 3 for train/val/test, label_names)."""
    if dataset == "fashion-mnist":
        splits, names = _fashion_mnist()
        return "image", splits, names
    if dataset == "rotten-tomatoes":
        texts, labels, names = _rotten_tomatoes()
        modality, items = "text", texts
    else:
        path = Path(dataset).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such dataset file or directory (nor an asset name: "
                                    f"fashion-mnist, rotten-tomatoes)")
        fmt = _detect_format(path, fmt_arg)
        if fmt in ("csv", "jsonl"):
            modality, (items, labels, names) = "text", _read_table(path, fmt, text_column, label_column)
        elif fmt == "npz":
            modality, (items, labels, names) = "image", _read_npz(path)
        else:
            modality, (items, labels, names) = "image", _read_image_folder(path, size)
    parts = stratified_split(labels, seed=SPLIT_SEED)
    pick = (lambda idx: [items[i] for i in idx]) if modality == "text" else (lambda idx: items[idx])
    return modality, [(pick(p), labels[p]) for p in parts], names


def build_loaders(dataset: str, bundle: ModelBundle, *, batch_size: int = 32, eval_batch_size: int = 64,
                  data_format: str | None = None, text_column: str = "text", label_column: str = "label",
                  max_length: int = 128, image_size: int | None = None, seed: int = 0,
                  limit_train: int | None = None, limit_eval: int | None = None,
                  subset_seed: int | None = None, prompt: str | None = None) -> Loaders:
    """Train/val/test loaders for an asset name or a path, preprocessed for ``bundle``.

    Batches: text {"input_ids", "attention_mask", ("token_type_ids"), "labels"}; images
    {"pixel_values" (B, 3, S, S) float normalised, "labels"}. ``seed`` drives shuffling, and
    ``subset_seed`` (default ``seed``) the ``limit_*`` subsets (stratified); neither moves the split.
    ``prompt`` (a template with one ``{text}``) formats text for a causal LM (:class:`PromptCollate`).
    """
    for field, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("max_length", max_length)):
        if v < 1:
            raise ValueError(f"build_loaders: {field} must be >= 1, got {v}")
    size = image_size or bundle.image_size or 224
    modality, splits, names = _load_splits(dataset, data_format, text_column, label_column, size)
    if modality != bundle.modality:
        raise ValueError(f"dataset {dataset!r} is {modality} data but model {bundle.name!r} is a {bundle.modality} model")
    if bundle.num_labels is not None and len(names) > bundle.num_labels:
        raise ValueError(f"dataset {dataset!r}: field 'label' has {len(names)} classes but the model has "
                         f"num_labels={bundle.num_labels}")
    if modality == "text":
        if bundle.tokenizer is None:
            raise ValueError(f"model {bundle.name!r} has no tokenizer; cannot load text dataset {dataset!r}")
        collate = (PromptCollate(bundle.tokenizer, max_length, prompt) if prompt is not None
                   else TextCollate(bundle.tokenizer, max_length))
    elif prompt is not None:
        raise ValueError(f"data.prompt applies to text data; dataset {dataset!r} is {modality} data")
    else:
        collate = ImageCollate(size, bundle.image_mean or (0.5,) * 3, bundle.image_std or (0.5,) * 3)
    sets = []
    for k, (items, labels) in enumerate(splits):
        limit = limit_train if k == 0 else limit_eval
        if limit is not None:
            idx = stratified_subset(labels, limit, (seed if subset_seed is None else subset_seed) + k)
            items = [items[i] for i in idx] if modality == "text" else items[idx]
            labels = labels[idx]
        if len(labels) == 0:
            raise ValueError(f"dataset {dataset!r}: the {('train', 'val', 'test')[k]} split is empty")
        sets.append(_Items(items, torch.as_tensor(labels)))
    gen = torch.Generator().manual_seed(seed)
    return Loaders(train=DataLoader(sets[0], batch_size=batch_size, shuffle=True, generator=gen, collate_fn=collate),
                   val=DataLoader(sets[1], batch_size=eval_batch_size, collate_fn=collate),
                   test=DataLoader(sets[2], batch_size=eval_batch_size, collate_fn=collate),
                   num_labels=len(names), label_names=list(names))


def calibration_batches(loaders: Loaders, num_samples: int = 32, batch_size: int = 32,
                        seed: int = 0) -> list[dict]:
    """``num_samples`` training examples (seeded choice) collated into batches of ``batch_size``."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"calibration_batches: num_samples and batch_size must be >= 1, got "
                         f"{num_samples}, {batch_size}")
    ds, collate = loaders.train.dataset, loaders.train.collate_fn
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[: num_samples].tolist()
    return [collate([ds[i] for i in idx[s: s + batch_size]]) for s in range(0, len(idx), batch_size)]
