"""Dataset loaders: scikit-learn's shipped sets by default, MNIST / CIFAR-10 from disk via torchvision.

Every loader returns ``torch.utils.data.TensorDataset`` objects of float32 inputs and int64 labels,
so models, calibration and encrypted evaluation all see the same plain tensors. Nothing downloads
unless the caller passes ``download=True``.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from privml.errors import InvalidInput, MalformedInput

DATASETS = ("digits", "digits28", "breast_cancer", "mnist", "cifar10")

_MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"]}


def _check_test_size(test_size: float) -> None:
    if not 0.0 < test_size < 1.0:
        raise InvalidInput(f"test_size must be in (0, 1), got {test_size}")


def load_digits_split(
    seed: int = 0, test_size: float = 0.25, size: int = 8
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits as (N, 1, size, size) float32 in [0, 1], stratified train/test split.

    ``size`` other than 8 resizes with bilinear interpolation (``size=28`` gives MNIST-shaped input).
    The split depends only on ``seed`` and ``test_size``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_test_size(test_size)
    if not isinstance(size, int) or size < 1:
        raise InvalidInput(f"size must be a positive int, got {size!r}")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        images = images.clamp_(0.0, 1.0)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=bunch.target
    )
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return (
        TensorDataset(images[idx_train].contiguous(), labels[idx_train]),
        TensorDataset(images[idx_test].contiguous(), labels[idx_test]),
    )


def load_breast_cancer_split(seed: int = 0, test_size: float = 0.25) -> tuple[TensorDataset, TensorDataset]:
    """Wisconsin breast cancer: 30 features standardized with the TRAIN split's mean/std, int64 labels.

    Using train-only statistics keeps the test split unseen, as it would be in deployment.
    """
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    _check_test_size(test_size)
    bunch = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data, bunch.target, test_size=test_size, random_state=seed, stratify=bunch.target
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0

    def pack(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        feats = torch.from_numpy(((x - mean) / std).astype(np.float32))
        return TensorDataset(feats, torch.from_numpy(y.astype(np.int64)))

    return pack(x_train, y_train), pack(x_test, y_test)


def _require_files(folder: Path, names: Any, download: bool, what: str, loader: str, manual: str) -> None:
    """Clear error naming the missing files and both ways to get them (nothing downloads unless asked)."""
    missing = [name for name in names if not (folder / name).is_file()]
    if missing and not download:
        raise InvalidInput(
            f"{what} files missing under {folder}: {', '.join(missing)}. Pass download=True "
            f"(privml.data.{loader}(root, train, download=True)) or {manual}."
        )


def load_mnist(root: str | Path, train: bool, download: bool = False) -> TensorDataset:
    """MNIST from ``root/MNIST/raw/`` (uncompressed idx-ubyte files) as (N, 1, 28, 28) float32 in [0, 1].

    Goes through ``torchvision.datasets.MNIST`` (which downloads when ``download=True``); when only
    the requested split's two files are present, reads them with torchvision's idx reader.
    """
    import torchvision
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = Path(root) / "MNIST" / "raw"
    names = _MNIST_FILES[bool(train)]
    _require_files(raw, names, download, "MNIST", "load_mnist",
                   "put the uncompressed idx-ubyte files from https://yann.lecun.com/exdb/mnist/ (gunzipped) "
                   f"into {raw}")
    try:
        ds = torchvision.datasets.MNIST(str(root), train=bool(train), download=download)
        images, labels = ds.data, ds.targets
    except RuntimeError:
        # torchvision insists on all four files; read the requested split directly.
        try:
            images = read_image_file(str(raw / names[0]))
            labels = read_label_file(str(raw / names[1]))
        except Exception as exc:  # torchvision raises assorted errors on bad idx files
            raise MalformedInput(f"cannot read MNIST idx files in {raw}: {exc}") from exc
    if images.shape[0] != labels.shape[0]:
        raise MalformedInput(f"MNIST in {raw}: {images.shape[0]} images but {labels.shape[0]} labels")
    return TensorDataset(images.unsqueeze(1).float().div_(255.0), labels.long())


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: CIFAR batches hold nothing else, so nothing else runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise MalformedInput(f"CIFAR batch file references {module}.{name}; a data file never needs it")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """One python-pickled CIFAR-10 batch: dict with data uint8 (N, 3072) and labels (N,)."""
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except MalformedInput:
        raise
    except Exception as exc:
        raise MalformedInput(f"cannot unpickle CIFAR-10 batch {path}: {exc}") from exc
    if not isinstance(entry, dict):
        raise MalformedInput(f"CIFAR-10 batch {path} is not a dict")
    data = entry.get("data", entry.get(b"data"))
    labels = entry.get("labels", entry.get(b"labels"))
    if data is None or labels is None:
        raise MalformedInput(f"CIFAR-10 batch {path} lacks 'data' or 'labels'")
    data = np.asarray(data)
    shape_ok = data.ndim == 2 and data.shape[1] == 3 * 32 * 32 and len(labels) == data.shape[0]
    if data.dtype != np.uint8 or not shape_ok:
        raise MalformedInput(
            f"CIFAR-10 batch {path}: expected uint8 data (N, 3072) and N labels, "
            f"got {data.dtype} {data.shape} and {len(labels)} labels"
        )
    return data, [int(v) for v in labels]


def load_cifar10(root: str | Path, train: bool, download: bool = False) -> TensorDataset:
    """CIFAR-10 from ``root/cifar-10-batches-py/`` as (N, 3, 32, 32) float32 in [0, 1], int64 labels.

    Goes through ``torchvision.datasets.CIFAR10``; when its MD5 check fails (e.g. a subset or
    re-packed files in the same pickle format) the batches are read directly, with a warning.
    """
    import torchvision

    folder = Path(root) / _CIFAR_DIR
    names = _CIFAR_FILES[bool(train)]
    _require_files(folder, names, download, "CIFAR-10", "load_cifar10",
                   f"extract cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into {root}")
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=bool(train), download=download)
        data = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))  # NHWC -> NCHW
        labels = list(ds.targets)
    except RuntimeError as exc:
        warnings.warn(
            f"torchvision rejected the CIFAR-10 files in {folder} ({exc}); reading the batches directly "
            "without checksum verification",
            stacklevel=2,
        )
        parts = [_read_cifar_batch(folder / name) for name in names]
        data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        labels = [v for p in parts for v in p[1]]
    images = torch.from_numpy(data).float().div_(255.0)
    return TensorDataset(images, torch.tensor(labels, dtype=torch.int64))


def get_dataset(name: str, **kw: Any) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets by name: digits, digits28, breast_cancer, mnist, cifar10.

    Keyword arguments go to the loader: ``seed``/``test_size`` for the scikit-learn sets,
    ``root``/``download`` for MNIST and CIFAR-10.
    """
    allowed = {"root", "download"} if name in ("mnist", "cifar10") else {"seed", "test_size"}
    unknown = sorted(set(kw) - allowed)
    if name in DATASETS and unknown:
        raise InvalidInput(f"dataset {name!r} takes {sorted(allowed)}, not {unknown}")
    if name == "digits":
        return load_digits_split(**kw)
    if name == "digits28":
        return load_digits_split(size=28, **kw)
    if name == "breast_cancer":
        return load_breast_cancer_split(**kw)
    if name in ("mnist", "cifar10"):
        loader = load_mnist if name == "mnist" else load_cifar10
        if kw.get("root") is None:
            raise InvalidInput(f"dataset {name!r} needs root=<directory holding the files>")
        return loader(train=True, **kw), loader(train=False, **kw)
    raise InvalidInput(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
