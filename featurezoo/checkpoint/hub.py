"""Published weights: download once into a cache, atomically, then load."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..atomic import atomic_write
from .errors import CheckpointError
from .load import load_checkpoint

__all__ = ["cache_dir", "cached_path", "download", "load_pretrained"]

_logger = logging.getLogger(__name__)
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z]+$")


def cache_dir() -> Path:
    """``$FEATUREZOO_HOME/checkpoints`` (default ``~/.cache/featurezoo/checkpoints``)."""
    home = os.environ.get("FEATUREZOO_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "featurezoo")
    return Path(home) / "checkpoints"


def cached_path(url: str) -> Path:
    return cache_dir() / os.path.basename(url.split("?")[0])


def download(url: str, dest: Path, progress: bool = True) -> Path:
    """Fetch ``url`` to ``dest`` with :func:`featurezoo.atomic.atomic_write` (temporary file, fsync, rename).

    If the file name carries a hex hash prefix (``name-1a2b3c4d.ckpt``) the
    download is checked against it: SHA-256 (torch.hub's convention) or MD5
    (which MindCV's downloader checks) must start with it.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    sha, md5 = hashlib.sha256(), hashlib.md5()
    try:
        with atomic_write(dest) as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            bar = _progress(total, dest.name) if progress else None
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                sha.update(chunk)
                md5.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
            match = _HASH_IN_NAME.search(dest.name)
            if match and not any(h.hexdigest().startswith(match.group(1)) for h in (sha, md5)):
                raise CheckpointError(  # inside the block: the download is discarded, dest never created
                    f"download of {url} is corrupt: neither SHA-256 {sha.hexdigest()[:16]}... nor MD5 "
                    f"{md5.hexdigest()[:16]}... starts with {match.group(1)} from its name"
                )
    except (urllib.error.URLError, OSError) as e:
        raise CheckpointError(
            f"could not download {url} ({e}). If this machine is offline, download the file elsewhere and place "
            f"it at {dest} (or set FEATUREZOO_HOME)"
        ) from None
    return dest


class _LogProgress:
    """Download progress as log lines (INFO, every 10% or 64 MiB), used when tqdm is not installed."""

    STEP_FRACTION, STEP_BYTES = 0.1, 64 << 20

    def __init__(self, total: int, name: str):
        self.total, self.done, self.name = total, 0, name
        self.step = max(1, int(total * self.STEP_FRACTION)) if total else self.STEP_BYTES
        self.next = self.step
        size = f"{total / 2**20:.1f} MiB" if total else "size unknown"
        _logger.info("downloading %s (%s)", name, size)

    def update(self, n: int) -> None:
        self.done += n
        if self.done >= self.next:
            self.next = (self.done // self.step + 1) * self.step
            if self.total:
                _logger.info("downloading %s: %.0f%% of %.1f MiB", self.name, 100 * self.done / self.total,
                             self.total / 2**20)
            else:
                _logger.info("downloading %s: %.1f MiB", self.name, self.done / 2**20)

    def close(self) -> None:
        _logger.info("downloaded %s (%.1f MiB)", self.name, self.done / 2**20)


def _progress(total: int, name: str) -> Any:
    """A tqdm bar (the ``cli`` extra) or, without tqdm, :class:`_LogProgress`."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _LogProgress(total, name)
    return tqdm(total=total or None, unit="B", unit_scale=True, desc=name)


def load_pretrained(model: nn.Module, cfg: Any, num_classes: int = 1000, in_channels: int = 3) -> None:
    """Load the published weights of ``cfg.url`` (cached) into ``model``."""
    if not cfg.url:
        raise CheckpointError(f"{cfg.name or type(model).__name__} has no published weights (its cfg has no url)")
    path = cached_path(cfg.url)
    if not path.exists():
        download(cfg.url, path)
    load_checkpoint(model, path)
