"""MNIST as in-memory tensors: load once, split once, batch by index slices.

The four IDX files ship gzip-compressed in `data/mnist/` with their SHA-256 sums. They are checked, unpacked
into torchvision's layout (`<data_dir>/MNIST/raw/`) and read by `torchvision.datasets.MNIST`, which downloads
nothing when the files are there; later loads read regsweep's own copy of the tensors
(`<data_dir>/MNIST/processed/regsweep-tensors.pt`, load_raw). Any
other `data_dir` goes through torchvision's own download path.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # over the 60k training images; the usual constants
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SPLIT_SEED = 0  # the validation split is fixed for every run, whatever its training seed


class DataError(RuntimeError):
    """Missing or corrupted data; the message names the file and the fix."""


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # float32, N x 1 x 28 x 28, normalised
    y: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: str | torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class MnistSplits:
    train: Split
    val: Split
    test: Split
    source: str  # where the files were read from, for the MLflow dataset record

    def sizes(self) -> dict[str, int]:
        return {"n_train": len(self.train), "n_val": len(self.val), "n_test": len(self.test)}

    def to(self, device: str | torch.device) -> MnistSplits:
        """All three splits on `device`: moved once, then every batch is a slice of device memory."""
        return MnistSplits(self.train.to(device), self.val.to(device), self.test.to(device), self.source)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_sums(path: Path) -> dict[str, str]:
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            sums[Path(name).name] = digest
    return sums


def prepare_vendored(data_dir: Path) -> None:
    """Check the vendored .gz files against SHA256SUMS and unpack them where torchvision looks."""
    vendored = data_dir / "mnist"
    sums = _read_sums(vendored / "SHA256SUMS")
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        gz = vendored / f"{name}.gz"
        if not gz.is_file():
            raise DataError(f"missing {gz}; restore it with `git checkout -- {gz}` or pass --download")
        if _sha256(gz) != sums.get(gz.name):
            raise DataError(f"checksum mismatch for {gz}: the file is corrupted; restore it with "
                            f"`git checkout -- {gz}`")
        target = raw / name
        # Unpack once (again where the .gz is newer or the file is empty). Written aside and renamed, so that an
        # interrupted unpack leaves no half-written file here.
        if not target.is_file() or target.stat().st_mtime < gz.stat().st_mtime or target.stat().st_size == 0:
            tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")  # parallel workers may unpack too
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(target)


def check_available(data_dir: str | Path, download: bool = False) -> None:
    """Raise DataError unless MNIST can be read from `data_dir` (vendored files are checked and unpacked)."""
    data_dir = Path(data_dir)
    if (data_dir / "mnist" / "SHA256SUMS").is_file():
        try:
            prepare_vendored(data_dir)
        except (OSError, ValueError) as exc:  # an unreadable SHA256SUMS, MNIST/ taken by a file, a full disk...
            raise DataError(f"cannot prepare the MNIST files in {data_dir}: {type(exc).__name__}: {exc}") from None
    elif not download and not all((data_dir / "MNIST" / "raw" / n).is_file() for n in FILES):
        raise DataError(f"no MNIST in {data_dir}: expected {data_dir}/mnist/*.gz with SHA256SUMS (as in the "
                        f"repository's data/) or {data_dir}/MNIST/raw/; pass --download to fetch it")


def load_raw(data_dir: str | Path, download: bool = False) -> tuple[torch.Tensor, ...]:
    """uint8 images and int64 labels for the 60k training and 10k test sets.

    Read by torchvision the first time, then from a tensor file beside the raw files: importing torchvision
    (its models and ops come with any of its modules) costs a fresh process more than a second, every
    training run, sweep worker and completion process pays it, and reading the tensors back takes
    milliseconds. The file is rewritten whenever a raw file is newer than it.
    """
    data_dir = Path(data_dir)
    check_available(data_dir, download)
    cached = read_cache(data_dir)
    if cached is not None:
        check_labels(data_dir, cached)  # also a tensor file written before labels were checked
        return cached
    from torchvision.datasets import MNIST  # heavy import, kept out of `regsweep --help`

    try:
        train = MNIST(str(data_dir), train=True, download=download)
        test = MNIST(str(data_dir), train=False, download=download)
    except Exception as exc:  # noqa: BLE001 - whatever damaged files make torchvision's reader raise
        # On one line: a failed --download lists every mirror it tried, and each one's error, on lines of their own.
        raise DataError(f"cannot read MNIST from {data_dir}: {type(exc).__name__}: {' '.join(str(exc).split())}") \
            from None
    tensors = (train.data, train.targets, test.data, test.targets)
    shapes = [tuple(t.shape) for t in tensors]
    if shapes != [(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)]:
        raise DataError(f"the MNIST files in {data_dir} are not 60,000 training and 10,000 test images of 28 x 28 "
                        f"with their labels (read: {shapes})")
    check_labels(data_dir, tensors)
    write_cache(data_dir, tensors)
    return tensors


def check_labels(data_dir: Path, tensors: tuple[torch.Tensor, ...]) -> None:
    """A label past the 10 classes would fail only in the first step's loss, after the run began."""
    labels = torch.cat([tensors[1], tensors[3]])
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"the MNIST labels in {data_dir} are not digits 0-9 (read {labels.min()} to "
                        f"{labels.max()}): the label files are damaged; restore them")


