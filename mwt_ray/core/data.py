"""Datasets as in-memory uint8 tensors, and a batch iterator that augments on the device.

Every dataset becomes an ``ImageData``: train/test images (N, 3, H, W) uint8 and int64 labels.
Small image datasets fit in memory (CIFAR-10 is 150 MB), so decoding happens once and each epoch
only indexes, augments (random crop with 4-pixel zero padding, horizontal flip) and normalises
whole batches, on the GPU when there is one. Sources:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits, upscaled to 32x32 RGB and cached:
  real data inside an installed package, the default for quick starts (no download).
- ``cifar10`` / ``svhn``: torchvision's loaders from a local root (``download=True`` only when
  asked for and a network exists).
- ``folder``: any image folder with ``train/<class>/*`` and ``test/<class>/*`` (or a .tar.gz
  of one), decoded once and cached under ``~/.cache/mwt_ray`` (``$MWT_RAY_CACHE``), keyed on
  every file's name, size and modification time.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .files import atomic_torch_save
from .messages import error_line

__all__ = ["ImageData", "load_dataset", "iterate_batches", "place_data", "DATASETS", "cache_dir"]

DATASETS = ("digits", "cifar10", "svhn", "folder")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageData:
    train_images: torch.Tensor  # (N, C, H, W) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    # Per-channel statistics of the training pixels; subsets inherit those of the full dataset.
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    # Training samples held out of training (``with_validation``): choices are made on them, never on the test set.
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("train", "test"):
            images, labels = getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
                raise ValueError(f"{name} images must be (N, C, H, W) uint8 with one label each")
        missing = [c for c in range(len(self.classes)) if not (self.train_labels == c).any()]
        if missing:
            names = ", ".join(f"{c} ({self.classes[c]})" for c in missing)
            raise ValueError(f"class(es) {names} have no training samples")
        if self.mean is None or self.std is None:
            pixels = self.train_images.to(torch.float32).div_(255)
            self.mean = pixels.mean(dim=(0, 2, 3))
            self.std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, classes: list[int]) -> ImageData:
        """The samples of ``classes`` only, labels remapped to 0..M-1 in the given order.

        Normalisation statistics stay those of the full dataset: a reused module sees inputs
        normalised exactly as in training.
        """
        validate_classes(classes, self.num_classes)
        lookup = torch.full((self.num_classes,), -1, dtype=torch.int64)
        lookup[torch.tensor(classes)] = torch.arange(len(classes))
        parts = {}
        for name in ("train", "test", "val"):
            images, labels = getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")
            if images is None:
                parts[name] = (None, None)
                continue
            keep = lookup[labels.cpu()] >= 0
            parts[name] = (images[keep.to(images.device)], lookup[labels.cpu()[keep]].to(labels.device))
        return ImageData(*parts["train"], *parts["test"], [self.classes[c] for c in classes], self.mean, self.std,
                         *parts["val"])

    def holdout(self, fraction: float, seed: int) -> tuple[ImageData, torch.Tensor, torch.Tensor]:
        """Move ``fraction`` of each class's training samples to a validation set.

        Returns (data without them, validation images, validation labels); the test split is
        untouched, so choices made on the validation set never see test data."""
        generator = torch.Generator().manual_seed(seed)
        held = torch.zeros(len(self.train_labels), dtype=torch.bool)
        labels = self.train_labels.cpu()
        for c in range(self.num_classes):
            idx = (labels == c).nonzero().flatten()
            take = min(int(round(len(idx) * fraction)), len(idx) - 1)  # keep one to train on
            held[idx[torch.randperm(len(idx), generator=generator)[:take]]] = True
        held = held.to(self.train_images.device)
        rest = ImageData(self.train_images[~held], self.train_labels[~held], self.test_images,
                         self.test_labels, self.classes, self.mean, self.std)
        return rest, self.train_images[held], self.train_labels[held]

    def with_validation(self, fraction: float, seed: int) -> ImageData:
        """The same data with ``fraction`` of each class's training samples moved to ``val_*``."""
        rest, val_images, val_labels = self.holdout(fraction, seed)
        rest.val_images, rest.val_labels = val_images, val_labels
        return rest

    def to(self, device) -> ImageData:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ImageData(move(self.train_images), move(self.train_labels), move(self.test_images),
                         move(self.test_labels), self.classes, move(self.mean), move(self.std),
                         move(self.val_images), move(self.val_labels))


