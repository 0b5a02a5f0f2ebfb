"""Datasets as (train, test) tensor pairs, and seeded DataLoaders over them.

* ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 real images, no download), as
  1×8×8 or resized to any C×H×W (e.g. 3×32×32 for the CIFAR models); a fixed stratified split.
* ``mnist1d``: MNIST-1D (Greydanus 2020), 10 classes of 1-D signals of 40 samples, generated offline by the
  ``mnist1d`` package (``make_dataset`` with its default arguments and seed), 4,000 train / 1,000 test;
  shaped (1, 40) for the 1-D convnets (one channel) or (40,) (flat); the same tensors in every run.
* ``synthetic``: Gaussian images and uniform labels of any shape and class count (speed tests).
* ``cifar10``: the python-pickle batches of CIFAR-10 from a local directory; never downloads.

Images are float32; ``standardize`` subtracts the per-channel mean and divides by the per-channel
std of the training split (the papers' "normalized ... independently for each channel").
"""
from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pathfx import InputError, PathfxError

CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
SPLIT_SEED = 0  # the digits split is fixed: results of different runs are comparable
MNIST1D_LENGTH = 40
DATASETS = ("digits", "mnist1d", "synthetic", "cifar10")


@dataclass
class Data:
    name: str
    train: tuple[torch.Tensor, torch.Tensor]  # (images N×C×H×W float32, labels N int64)
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int

    @property
    def input_shape(self) -> tuple:
        """Shape of one batch of one example, as the zoo registry gives it."""
        return (1,) + tuple(self.train[0].shape[1:])

    def split(self, fraction: float = 0.2, seed: int = SPLIT_SEED) -> tuple["Data", "Data"]:
        """(train, validation): the training split cut in two, stratified by label, with a fixed seed;
        each is a Data whose ``test`` is the validation part (the learning rate is chosen on it, never
        on the test set)."""
        from sklearn.model_selection import train_test_split

        x, y = self.train
        keep, val = train_test_split(np.arange(len(y)), test_size=fraction, stratify=y.numpy(), random_state=seed)
        keep, val = torch.as_tensor(np.sort(keep)), torch.as_tensor(np.sort(val))
        return Data(self.name, (x[keep], y[keep]), (x[val], y[val]), self.num_classes), \
            Data(f"{self.name} validation", (x[val], y[val]), (x[val], y[val]), self.num_classes)

    def loaders(self, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        """(train, test) DataLoaders; the train order is a function of ``seed`` only, the test order is fixed."""
        g = torch.Generator().manual_seed(seed)
        train = DataLoader(TensorDataset(*self.train), batch_size=batch_size, shuffle=shuffle, generator=g,
                           drop_last=drop_last)
        return train, DataLoader(TensorDataset(*self.test), batch_size=batch_size, shuffle=False)


def _standardize(train: torch.Tensor, test: torch.Tensor):
    dims = [0] + list(range(2, train.dim()))
    mean = train.mean(dims, keepdim=True)
    std = train.std(dims, keepdim=True).clamp_min(1e-8)
    return (train - mean) / std, (test - mean) / std


def _resize(x: torch.Tensor, shape) -> torch.Tensor:
    c, h, w = shape
    if x.shape[2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if x.shape[1] != c:
        if x.shape[1] != 1:
            raise InputError(f"cannot map {x.shape[1]} channels to {c}")
        x = x.expand(-1, c, -1, -1)
    return x.contiguous()


def digits(shape=(1, 8, 8), test_fraction: float = 0.25, standardize: bool = True) -> Data:
    """scikit-learn's digits (pixel values 0..16 scaled to [0, 1]), resized bilinearly to ``shape`` (C, H, W;
    the grey channel repeated), split once, stratified by class, with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    i_train, i_test = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=d.target,
                                       random_state=SPLIT_SEED)
    x = _resize(x, tuple(shape))
    xs = (x[i_train], x[i_test])
    if standardize:
        xs = _standardize(*xs)
    return Data("digits", (xs[0], y[i_train]), (xs[1], y[i_test]), 10)


def mnist1d(shape=(1, MNIST1D_LENGTH), standardize: bool = True) -> Data:
    """MNIST-1D as the ``mnist1d`` package generates it with its defaults (5,000 signals, seed 42; train = the
    first 80 %, as the package splits), shaped ``shape``: (1, 40) or (40,). Standardized as one channel."""
    shape = tuple(shape)
    if shape not in ((1, MNIST1D_LENGTH), (MNIST1D_LENGTH,)):
        raise InputError(f"mnist1d signals have {MNIST1D_LENGTH} samples: shape (1, {MNIST1D_LENGTH}) for 1-D "
                         f"convnets or ({MNIST1D_LENGTH},) flat, not {shape}")
    d = _mnist1d_arrays()
    xs = [torch.tensor(d[k], dtype=torch.float32).unsqueeze(1) for k in ("x", "x_test")]
    if standardize:
        xs = _standardize(*xs)
    ys = [torch.tensor(d[k], dtype=torch.int64) for k in ("y", "y_test")]
    return Data("mnist1d", (xs[0].reshape((-1,) + shape), ys[0]), (xs[1].reshape((-1,) + shape), ys[1]), 10)


@lru_cache(maxsize=1)
def _mnist1d_arrays() -> dict:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds numpy's and random's global generators: the caller's draws must not change
    states = np.random.get_state(), random.getstate()
    try:
        return make_dataset(get_dataset_args())
    finally:
        np.random.set_state(states[0])
        random.setstate(states[1])


def synthetic(shape=(3, 32, 32), num_classes: int = 10, n_train: int = 512, n_test: int = 128,
              seed: int = 0) -> Data:
    """Standard-normal images with uniform random labels; the same seed gives the same tensors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n_train + n_test,) + tuple(shape), generator=g)
    y = torch.randint(0, num_classes, (n_train + n_test,), generator=g)
    return Data("synthetic", (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), num_classes)


