"""Data loaders on small generated files; real-asset counts in slow tests."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from s2d import data
from s2d.models import ModelBundle

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "very", "not", "a"]


@pytest.fixture
def text_bundle(tmp_path):
    from transformers import BertTokenizer
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    return ModelBundle(model=nn.Identity(), modality="text", family="bert", name="tiny",
                       tokenizer=BertTokenizer(str(vocab)), num_labels=2)


def _image_bundle(size=8, n=3):
    return ModelBundle(model=nn.Identity(), modality="image", family="vit", name="tiny", image_size=size,
                       image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3), num_labels=n)


TEXTS = ["good film", "very good film", "bad", "not a good film at all", "bad bad film", "a film"] * 5


def _write_csv(path, rows, header=("text", "label")):
    import csv
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_stratified_split_and_subset():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    parts = data.stratified_split(labels, seed=7)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    assert [len(p) for p in parts] == [80, 10, 10]
    for c, n in ((0, 50), (1, 30), (2, 20)):
        assert [int((labels[p] == c).sum()) for p in parts] == [round(0.8 * n), round(0.1 * n), round(0.1 * n)]
    assert all(np.array_equal(a, b) for a, b in zip(parts, data.stratified_split(labels, seed=7)))
    sub = data.stratified_subset(labels, 10, seed=1)
    assert np.bincount(labels[sub]).tolist() == [5, 3, 2]
    assert np.array_equal(sub, data.stratified_subset(labels, 10, seed=1))


def test_csv_text_dynamic_padding(tmp_path, text_bundle):
    rows = [(t, "pos" if "good" in t else "neg") for t in TEXTS]
    path = _write_csv(tmp_path / "d.csv", rows, header=("sentence", "y"))
    L = data.build_loaders(str(path), text_bundle, batch_size=4, text_column="sentence", label_column="y")
    assert L.label_names == ["neg", "pos"] and L.num_labels == 2
    assert len(L.train.dataset) + len(L.val.dataset) + len(L.test.dataset) == len(rows)
    for batch in L.val:
        texts = [L.val.dataset[i][0] for i in range(len(batch["labels"]))]
        lens = [len(text_bundle.tokenizer(t)["input_ids"]) for t in texts]
        assert batch["input_ids"].shape == (len(texts), max(lens))
        assert batch["attention_mask"].sum(1).tolist() == lens
        assert batch["labels"].tolist() == [int("good" in t) for t in texts]
        break


def test_jsonl_and_limits(tmp_path, text_bundle):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": int("bad" in t)}) for t in TEXTS))
    L = data.build_loaders(str(path), text_bundle, limit_train=6, limit_eval=2, seed=3)
    assert (len(L.train.dataset), len(L.val.dataset), len(L.test.dataset)) == (6, 2, 2)
    again = data.build_loaders(str(path), text_bundle, limit_train=6, limit_eval=2, seed=3)
    assert L.train.dataset.items == again.train.dataset.items
    calib = data.calibration_batches(L, num_samples=5, batch_size=2, seed=0)
    assert [len(b["labels"]) for b in calib] == [2, 2, 1]


@pytest.mark.parametrize("content,match", [
    ("text,label\n", "dataset is empty"),
    ("words,label\nhi,1\n", "column 'text' not found"),
    ("text,label\nhi,-1\nyo,1\n", "negative label"),
    ("text,label\nhi,\n", "empty value in label column 'label'"),
])
def test_bad_csv(tmp_path, text_bundle, content, match):
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        data.build_loaders(str(tmp_path / "bad.csv"), text_bundle)
    assert "bad.csv" in str(err.value)


def test_bad_inputs(tmp_path, text_bundle):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        data.build_loaders(str(tmp_path / "missing.csv"), text_bundle)
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 0}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl: line 2 is not valid JSON"):
        data.build_loaders(str(tmp_path / "bad.jsonl"), text_bundle)
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.arange(4) % 2)
    with pytest.raises(ValueError, match="is image data but model 'tiny' is a text model"):
        data.build_loaders(str(tmp_path / "x.npz"), text_bundle)


def test_npz_grey_to_rgb_resize_normalise(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 5, 5), dtype=np.uint8)
    y = np.arange(30) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    L = data.build_loaders(str(tmp_path / "a.npz"), _image_bundle(size=10), batch_size=64)
    batch = next(iter(L.test))
    first = L.test.dataset.items[0].numpy()[0].astype(np.float64) / 255   # (5, 5) grey
    # independent bilinear (half-pixel centres, edge clamped) resize 5 -> 10 in numpy
    src = np.clip((np.arange(10) + 0.5) / 2 - 0.5, 0, 4)
    lo, w = np.floor(src).astype(int), src - np.floor(src)
    hi = np.minimum(lo + 1, 4)
    rows = first[lo] * (1 - w)[:, None] + first[hi] * w[:, None]
    img = rows[:, lo] * (1 - w) + rows[:, hi] * w
    for c, (m, s) in enumerate(zip((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))):
        np.testing.assert_allclose(batch["pixel_values"][0, c].numpy(), (img - m) / s, atol=1e-5)
    assert batch["pixel_values"].shape[1:] == (3, 10, 10)


@pytest.mark.parametrize("x,y,match", [
    (np.zeros((4, 8, 8, 5)), np.zeros(4, np.int64), "field 'x' must have shape"),
    (np.zeros((4, 8, 8), np.uint8), np.zeros(3, np.int64), r"field 'y' must have shape \(4,\)"),
    (np.zeros((4, 8, 8), np.uint8), np.array([0, 1, -1, 0]), "integer labels >= 0"),
    (np.full((4, 8, 8), 2.0), np.arange(4) % 2, r"must lie in \[0, 1\]"),
    (np.zeros((4, 8, 8), np.uint8), np.ones(4, np.int64), r"field 'y' holds 1 distinct class\(es\)"),
    (np.zeros((0, 8, 8), np.uint8), np.zeros(0, np.int64), "dataset is empty"),
])
def test_bad_npz(tmp_path, x, y, match):
    np.savez(tmp_path / "b.npz", x=x, y=y)
    with pytest.raises(ValueError, match=match) as err:
        data.build_loaders(str(tmp_path / "b.npz"), _image_bundle())
    assert "b.npz" in str(err.value)


def _npz_bytes(tmp_path) -> bytes:
    np.savez(tmp_path / "good.npz", x=np.zeros((8, 4, 4), np.uint8), y=np.arange(8) % 2)
    return (tmp_path / "good.npz").read_bytes()


@pytest.mark.parametrize("make,match", [
    (lambda b: b[: len(b) // 2], "truncated or damaged .npz archive"),
    (lambda b: b"\x80\x04garbage pickle-looking bytes" * 8, r"not an \.npz file \(not a zip archive\)"),
    (lambda b: b"", r"not an \.npz file \(empty\)"),
    (lambda b: b"\x93NUMPY" + b"\x00" * 64, r"not an \.npz file \(an \.npy array\)"),
])
def test_damaged_npz_one_line(tmp_path, make, match):
    (tmp_path / "bad.npz").write_bytes(make(_npz_bytes(tmp_path)))
    with pytest.raises(ValueError, match=match) as err:
        data.build_loaders(str(tmp_path / "bad.npz"), _image_bundle())
    assert str(tmp_path / "bad.npz") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name,content,match", [
    ("one.csv", "text,label\n" + "a film,1\n" * 20, "label column 'label' holds 1 distinct class"),
    ("one.csv", "text,label\n" + "a film,pos\n" * 20, "label column 'label' holds 1 distinct class"),
    ("latin1.csv", "text,label\ncaf\xe9,0\nbad,1\n".encode("latin-1"), "not UTF-8 text"),
    ("list.jsonl", '{"text": "a", "label": 0}\n[1, 2]\n', "line 2 is not a JSON object"),
])
def test_bad_text_files_one_line(tmp_path, text_bundle, name, content, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=match) as err:
        data.build_loaders(str(path), text_bundle)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_one_class_image_folder(tmp_path):
    from PIL import Image
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "cat" / f"{i}.png")
    with pytest.raises(ValueError, match="image folder .* holds 1 distinct class"):
        data.build_loaders(str(tmp_path / "imgs"), _image_bundle())


def test_too_many_classes(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((20, 4, 4), np.uint8), y=np.arange(20) % 5)
    with pytest.raises(ValueError, match="5 classes but the model has num_labels=3"):
        data.build_loaders(str(tmp_path / "c.npz"), _image_bundle(n=3))


def test_image_folder(tmp_path):
    from PIL import Image
    for c, name in enumerate(["cat", "dog"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(10):
            size = (8, 8) if i % 2 else (12, 6)   # mixed sizes are resized on load
            arr = np.full((size[1], size[0], 3), 40 + 100 * c, np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / name / f"{i}.png")
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("ignored")
    L = data.build_loaders(str(tmp_path / "imgs"), _image_bundle(size=8, n=2), batch_size=32)
    assert L.label_names == ["cat", "dog"] and len(L.train.dataset) == 16
    b = next(iter(L.train))
    for img, lab in zip(b["pixel_values"], b["labels"]):
        want = (40 + 100 * lab.item()) / 255
        torch.testing.assert_close(img[1], torch.full((8, 8), (want - 0.4) / 0.25))
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: cannot read image"):
        data.build_loaders(str(tmp_path / "imgs"), _image_bundle(size=8, n=2))


@pytest.mark.slow
def test_fashion_mnist_counts():
    L = data.build_loaders("fashion-mnist", _image_bundle(size=56, n=10), batch_size=16)
    assert (len(L.train.dataset), len(L.val.dataset), len(L.test.dataset)) == (55000, 5000, 10000)
    assert np.bincount(L.test.dataset.labels.numpy()).tolist() == [1000] * 10
    assert L.train.dataset.labels.numpy().sum() + L.val.dataset.labels.numpy().sum() == 6000 * 45
    assert next(iter(L.train))["pixel_values"].shape == (16, 3, 56, 56)


@pytest.mark.slow
def test_rotten_tomatoes_split_is_fixed(text_bundle):
    import hashlib
    L = data.build_loaders("rotten-tomatoes", text_bundle, seed=5)
    sizes = (len(L.train.dataset), len(L.val.dataset), len(L.test.dataset))
    assert sizes == (10246, 1281, 1281) and sum(sizes) == 12808
    assert L.label_names == ["rotten", "fresh"]
    assert [int(L.test.dataset.labels.sum()), int(L.val.dataset.labels.sum())] == [740, 741]
    digest = hashlib.sha256("\n".join(L.test.dataset.items).encode()).hexdigest()
    assert digest[:16] == RT_TEST_DIGEST   # the split never changes


RT_TEST_DIGEST = "b6d379b786e92fc6"  # sha256 of the test texts, recorded once