def cache_path(data_dir: Path) -> Path:
    return data_dir / "MNIST" / "processed" / "regsweep-tensors.pt"


def read_cache(data_dir: Path) -> tuple[torch.Tensor, ...] | None:
    """The cached tensors, or None where there are none or a raw file is newer (or unreadable)."""
    path = cache_path(data_dir)
    try:
        written = path.stat().st_mtime
        if any((data_dir / "MNIST" / "raw" / name).stat().st_mtime > written for name in FILES):
            return None
        tensors = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - missing, or damaged in any way torch.load can meet: read afresh
        return None
    return tuple(tensors) if isinstance(tensors, (tuple, list)) and len(tensors) == 4 else None


def write_cache(data_dir: Path, tensors: tuple[torch.Tensor, ...]) -> None:
    """Best effort (a read-only data folder just goes without): written aside, then renamed, so that
    parallel workers never read half a file."""
    path = cache_path(data_dir)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tuple(t.contiguous() for t in tensors), tmp)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 28 x 28 -> float32 N x 1 x 28 x 28 with the training set's mean and std."""
    return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def split_indices(n: int, val_size: int, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed permutation of range(n) cut into (train, val); the same for every run."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


def load_mnist(data_dir: str | Path, val_size: int = 5000, max_train_samples: int = 0,
               max_eval_samples: int = 0, download: bool = False) -> MnistSplits:
    """Read, normalise and split MNIST once; every later step slices these tensors."""
    train_images, train_labels, test_images, test_labels = load_raw(data_dir, download)
    train_idx, val_idx = split_indices(len(train_labels), val_size)
    if max_train_samples:
        train_idx = train_idx[:max_train_samples]
    test_idx = torch.arange(len(test_labels))
    if max_eval_samples:
        val_idx, test_idx = val_idx[:max_eval_samples], test_idx[:max_eval_samples]
    return MnistSplits(
        train=Split(normalise(train_images[train_idx]), train_labels[train_idx]),
        val=Split(normalise(train_images[val_idx]), train_labels[val_idx]),
        test=Split(normalise(test_images[test_idx]), test_labels[test_idx]),
        source=str(Path(data_dir).resolve()),
    )


def load_for(cfg) -> MnistSplits:
    """The splits a TrainConfig describes (its data_dir, val_size, max_*_samples and download)."""
    return load_mnist(cfg.resolved_data_dir(), cfg.val_size, cfg.max_train_samples, cfg.max_eval_samples,
                      cfg.download)


def batches(split: Split, batch_size: int):
    """Yield (x, y) mini-batches in order, as slices of the in-memory tensors (evaluation; training draws
    shuffled index batches with shuffled_batches and gathers them inside its step)."""
    for i in range(0, len(split), batch_size):
        yield split.x[i:i + batch_size], split.y[i:i + batch_size]


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches as index tensors on the generator's device (the last one may be short)."""
    return list(torch.randperm(n, generator=generator, device=generator.device).split(batch_size))


def rotate_batch(x: torch.Tensor, max_degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate every image in the batch by its own angle in [-max_degrees, max_degrees], in one call.

    Pixels rotated in from outside the frame take the background value, as torchvision's RandomRotation
    does with fill=0 before normalisation.
    """
    angles = (torch.rand(x.shape[0], generator=generator, device=x.device) * 2 - 1) * math.radians(max_degrees)
    cos, sin = torch.cos(angles), torch.sin(angles)
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    background = -MNIST_MEAN / MNIST_STD
    return F.grid_sample(x - background, grid, align_corners=False) + background
