"""Images in: finding the input files and turning each into the model's input.

Preprocessing follows the model's default cfg the way timm's eval transform
does, with Pillow and torch only (no torchvision):

1. decode (JPEGs are decoded at a reduced scale with ``Image.draft`` when the
   image is at least twice the size needed, which is several times faster);
2. apply the EXIF orientation;
3. convert to 8-bit RGB (16-bit images are scaled, not clipped; the alpha
   channel is dropped, as ``convert("RGB")`` does);
4. resize, keeping the aspect ratio, so that the image covers
   ``floor(size / crop_pct)``, and take the centre ``size`` crop (done in one
   ``Image.resize(box=...)`` call, so no pixel outside the crop is resampled);
5. scale to [0, 1] and normalise with the cfg's mean and std (on the batch,
   on the compute device: see :meth:`Preprocess.normalize`).

Worker processes return uint8 HWC batches, a quarter of the bytes of float32.

Pillow is optional for the package (the ``cli`` extra) and imported where
images are decoded: without it, decoding raises a one-line
:class:`~featurezoo._optional.MissingDependency`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import stat
from concurrent.futures import Executor
from dataclasses import dataclass
from types import ModuleType
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .._optional import require
from ..cfg import ModelCfg

__all__ = ["Preprocess", "collect_inputs", "looks_like_images", "LIST_SUFFIXES", "SkippedImage", "ImageBatches",
           "ExtractError", "PathLike", "pillow", "INTERPOLATIONS", "decode_batch", "batch_bounds", "PackedPaths"]

PathLike = Union[str, "os.PathLike[str]"]

# A file INPUT with one of these suffixes is a list of paths, one per line.
LIST_SUFFIXES = (".txt", ".lst", ".list")

# cfg.interpolation -> the name of Pillow's ``Image.Resampling`` member
INTERPOLATIONS = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS",
                  "box": "BOX", "hamming": "HAMMING"}
_EXIF_ORIENTATION = 0x0112


def pillow(feature: str = "featurezoo.extract") -> ModuleType:
    """``PIL.Image``, or a one-line :class:`~featurezoo._optional.MissingDependency` naming the ``cli`` extra."""
    return require("PIL.Image", "cli", feature)


class ExtractError(ValueError):
    """A bad argument or an unusable output directory; the message is one line for the user."""


class SkippedImage(Exception):
    """An input that is not a usable image; ``str()`` is the reason recorded in the index."""


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing of one model: resize, centre crop, mean/std.

    >>> p = Preprocess.from_cfg(ModelCfg(), size=(160, 160))
    >>> p.size, p.resize
    ((160, 160), (182, 182))
    """

    size: Tuple[int, int]  # (H, W) of the crop fed to the model
    resize: Tuple[int, int]  # (H, W) the image is resized to cover before cropping
    interpolation: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    jpeg_draft: bool = True

    @classmethod
    def from_cfg(cls, cfg: ModelCfg, size: Optional[Tuple[int, int]] = None, jpeg_draft: bool = True) -> "Preprocess":
        h, w = size if size is not None else tuple(cfg.input_size[1:])
        if h <= 0 or w <= 0:
            raise ExtractError(f"image size must be positive, got {h}x{w}")
        if cfg.interpolation not in INTERPOLATIONS:
            raise ExtractError(f"{cfg.name}: unknown interpolation {cfg.interpolation!r}; "
                               f"valid: {sorted(INTERPOLATIONS)}")
        crop_pct = cfg.crop_pct if cfg.crop_pct and cfg.crop_pct > 0 else 1.0
        resize = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        return cls((int(h), int(w)), resize, cfg.interpolation, tuple(cfg.mean), tuple(cfg.std), jpeg_draft)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    # -- one image ----------------------------------------------------------------------
    def load(self, path: PathLike) -> np.ndarray:
        """Decode ``path`` into the uint8 ``(H, W, 3)`` crop; :class:`SkippedImage` if it is not a usable image."""
        Image = pillow()
        try:
            # stat first: opening a FIFO found in a folder would block forever
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise SkippedImage("not a regular file")
            f = open(path, "rb")
        except FileNotFoundError:
            raise SkippedImage("not found (missing file or broken link)") from None
        except OSError as e:
            raise SkippedImage(f"unreadable: {e.strerror or e}") from None
        with f:
            if os.fstat(f.fileno()).st_size == 0:
                raise SkippedImage("empty file")
            try:
                img = Image.open(f)
            except Image.UnidentifiedImageError:
                raise SkippedImage("not an image") from None
            except Image.DecompressionBombError as e:
                raise SkippedImage(f"too large: {e}") from None
            except OSError as e:  # an errno: the file system failed; none: Pillow could not parse the header
                raise SkippedImage(f"unreadable: {e.strerror}" if e.errno else f"corrupt image: {e}") from None
            try:
                return self.apply(img)
            except SkippedImage:
                raise
            except Exception as e:  # decoders of corrupt files raise anything (OSError, SyntaxError, struct.error...)
                raise SkippedImage(f"corrupt image: {type(e).__name__}: {e}") from None

    def apply(self, img) -> np.ndarray:
        """Preprocess an opened (not necessarily loaded) PIL image into the uint8 ``(H, W, 3)`` crop."""
        Image = pillow()
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a broken EXIF block: ignore the orientation, keep the pixels
            orientation = 1
        if self.jpeg_draft and img.format == "JPEG":
            self._draft(img, orientation)
        _check_pixels(img)
        img.load()
        if orientation in range(2, 9):
            img = require("PIL.ImageOps", "cli", "featurezoo.extract").exif_transpose(img)
        img = _to_rgb(img)
        w, h = img.size
        th, tw = self.size
        rh, rw = self.resize
        # Resized size covering (rh, rw) with the aspect ratio kept, and the centre crop in it,
        # mapped back to source pixels so one resize call produces exactly the crop.
        scale = max(rh / h, rw / w)
        nw, nh = max(rw, round(w * scale)), max(rh, round(h * scale))
        if nh < th or nw < tw:  # crop_pct > 1: the crop is larger than the resized image
            nw, nh = max(nw, tw), max(nh, th)
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + tw) * sx, (top + th) * sy)
        img = img.resize((tw, th), Image.Resampling[INTERPOLATIONS[self.interpolation]], box=box)
        return np.array(img, dtype=np.uint8)  # a writable copy (asarray's view of PIL memory is read-only)

    def _draft(self, img, orientation: int) -> None:
        w, h = img.size
        if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: the stored width becomes the height
            rh, rw = self.resize[1], self.resize[0]
        else:
            rh, rw = self.resize
        scale = max(rh / h, rw / w)
        if scale < 0.5:  # draft only ever reduces by 1/2, 1/4, 1/8, keeping at least the requested size
            img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))

    # -- a batch --------------------------------------------------------------------------
    def normalize(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 ``(N, H, W, 3)`` (as :meth:`load` stacks) to the normalised ``(N, 3, H, W)`` model input."""
        if batch.dim() != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected a uint8 (N, H, W, 3) batch, got shape {tuple(batch.shape)}")
        x = torch.empty((batch.shape[0], 3, batch.shape[1], batch.shape[2]), dtype=torch.float32, device=batch.device)
        x.copy_(batch.permute(0, 3, 1, 2))
        mean = torch.tensor(self.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
        x.div_(255.0).sub_(mean).div_(std)
        return x if dtype == torch.float32 else x.to(dtype)


def _check_pixels(img) -> None:
    """:class:`SkippedImage` if ``img`` (opened, not decoded; after any JPEG draft) would decode to more pixels
    than ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's bomb threshold, 89.5 million by default; ``None``: no limit).

    Pillow only warns between that and twice it, and a 117 KB PNG holds
    11000x11000 pixels: hundreds of megabytes once decoded. A JPEG that draft
    decoding reduces below the limit is decoded.
    """
    limit = pillow().MAX_IMAGE_PIXELS
    w, h = img.size
    if limit and w * h > limit:
        raise SkippedImage(f"too large: {w}x{h} = {w * h:,} pixels, above the limit of {limit:,} "
                           f"(PIL.Image.MAX_IMAGE_PIXELS); not decoded")


def _to_rgb(img):
    Image = pillow()
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:  # 16-bit range: scale, do not clip
            arr = (arr.clip(0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.nan_to_num(arr).clip(0, 255).round().astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


# -- finding the inputs -----------------------------------------------------------------------------
def collect_inputs(inputs: Iterable[PathLike], exclude: Sequence[PathLike] = ()) -> List[str]:
    """The sorted, de-duplicated absolute paths named by ``inputs``.

    Each input is an image file, a folder (walked recursively; hidden files
    and folders, and the folders in ``exclude``, are left out) or a text file
    of paths (suffix in :data:`LIST_SUFFIXES`; one path per line, blank lines
    and ``#`` comments ignored, relative paths relative to the list's folder).
    Every file found in a folder is kept, images or not: what does not decode
    is skipped later and listed with its reason. A path named on the command
    line that does not exist is an error; one named in a list is skipped later.
    """
    excluded = {os.path.abspath(os.fspath(p)) for p in exclude}
    found: set = set()
    for item in inputs:
        path = os.path.abspath(os.fspath(item))
        if os.path.isdir(path):
            found.update(_walk(path, excluded))
        elif os.path.isfile(path) and path.lower().endswith(LIST_SUFFIXES):
            found.update(_read_list(path, excluded))
        elif os.path.lexists(path):
            found.add(path)
        else:
            raise ExtractError(f"input {os.fspath(item)!r} does not exist")
    return sorted(found)


def _walk(root: str, excluded: set) -> List[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and os.path.join(dirpath, d) not in excluded)
        out.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
    return out


def _read_list(list_path: str, excluded: set) -> List[str]:
    base = os.path.dirname(list_path)
    out: List[str] = []
    try:
        with open(list_path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ExtractError(f"cannot read the list of paths {list_path!r}: {e.strerror or e}") from None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = os.path.abspath(os.path.join(base, os.path.expanduser(line)))
        if os.path.isdir(path):
            out.extend(_walk(path, excluded))
        else:
            out.append(path)
    return out


def looks_like_images(paths: Sequence[str], sniff: int = 32) -> bool:
    """Whether any of ``paths`` is plausibly an image: an image suffix, or else
    (for the first ``sniff`` paths) a header Pillow identifies."""
    Image = pillow()
    exts = Image.registered_extensions()
    if any(os.path.splitext(p)[1].lower() in exts for p in paths):
        return True
    for p in paths[:sniff]:
        try:
            with Image.open(p):
                return True
        except Exception:
            continue
    return False


# -- batches --------------------------------------------------------------------------------------------
def batch_bounds(k: int, batch_size: int, n: int) -> Tuple[int, int]:
    """Positions ``[start, stop)`` of batch ``k`` among ``n`` sorted inputs: batch ``k`` is always the same images."""
    return k * batch_size, min((k + 1) * batch_size, n)


def decode_batch(paths: Sequence[str], start: int, stop: int, preprocess: Preprocess,
                 executor: Optional[Executor] = None) -> Tuple[torch.Tensor, List[int], List[Tuple[int, str]]]:
    """Decode ``paths[start:stop]``: ``(uint8 (n, H, W, 3), rows, skipped)``, what every engine runs per batch.

    ``rows`` are the positions of the ``n`` decoded images, in order;
    ``skipped`` is ``[(position, reason)]`` for the others. With an
    ``executor`` the images are decoded on its threads (same result).
    """
    def load(pos: int) -> Union[np.ndarray, SkippedImage]:
        try:
            return preprocess.load(paths[pos])
        except SkippedImage as e:
            return e

    positions = range(start, stop)
    arrays, rows, skipped = [], [], []
    for pos, got in zip(positions, map(load, positions) if executor is None else executor.map(load, positions)):
        if isinstance(got, SkippedImage):
            skipped.append((pos, str(got)))
        else:
            arrays.append(got)
            rows.append(pos)
    h, w = preprocess.size
    batch = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty((0, h, w, 3), dtype=torch.uint8)
    return batch, rows, skipped


class PackedPaths(Sequence[str]):
    """A read-only list of paths in two numpy arrays (the encoded bytes and their offsets).

    Pickled, it is two buffers, which Ray's object store hands to every task
    without a copy; a ``list`` of ``str`` would be rebuilt, one object per path,
    in each task that reads it. Undecodable file names round-trip
    (``os.fsencode``/``os.fsdecode``).
    """

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data = data
        self.offsets = offsets

    @classmethod
    def pack(cls, paths: Sequence[str]) -> "PackedPaths":
        # One encode of the joined paths, not one bytes object per path: NUL is the one byte no path holds.
        data = np.frombuffer(os.fsencode("\0".join(paths) + "\0"), dtype=np.uint8) if paths else np.zeros(0, np.uint8)
        ends = np.flatnonzero(data == 0)
        if len(ends) != len(paths):
            raise ValueError("a path contains a NUL character")
        offsets = np.empty(len(paths) + 1, dtype=np.int64)
        offsets[0], offsets[1:] = 0, ends + 1
        return cls(data, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return os.fsdecode(self.data[self.offsets[i]:self.offsets[i + 1] - 1].tobytes())  # less its NUL


class ImageBatches(torch.utils.data.Dataset):
    """Item ``k`` is batch ``k`` of ``paths``: ``(k, uint8 (n, H, W, 3), rows, skipped)`` (see :func:`decode_batch`).

    One item per batch means one message per batch between a worker and the main process.
    """

    def __init__(self, paths: Sequence[str], batch_size: int, preprocess: Preprocess):
        self.paths = paths
        self.batch_size = batch_size
        self.preprocess = preprocess

    def __len__(self) -> int:
        return (len(self.paths) + self.batch_size - 1) // self.batch_size

    def bounds(self, k: int) -> Tuple[int, int]:
        return batch_bounds(k, self.batch_size, len(self.paths))

    def __getitem__(self, k: int):
        return self.decode(k)

    def decode(self, k: int, executor: Optional[Executor] = None):
        """Item ``k``, its images decoded on ``executor``'s threads if given."""
        return (k, *decode_batch(self.paths, *self.bounds(k), self.preprocess, executor))
