"""Dataset loaders: built-in scikit-learn splits, and MNIST / CIFAR-10 files written here in their real formats."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_digits

from privml.data import (
    DATASETS,
    get_dataset,
    load_breast_cancer_split,
    load_cifar10,
    load_digits_split,
    load_mnist,
)
from privml.errors import InvalidInput, MalformedInput

# ---------------------------------------------------------------- digits


def test_digits_split_shapes_dtypes_range_and_content() -> None:
    train, test = load_digits_split()
    (xtr, ytr), (xte, yte) = train.tensors, test.tensors
    assert xtr.shape == (1347, 1, 8, 8) and xte.shape == (450, 1, 8, 8)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert float(xtr.min()) == 0.0 and float(xtr.max()) == 1.0
    # Together the splits are exactly the data set, pixels / 16, every sample once.
    bunch = load_digits()
    ours = torch.cat([xtr, xte]).flatten(1).numpy() * 16
    labels = torch.cat([ytr, yte]).numpy()
    order = np.lexsort(np.column_stack([labels, ours]).T)
    ref_order = np.lexsort(np.column_stack([bunch.target, bunch.data]).T)
    np.testing.assert_array_equal(ours[order], bunch.data[ref_order])
    np.testing.assert_array_equal(labels[order], bunch.target[ref_order])


def test_digits_split_is_stratified_and_deterministic() -> None:
    a_train, a_test = load_digits_split(seed=0)
    b_train, b_test = load_digits_split(seed=0)
    c_train, _ = load_digits_split(seed=1)
    assert torch.equal(a_train.tensors[0], b_train.tensors[0]) and torch.equal(a_test.tensors[1], b_test.tensors[1])
    assert not torch.equal(a_train.tensors[0], c_train.tensors[0])
    tr = torch.bincount(a_train.tensors[1], minlength=10).float() / len(a_train)
    te = torch.bincount(a_test.tensors[1], minlength=10).float() / len(a_test)
    assert (tr - te).abs().max() < 0.01
    small_train, small_test = load_digits_split(test_size=0.5)
    assert abs(len(small_train) - len(small_test)) <= 1


def test_digits28_is_the_same_split_upsampled() -> None:
    train8, test8 = load_digits_split()
    train28, test28 = load_digits_split(size=28)
    assert train28.tensors[0].shape == (1347, 1, 28, 28) and train28.tensors[0].dtype == torch.float32
    assert torch.equal(train8.tensors[1], train28.tensors[1]) and torch.equal(test8.tensors[1], test28.tensors[1])
    x28 = test28.tensors[0]
    assert float(x28.min()) >= 0.0 and float(x28.max()) <= 1.0
    # Shrinking back gives the 8x8 image again, up to interpolation blur (measured: 0.081, 0.970).
    back = F.interpolate(x28, size=(8, 8), mode="area")
    assert (back - test8.tensors[0]).abs().mean() < 0.1
    assert torch.corrcoef(torch.stack([back.flatten(), test8.tensors[0].flatten()]))[0, 1] > 0.95
    # ... and it is a different image from its neighbour's (guards against a shuffled order).
    assert torch.corrcoef(torch.stack([back.flatten(), test8.tensors[0].roll(1, 0).flatten()]))[0, 1] < 0.8


@pytest.mark.parametrize("kwargs", [{"test_size": 0.0}, {"test_size": 1.5}, {"size": 0}])
def test_digits_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(InvalidInput):
        load_digits_split(**kwargs)


# ---------------------------------------------------------------- breast cancer


def test_breast_cancer_standardized_with_train_statistics_only() -> None:
    train, test = load_breast_cancer_split()
    (xtr, ytr), (xte, yte) = train.tensors, test.tensors
    assert xtr.shape == (426, 30) and xte.shape == (143, 30)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64 and set(ytr.tolist()) == {0, 1}
    # Train split: mean 0, std 1 per feature.
    torch.testing.assert_close(xtr.double().mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-5, rtol=0)
    std = xtr.double().std(0, unbiased=False)
    torch.testing.assert_close(std, torch.ones(30, dtype=torch.float64), atol=1e-5, rtol=0)
    # Test split: the same affine map (so not re-standardized on its own), hence not exactly centred.
    assert xte.double().mean(0).abs().max() > 0.01
    raw = load_breast_cancer().data
    both = torch.cat([xtr, xte]).double().numpy()
    for j in range(30):
        z, x = np.sort(both[:, j]), np.sort(raw[:, j])
        slope, intercept = np.polyfit(x, z, 1)
        assert np.abs(slope * x + intercept - z).max() < 1e-4
    # Stratified: class balance agrees across splits.
    assert abs(ytr.float().mean() - yte.float().mean()) < 0.01


def test_breast_cancer_split_deterministic() -> None:
    a, _ = load_breast_cancer_split(seed=3)
    b, _ = load_breast_cancer_split(seed=3)
    c, _ = load_breast_cancer_split(seed=4)
    assert torch.equal(a.tensors[0], b.tensors[0]) and not torch.equal(a.tensors[0], c.tensors[0])


# ---------------------------------------------------------------- MNIST (idx-ubyte files)


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 0x00000803, n, rows, cols) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes())


def make_mnist(root: Path, n_train: int = 5, n_test: int = 3, splits: tuple[str, ...] = ("train", "t10k")) -> dict:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        if split in splits:
            write_idx_images(raw / f"{split}-images-idx3-ubyte", images)
            write_idx_labels(raw / f"{split}-labels-idx1-ubyte", labels)
        out[split] = (images, labels)
    return out


def test_mnist_reads_real_idx_files(tmp_path: Path) -> None:
    ref = make_mnist(tmp_path)
    for train, split in ((True, "train"), (False, "t10k")):
        ds = load_mnist(tmp_path, train=train)
        x, y = ds.tensors
        images, labels = ref[split]
        assert x.shape == (len(labels), 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
        torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 255, atol=0, rtol=0)
        assert y.tolist() == labels.tolist()
    train, test = get_dataset("mnist", root=str(tmp_path))
    assert len(train) == 5 and len(test) == 3


def test_mnist_with_only_the_requested_split(tmp_path: Path) -> None:
    ref = make_mnist(tmp_path, splits=("t10k",))
    x, y = load_mnist(tmp_path, train=False).tensors
    assert y.tolist() == ref["t10k"][1].tolist() and x.shape == (3, 1, 28, 28)
    with pytest.raises(InvalidInput, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, train=True)


def test_mnist_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="download=True") as info:
        load_mnist(tmp_path, train=True)
    assert str(tmp_path / "MNIST" / "raw") in str(info.value)
    assert not (tmp_path / "MNIST").exists()  # nothing downloaded or created


def test_mnist_truncated_file_is_malformed(tmp_path: Path) -> None:
    make_mnist(tmp_path, splits=("train",))
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MalformedInput):
        load_mnist(tmp_path, train=True)


# ---------------------------------------------------------------- CIFAR-10 (pickled batches)


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], str_keys: bool = False) -> None:
    entry = {b"batch_label": b"test", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * len(labels)}
    if str_keys:  # the python-2 pickles of the real download load with str keys under encoding="latin1"
        entry = {k.decode(): v for k, v in entry.items()}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def make_cifar(root: Path, per_batch: int = 2, str_keys: bool = False) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        write_cifar_batch(folder / name, data, labels, str_keys=str_keys)
        out[name] = (data, labels)
    return out


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar_reads_real_pickle_format(tmp_path: Path, str_keys: bool) -> None:
    ref = make_cifar(tmp_path, str_keys=str_keys)
    with pytest.warns(UserWarning, match="checksum"):
        train = load_cifar10(tmp_path, train=True)
    x, y = train.tensors
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    data = np.concatenate([ref[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = [v for i in range(1, 6) for v in ref[f"data_batch_{i}"][1]]
    assert y.tolist() == labels
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    i, c, h, w = 7, 2, 5, 30
    assert float(x[i, c, h, w]) == pytest.approx(data[i, c * 1024 + h * 32 + w] / 255.0)
    torch.testing.assert_close(x.flatten(1), torch.from_numpy(data).float() / 255, atol=0, rtol=0)
    with pytest.warns(UserWarning):
        test = load_cifar10(tmp_path, train=False)
    assert test.tensors[1].tolist() == ref["test_batch"][1]


def test_cifar_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(InvalidInput, match="data_batch_3") as info:
        load_cifar10(tmp_path, train=True)
    assert "download=True" in str(info.value)
    with pytest.warns(UserWarning):  # the test split is still complete
        assert len(load_cifar10(tmp_path, train=False)) == 2


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": [0]}, f)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(MalformedInput, match="system"), pytest.warns(UserWarning):
            load_cifar10(tmp_path, train=False)
    finally:
        os.chdir(cwd)
    assert not marker.exists()


def test_cifar_wrong_shape_is_malformed(tmp_path: Path) -> None:
    make_cifar(tmp_path)
    write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", np.zeros((2, 100), np.uint8), [0, 1])
    with pytest.raises(MalformedInput, match="3072"), pytest.warns(UserWarning):
        load_cifar10(tmp_path, train=False)


# ---------------------------------------------------------------- get_dataset


def test_get_dataset_names_and_errors(tmp_path: Path) -> None:
    assert set(DATASETS) == {"digits", "digits28", "breast_cancer", "mnist", "cifar10"}
    train, test = get_dataset("digits28", seed=1)
    assert train.tensors[0].shape[1:] == (1, 28, 28)
    assert torch.equal(train.tensors[1], load_digits_split(seed=1)[0].tensors[1])
    assert get_dataset("breast_cancer")[0].tensors[0].shape == (426, 30)
    with pytest.raises(InvalidInput, match="unknown dataset"):
        get_dataset("imagenet")
    with pytest.raises(InvalidInput, match="root"):
        get_dataset("mnist")
    with pytest.raises(InvalidInput, match="root"):
        get_dataset("digits", root=str(tmp_path))
    with pytest.raises(InvalidInput, match="download=True"):
        get_dataset("cifar10", root=str(tmp_path))