def place_data(data: ImageData, device: torch.device, resident: bool | str = "auto") -> ImageData:
    """The data where training reads it: on ``device`` (``resident``), so batches, normalisation and
    augmentation run there and no step copies images from the host; or in host memory, each batch
    copied to the device by the step. ``"auto"``: on the device when it is a CPU, or a GPU whose free
    memory holds the uint8 images twice over. Batches are the same either way (same CPU generator)."""
    if resident not in (True, False, "auto"):
        raise ValueError(f"device_resident must be true, false or auto, got {resident!r}")
    if resident == "auto":
        resident = True
        if device.type == "cuda":
            tensors = [data.train_images, data.test_images, data.val_images]
            needed = sum(t.numel() * t.element_size() for t in tensors if t is not None)
            resident = 2 * needed <= torch.cuda.mem_get_info(device)[0]
    return data.to(device if resident else torch.device("cpu"))


def validate_classes(classes: list[int], num_classes: int) -> None:
    bad = [c for c in classes if not (isinstance(c, int) and 0 <= c < num_classes)]
    if bad:
        raise ValueError(f"target classes {bad} are out of range: classes are 0..{num_classes - 1}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"target classes {classes} repeat a class")
    if len(classes) < 2:
        raise ValueError(f"a sub-task needs at least 2 classes, got {classes}")


def iterate_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                    mean: torch.Tensor, std: torch.Tensor, shuffle: bool = False,
                    augment: bool = False, seed: int = 0, drop_last: bool = False,
                    rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float batches. ``batch_size`` is the global batch; with ``world_size`` > 1 each
    rank yields its contiguous slice of every global batch. Order and augmentation depend only
    on ``seed``, so every rank (and a single process) agrees on the global batch."""
    n = len(labels)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    starts = range(0, stop, batch_size)
    if augment:  # drawn batch by batch, in the order earlier versions drew them, then moved at once
        draws = [(torch.randint(0, 9, (min(batch_size, n - i), 2), generator=generator),
                  torch.rand(min(batch_size, n - i), generator=generator) < 0.5) for i in starts]
        offsets = torch.cat([o for o, _ in draws]).to(images.device) if draws else None
        flips = torch.cat([f for _, f in draws]).to(images.device) if draws else None
    # One host-to-device copy per epoch, not one per batch (each a sync on a GPU).
    order = order.to(images.device)
    for start in starts:
        count = min(batch_size, n - start)
        lo, hi = start + rank * count // world_size, start + (rank + 1) * count // world_size
        index = order[lo:hi]
        x = images[index].to(torch.float32).div_(255)
        if augment:
            x = _crop_and_flip(x, offsets[lo:hi], flips[lo:hi])
        x = (x - mean[:, None, None]) / std[:, None, None]
        yield x, labels[index]


def _crop_and_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int = 4) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (n, h)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (n, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # (n, h, w, C) after advanced indexing over batch, rows and cols; back to (n, C, h, w).
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def cache_dir() -> Path:
    return Path(os.environ.get("MWT_RAY_CACHE", Path.home() / ".cache" / "mwt_ray"))


def load_dataset(name: str, root: str | None = None, download: bool = False,
                 image_size: int = 32, train_limit: int | None = None) -> ImageData:
    """Load a dataset by name (see module docstring); ``train_limit`` keeps a class-balanced prefix."""
    if name == "digits":
        data = _digits(image_size)
    elif name in ("cifar10", "svhn"):
        data = _torchvision(name, root, download)
    elif name == "folder":
        data = _folder(root, image_size)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if train_limit:
        data = _limit(data, train_limit)
    return data


def _limit(data: ImageData, limit: int) -> ImageData:
    per_class = max(1, limit // data.num_classes)
    keep = torch.cat([(data.train_labels == c).nonzero().flatten()[:per_class] for c in range(data.num_classes)])
    keep = keep.sort().values
    return ImageData(data.train_images[keep], data.train_labels[keep], data.test_images, data.test_labels, data.classes)


def _digits(image_size: int) -> ImageData:
    """scikit-learn's digits at ``image_size``, split 80/20 by class, cached after the first call
    (importing scikit-learn costs seconds in every training process, Ray worker and trial)."""
    from importlib.metadata import version

    cached = cache_dir() / f"digits-{image_size}-sklearn-{version('scikit-learn')}.pt"
    try:
        state = torch.load(cached, weights_only=True)
        return ImageData(*(state[k] for k in ("train_images", "train_labels", "test_images", "test_labels")),
                         [str(d) for d in range(10)])
    except Exception:  # not made yet, from another version, or damaged: build it again
        pass
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).to(torch.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0,
                                           stratify=labels.numpy())
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    data = ImageData(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                     [str(d) for d in range(10)])
    try:
        atomic_torch_save({"train_images": data.train_images, "train_labels": data.train_labels,
                           "test_images": data.test_images, "test_labels": data.test_labels}, cached)
    except OSError:  # a read-only or full cache folder: the data is still good, only not kept
        pass
    return data


def _torchvision(name: str, root: str | None, download: bool) -> ImageData:
    import torchvision

    if root is None:
        raise ValueError(f"dataset {name!r} needs data.root: the folder that holds (or will hold) its files")
    folder = Path(root).expanduser()
    _refuse_special_file(folder, f"the folder of {name}'s files")
    if folder.exists() and not folder.is_dir():  # also keeps the clean-up below from touching a user's file
        raise ValueError(f"data path {str(folder)!r} is a file, not the folder of {name}'s files; set data.root")
    before = set(folder.iterdir()) if folder.is_dir() else None
    try:
        if name == "cifar10":
            parts = [torchvision.datasets.CIFAR10(root, train=t, download=download) for t in (True, False)]
            arrays = [
                (torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(p.targets)) for p in parts
            ]
            classes = parts[0].classes
        else:
            parts = [torchvision.datasets.SVHN(root, split=s, download=download) for s in ("train", "test")]
            arrays = [(torch.from_numpy(p.data), torch.from_numpy(p.labels).to(torch.int64)) for p in parts]
            classes = [str(d) for d in range(10)]
    except Exception as error:  # no network, a half-downloaded archive, a corrupt file
        _remove_new_entries(folder, before)
        reason = error_line(error, 300)
        if download:
            raise ValueError(f"{name} could not be downloaded to {root!r} ({reason}); this machine may have no "
                             "network: copy the dataset files there and set data.download=false, or use dataset "
                             "'folder' with an image-folder copy") from None
        raise ValueError(f"{name} not found under {root!r} ({reason}); set data.download=true on a machine "
                         "with a network, or use dataset 'folder' with an image-folder copy") from None
    return ImageData(*arrays[0], *arrays[1], list(classes))


def _remove_new_entries(folder: Path, before: set | None) -> None:
    """Undo what a failed download created: the folder itself when it did not exist, else its new entries."""
    if before is None:
        shutil.rmtree(folder, ignore_errors=True)
    elif folder.is_dir():
        for entry in set(folder.iterdir()) - before:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _refuse_special_file(path: Path, wanted: str) -> None:
    """Raise ValueError when ``path`` is neither a folder nor a regular file: a device (/dev/zero reads
    zeros forever, /dev/null nothing), a named pipe (opening it waits for a writer), a socket."""
    if path.exists() and not path.is_dir() and not path.is_file():
        kind = ("a device file" if path.is_char_device() or path.is_block_device() else
                "a named pipe (FIFO)" if path.is_fifo() else "a socket" if path.is_socket() else "a special file")
        raise ValueError(f"data path {str(path)!r} is {kind}, not {wanted}; set data.root")


def _folder(root: str | None, image_size: int) -> ImageData:
    if root is None:
        raise ValueError("dataset 'folder' needs data.root: a folder with train/<class>/ and test/<class>/")
    path = Path(root).expanduser()
    if not path.exists():
        raise ValueError(f"data path {str(path)!r} does not exist")
    _refuse_special_file(path, "a folder with train/ and test/ or a tar archive of one")
    if path.is_dir():
        return _decode_folder(path, image_size)
    path, undo = _extract_archive(path)
    try:
        return _decode_folder(path, image_size)
    except ValueError:  # an archive of unusable contents: its extraction is not kept either
        undo()
        raise


def _decode_folder(path: Path, image_size: int) -> ImageData:
    splits = {s: path / s for s in ("train", "test")}
    if not all(p.is_dir() for p in splits.values()):
        inner = [p for p in path.iterdir() if p.is_dir() and (p / "train").is_dir()]
        if len(inner) == 1:
            splits = {s: inner[0] / s for s in ("train", "test")}
        else:
            raise ValueError(f"{str(path)!r} has no train/ and test/ sub-folders of class folders")
    classes = sorted(p.name for p in splits["train"].iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{str(splits['train'])!r} holds no class folders")
    test_classes = sorted(p.name for p in splits["test"].iterdir() if p.is_dir())
    if test_classes != classes:
        extra, missing = sorted(set(test_classes) - set(classes)), sorted(set(classes) - set(test_classes))
        raise ValueError(f"the test split's classes differ from the training split's in {str(path)!r}: "
                         + "; ".join(part for part in (f"only in test/: {extra}" if extra else "",
                                                       f"missing from test/: {missing}" if missing else "") if part))
    files = {s: sorted((c, f) for c in classes for f in (d / c).glob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
             for s, d in splits.items()}
    for split, items in files.items():
        special = next((splits[split] / c / f.name for c, f in items if not f.is_file()), None)
        if special is not None:  # a pipe would block the decoder, a device feed it forever
            _refuse_special_file(special, "an image file")
            raise ValueError(f"{str(special)!r} is not an image file (a folder?); remove it or rename it")
        if not items:
            raise ValueError(f"{str(splits[split])!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    cached = cache_dir() / "folders" / f"{_fingerprint(path, image_size, files)}.pt"
    if cached.exists():
        try:
            state = torch.load(cached, weights_only=True)
            return ImageData(state["train_images"], state["train_labels"], state["test_images"],
                             state["test_labels"], classes)
        except Exception:  # a cache file from another version, or damaged: decode again
            pass
    print(
        f"decoding {len(files['train'])} + {len(files['test'])} images from {path} (once; cached at {cached})",
        flush=True,
    )
    paths = [splits[s] / c / f.name for s in ("train", "test") for c, f in files[s]]
    images = _decode_all(paths, image_size, what=f"decoding {path.name}")
    n_train = len(files["train"])
    labels = {s: torch.tensor([classes.index(c) for c, _ in files[s]], dtype=torch.int64) for s in files}
    # Built (and so validated: every class has training samples) before anything is cached.
    data = ImageData(images[:n_train], labels["train"], images[n_train:], labels["test"], classes)
    atomic_torch_save({"train_images": data.train_images, "train_labels": data.train_labels,
                       "test_images": data.test_images, "test_labels": data.test_labels}, cached)
    return data


def _fingerprint(path: Path, image_size: int, files: dict) -> str:
    """Key of the decoded-image cache: the folder, the image size and every file's name, size and mtime,
    so replacing, adding or removing an image decodes again."""
    digest = hashlib.sha1(f"{path.resolve()}|{image_size}".encode())
    for split, items in files.items():
        for c, f in items:
            info = f.stat()
            digest.update(f"{split}/{c}/{f.name}|{info.st_size}|{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _decode_all(paths: list[Path], image_size: int, what: str = "decoding images") -> torch.Tensor:
    from PIL import Image

    from .progress import progress

    def decode(p: Path) -> np.ndarray:
        try:
            with Image.open(p) as image:
                image = image.convert("RGB")
                if image.size != (image_size, image_size):
                    image = image.resize((image_size, image_size), Image.BILINEAR)
                return np.asarray(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            # PIL warns above MAX_IMAGE_PIXELS and refuses above twice that; either way the file is bad
            # input (a warning would also be a second stderr line, and decoding it takes gigabytes).
            raise ValueError(f"image {str(p)!r} is too large to decode ({error_line(error, 300)}); "
                             f"PIL refuses images of more than "
                             f"{Image.MAX_IMAGE_PIXELS} pixels (Image.MAX_IMAGE_PIXELS): remove or shrink it"
                             ) from None
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot decode image {str(p)!r}: {error_line(error, 300)}") from None

    if not paths:
        raise ValueError("an image folder split holds no images")

    # The warning becomes an exception, caught above. Set here, in the thread that waits for the
    # pool, so the filter holds while every decoding thread runs and is undone afterwards.
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        arrays = list(progress(pool.map(decode, paths, chunksize=256), len(paths), what))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _extract_archive(archive: Path) -> tuple[Path, Callable[[], None]]:
    """The archive's contents, extracted once into the cache; and a function that removes what this
    call extracted (nothing when the extraction was there already)."""
    digest = hashlib.sha1(
        f"{archive.resolve()}|{archive.stat().st_size}|{archive.stat().st_mtime_ns}".encode()
    ).hexdigest()[:16]
    target = cache_dir() / "archives" / digest
    if target.exists():
        return target, lambda: None
    try:
        tar = tarfile.open(archive)
    except Exception as error:  # not a tar at all: nothing is created
        reason = ("not a .tar, .tar.gz, .tar.bz2 or .tar.xz file" if isinstance(error, tarfile.ReadError)
                  else error_line(error, 300))
        raise ValueError(f"data path {str(archive)!r} is a file but not a readable tar archive ({reason})") from None
    created = [p for p in (cache_dir(), target.parent) if not p.exists()]

    def undo(also: Path | None = None) -> None:
        if also is not None:
            shutil.rmtree(also, ignore_errors=True)
        for folder in reversed(created):
            try:
                folder.rmdir()  # only if empty: another job may have put something there meanwhile
            except OSError:
                pass

    print(f"extracting {archive} to {target} (once)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=target.parent))
    try:
        with tar:
            tar.extractall(staging, filter="data")
        staging.rename(target)  # atomic; a concurrent extraction that finished first wins
    except BaseException as error:  # a truncated or corrupt archive, a full disk, Ctrl-C: leave nothing
        shutil.rmtree(staging, ignore_errors=True)
        if target.exists():
            return target, lambda: None
        undo()
        if not isinstance(error, Exception):
            raise
        raise ValueError(f"data path {str(archive)!r} is a damaged or truncated tar archive "
                         f"({type(error).__name__}: {error_line(error, 300)})") from None
    return target, lambda: undo(target)