def cifar_dir(root: str) -> str:
    """The directory holding the batches: ``root`` itself or its ``cifar-10-batches-py`` subdirectory."""
    for d in (root, os.path.join(root, "cifar-10-batches-py")):
        if all(os.path.isfile(os.path.join(d, f)) for f in CIFAR_TRAIN + CIFAR_TEST):
            return d
    missing = [f for f in CIFAR_TRAIN + CIFAR_TEST if not os.path.isfile(os.path.join(root, f))]
    raise PathfxError(f"CIFAR-10 not found in '{os.path.abspath(root)}' (nor in its cifar-10-batches-py/): "
                      f"looked for {', '.join(CIFAR_TRAIN + CIFAR_TEST)}; missing {', '.join(missing)}. "
                      "Nothing is downloaded: get the python version of CIFAR-10 "
                      "(cifar-10-python.tar.gz) and extract it there.")


def _read_batch(path: str):
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:
        raise PathfxError(f"'{path}' is not a CIFAR-10 python batch: {type(e).__name__}: {e}") from None
    return data, labels


def cifar10(root: str, standardize: bool = True, limit: int | None = None) -> Data:
    """CIFAR-10 from ``root`` (train = data_batch_1..5, test = test_batch), pixels in [0, 1] (then
    standardized per channel with the train statistics). ``limit`` keeps the first N images of each split:
    the full train split is 600 MB as float32."""
    d = cifar_dir(root)
    parts = {}
    for split, files in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST)):
        xs, ys = zip(*(_read_batch(os.path.join(d, f)) for f in files))
        x, y = np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]
        parts[split] = (torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y))
    (xtr, ytr), (xte, yte) = parts["train"], parts["test"]
    if standardize:
        xtr, xte = _standardize(xtr, xte)
    return Data("cifar10", (xtr, ytr), (xte, yte), 10)


def load(name: str, shape=None, root: str | None = None, seed: int = 0, **kw) -> Data:
    """``digits`` | ``mnist1d`` | ``synthetic`` | ``cifar10`` by name; ``shape`` is (C, H, W) for digits,
    (1, 40) or (40,) for mnist1d, any for synthetic."""
    if name == "digits":
        return digits(shape or (1, 8, 8), **kw)
    if name == "mnist1d":
        return mnist1d(shape or (1, MNIST1D_LENGTH), **kw)
    if name == "synthetic":
        return synthetic(shape or (3, 32, 32), seed=seed, **kw)
    if name == "cifar10":
        if not root:
            raise InputError("cifar10 needs the directory of its python batches (root)")
        return cifar10(root, **kw)
    raise InputError(f"unknown dataset '{name}': {', '.join(DATASETS)}")


def sample_batch(shape: tuple, n: int, source: str, seed: int):
    """(x, y): ``n`` digits resized to ``shape`` (C, H, W), or Gaussian inputs with no labels."""
    if source == "digits" and len(shape) == 3:
        d = digits(shape)
        x, y = d.train
        return x[:n], y[:n]
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + tuple(shape), generator=g), None


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, size: int | None = None, pad: int = 0,
                     flip: bool = True) -> torch.Tensor:
    """Training augmentation of a batch: zero-pad by ``pad``, crop ``size``×``size`` at a random place per
    image (pbn: 32 with pad 4; ENorm §6.2: 28 without pad), flip horizontally with probability 1/2."""
    n, _, h, w = x.shape
    size = size or h
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    i = torch.randint(0, h + 2 * pad - size + 1, (n,), generator=generator)
    j = torch.randint(0, w + 2 * pad - size + 1, (n,), generator=generator)
    rows = (i[:, None] + torch.arange(size))[:, None, :, None]
    cols = (j[:, None] + torch.arange(size))[:, None, None, :]
    out = x[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if flip:
        m = torch.rand(n, generator=generator) < 0.5
        out[m] = out[m].flip(-1)
    return out


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The test-time counterpart of ``random_crop_flip`` without padding (ENorm §6.2: 28×28 centre crops)."""
    h, w = x.shape[-2:]
    i, j = (h - size) // 2, (w - size) // 2
    return x[..., i:i + size, j:j + size]
