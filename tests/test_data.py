"""Datasets: digits (real, bundled), MNIST-1D (generated), synthetic, CIFAR-10 from a local directory."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from passes.errors import InputError, PathfxError
from lab import data


def test_digits_8x8_stratified_fixed_split():
    d = data.digits()
    (xtr, ytr), (xte, yte) = d.train, d.test
    assert xtr.shape[1:] == (1, 8, 8) and len(ytr) + len(yte) == 1797 and d.num_classes == 10
    assert len(yte) == 450  # 25 %
    # stratified: every class has the same share of the test split (to one image)
    share = torch.bincount(yte, minlength=10) / torch.bincount(torch.cat([ytr, yte]), minlength=10)
    assert float(share.max() - share.min()) < 0.02
    # standardized with the train statistics
    assert abs(float(xtr.mean())) < 1e-5 and abs(float(xtr.std()) - 1) < 1e-3
    again = data.digits()
    assert torch.equal(again.train[0], xtr) and torch.equal(again.test[1], yte)


def test_digits_upsampled_cifar_shape():
    d = data.digits((3, 32, 32), standardize=False)
    x = d.train[0]
    assert x.shape[1:] == (3, 32, 32) and d.input_shape == (1, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 2]) and 0 <= float(x.min()) and float(x.max()) <= 1
    small = data.digits(standardize=False).train[0]
    # bilinear resizing keeps the mean brightness of each image (4× per axis, no corners cut)
    assert torch.allclose(x[:, 0].mean((1, 2)), small[:, 0].mean((1, 2)), atol=0.02)


def test_mnist1d_generated_offline_fixed_and_standardized(monkeypatch):
    import requests

    def no_network(*a, **k):
        raise AssertionError("mnist1d must be generated, not downloaded")

    monkeypatch.setattr(requests, "get", no_network)
    data._mnist1d_arrays.cache_clear()
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    d = data.load("mnist1d")
    assert np.random.rand() == expected  # the generator's reseeding does not leak into the caller's draws
    (xtr, ytr), (xte, yte) = d.train, d.test
    assert xtr.shape == (4000, 1, 40) and xte.shape == (1000, 1, 40) and d.input_shape == (1, 1, 40)
    assert d.num_classes == 10 and torch.bincount(ytr, minlength=10).min() > 350  # 500 per class in all
    assert abs(float(xtr.mean())) < 1e-5 and abs(float(xtr.std()) - 1) < 1e-3
    data._mnist1d_arrays.cache_clear()
    flat = data.mnist1d((40,))  # generated again: the same signals, flattened
    assert flat.train[0].shape == (4000, 40) and torch.equal(flat.train[0], xtr.reshape(4000, 40))
    assert torch.equal(flat.test[1], yte)
    with pytest.raises(InputError, match="40 samples"):
        data.load("mnist1d", shape=(3, 32, 32))


def test_synthetic_seeded():
    a, b, c = data.synthetic((2, 5, 5), 3, 20, 6, seed=1), data.synthetic((2, 5, 5), 3, 20, 6, seed=1), \
        data.synthetic((2, 5, 5), 3, 20, 6, seed=2)
    assert a.train[0].shape == (20, 2, 5, 5) and a.test[1].shape == (6,) and int(a.train[1].max()) < 3
    assert torch.equal(a.train[0], b.train[0]) and not torch.equal(a.train[0], c.train[0])


def test_loaders_seeded():
    d = data.synthetic((4,), 2, 50, 10)
    order = lambda seed: torch.cat([y for _, y in d.loaders(8, seed=seed)[0]])  # noqa: E731
    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))
    test = torch.cat([y for _, y in d.loaders(8, seed=3)[1]])
    assert torch.equal(test, d.test[1])


def _fake_cifar(root, n=4):
    rng = np.random.default_rng(0)
    for i, name in enumerate(data.CIFAR_TRAIN + data.CIFAR_TEST):
        batch = {b"batch_label": name.encode(), b"labels": [(i + k) % 10 for k in range(n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_from_directory(tmp_path):
    _fake_cifar(tmp_path)
    d = data.cifar10(str(tmp_path), standardize=False)
    assert d.train[0].shape == (20, 3, 32, 32) and d.test[0].shape == (4, 3, 32, 32)
    with open(tmp_path / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.allclose(d.train[0][4], torch.tensor(raw[b"data"][0].reshape(3, 32, 32) / 255.0,
                                                      dtype=torch.float32))
    assert d.train[1][4:8].tolist() == raw[b"labels"]
    # the parent directory of cifar-10-batches-py works too; limit keeps the first images
    (tmp_path / "cifar-10-batches-py").mkdir()
    for f in data.CIFAR_TRAIN + data.CIFAR_TEST:
        (tmp_path / f).rename(tmp_path / "cifar-10-batches-py" / f)
    assert data.load("cifar10", root=str(tmp_path), limit=6).train[0].shape[0] == 6


def test_cifar10_missing_names_directory_and_files(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"")
    with pytest.raises(PathfxError) as e:
        data.cifar10(str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "data_batch_5" in msg and "test_batch" in msg
    _fake_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(PathfxError, match="test_batch"):
        data.cifar10(str(tmp_path))


def test_augmentation_shapes_and_centre_crop():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    assert data.random_crop_flip(x, g, pad=4).shape == x.shape
    out = data.random_crop_flip(x, g, size=28, flip=False)
    assert out.shape == (2, 3, 28, 28)
    # every crop is a contiguous window of its own image
    for k in range(2):
        i, j = divmod(int(out[k, 0, 0, 0] - x[k, 0, 0, 0]), 32)
        assert torch.equal(out[k], x[k, :, i:i + 28, j:j + 28])
    assert torch.equal(data.center_crop(x, 28), x[..., 2:30, 2:30])
