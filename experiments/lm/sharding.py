"""Data parallelism with FSDP-sharded parameters for the byte-level LM.

One mesh axis (`"data"` by default) carries both the batch and the
parameters: the batch is split over it along its leading axis, and every
parameter leaf is split over it along its largest axis whose size is a
multiple of the mesh axis size (replicated when there is none). The
optimizer state is sharded by the same rule, so Adam's moments sit where
their parameters do; RGFT's per-component vectors (error map, multipliers)
and the step counters are small and usually replicated.

Everything runs under `jax.jit` with explicit `NamedSharding`s (no pmap, no
shard_map): XLA gathers each parameter where it is used and reduces its
gradient back to the shards, so a step computes the same function as on one
device, up to float rounding.

>>> import jax
>>> from flax import nnx
>>> import rgft_jax
>>> from experiments.lm import model as lm
>>> cfg = lm.Config(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
>>> model = lm.Transformer(cfg, rngs=nnx.Rngs(0))
>>> tracker = rgft_jax.ErrorTracker(model, select=branch_select)
>>> comps = tracker.components(model, jax.numpy.zeros((1, 8), "int32"))
>>> mesh = make_mesh(1)  # All devices by default.
>>> model = shard_model(model, mesh)
>>> optimizer = shard_model(
...   nnx.Optimizer(model, rgft_jax.rgft(1e-3, comps), wrt=nnx.Param), mesh
... )
>>> step = rgft_train_step(model, optimizer, tracker, comps, mesh)
>>> loss = step(model, optimizer, jax.numpy.zeros((4, 9), "int32"))
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rgft_jax
from experiments.lm import model as lm

DATA = "data"


def branch_select(path: tuple[str, ...], module: Any) -> bool:
  """The tracker's `select`: each block's attention and MLP branch."""
  del module
  return bool(path) and path[-1] in ("attn", "mlp")


def make_mesh(axis_size: int | None = None, axis_name: str = DATA) -> Mesh:
  """A 1-D mesh of the first `axis_size` devices (all by default), `Auto` axis.

  `jax.make_mesh` makes `Explicit` axes by default, where shardings are part
  of array types and the model would have to say how to shard each gather
  and contraction with a sharded operand; with `Auto` axes XLA (GSPMD) inserts
  the collectives.
  """
  n = jax.device_count() if axis_size is None else axis_size
  return jax.make_mesh(
    (n,), (axis_name,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n]
  )


def _check_auto(mesh: Mesh) -> None:
  explicit = [
    name
    for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
    if kind != AxisType.Auto
  ]
  if explicit:
    raise ValueError(
      f"Mesh axes {explicit} are not AxisType.Auto; the LM does not annotate "
      "shardings for explicit axes. Build the mesh with `make_mesh` here, or "
      "`jax.make_mesh(..., axis_types=(AxisType.Auto,))`."
    )


def fsdp_spec(shape: tuple[int, ...], axis_size: int, axis_name: str = DATA) -> P:
  """`axis_name` on the largest axis of `shape` divisible by `axis_size`.

  Ties go to the first such axis; with no axis of size >= `axis_size` that
  it divides (a scalar, a bias of 4), the leaf is replicated: `P()`.

  >>> fsdp_spec((2, 32, 4, 8), 8)
  P(None, 'data', None, None)
  >>> fsdp_spec((32, 256), 8), fsdp_spec((4,), 8), fsdp_spec((), 8)
  (P(None, 'data'), P(), P())
  """
  if axis_size < 1:
    raise ValueError(f"axis_size must be positive, got {axis_size}.")
  fits = [
    (size, -axis)
    for axis, size in enumerate(shape)
    if size >= axis_size and size % axis_size == 0
  ]
  if not fits:
    return P()
  axis = -max(fits)[1]
  return P(*(axis_name if i == axis else None for i in range(len(shape))))


def fsdp_shardings(tree: Any, mesh: Mesh, axis_name: str = DATA) -> Any:
  """A `NamedSharding` per array leaf of `tree` (an `nnx.State`, say), by `fsdp_spec`."""
  _check_auto(mesh)
  size = mesh.shape[axis_name]
  return jax.tree.map(
    lambda x: NamedSharding(mesh, fsdp_spec(x.shape, size, axis_name)), tree
  )


def batch_sharding(mesh: Mesh, axis_name: str = DATA) -> NamedSharding:
  """The batch's sharding: its leading axis split over `axis_name`."""
  _check_auto(mesh)
  return NamedSharding(mesh, P(axis_name))


def shard_model(model: Any, mesh: Mesh, axis_name: str = DATA) -> Any:
  """Puts the state of an NNX object on `mesh`, FSDP-style; returns the object.

  Works on the model and on an `nnx.Optimizer` alike (shard it after it is
  built: its moments then get their parameters' shardings). The object is
  updated in place.
  """
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, fsdp_shardings(state, mesh, axis_name)))
  return model


def rgft_train_step(
  model: nnx.Module,
  optimizer: nnx.Optimizer,
  tracker: rgft_jax.ErrorTracker,
  components: rgft_jax.Components,
  mesh: Mesh | None = None,
  *,
  loss_fn: Callable[..., Any] = lm.loss,
  axis_name: str = DATA,
) -> Callable[[nnx.Module, nnx.Optimizer, jax.Array], jax.Array]:
  """A jitted RGFT step `step(model, optimizer, tokens) -> loss`.

  It updates `model` and `optimizer` (an `nnx.Optimizer` over `rgft_jax.rgft`)
  in place, like `rgft_jax.detachable_step` under `nnx.jit`, but through `jax.jit`
  with explicit shardings when `mesh` is given: `tokens` [B, T+1] split over
  `axis_name` along B (B must be a multiple of the axis size), and the state
  of model and optimizer in and out by `fsdp_shardings` (pass them through
  `shard_model` first, or the first call moves them). Without `mesh`,
  a plain `jax.jit` step on the default device. The loss is the replicated
  batch mean.

  Args:
    model: the `lm.Transformer` (or any model `loss_fn` takes); its graph
      structure is fixed here, only its state changes between calls.
    optimizer: `nnx.Optimizer(model, rgft_jax.rgft(...), wrt=nnx.Param)`.
    tracker: `rgft_jax.ErrorTracker` of the model.
    components: `tracker.components(...)`, the ones the optimizer's RGFT uses.
    mesh: the device mesh, or None.
    loss_fn: `loss_fn(model, tokens) -> (loss, aux)`, the batch-mean loss.
    axis_name: the mesh axis of batch and parameter shards.
  """
  inner = rgft_jax.detachable_step(tracker, None, loss_fn, components, has_aux=True)
  graphdef, state = nnx.split((model, optimizer))
  if mesh is None:
    shardings = {}
  else:
    state_sharding = fsdp_shardings(state, mesh, axis_name)
    shardings = dict(
      in_shardings=(state_sharding, batch_sharding(mesh, axis_name)),
      out_shardings=(state_sharding, NamedSharding(mesh, P())),
    )

  @functools.partial(jax.jit, **shardings)
  def pure_step(state, tokens):
    model, optimizer = nnx.merge(graphdef, state)
    loss, _ = inner(model, optimizer, tokens)
    return nnx.state((model, optimizer)), loss

  def step(model, optimizer, tokens):
    new_state, loss = pure_step(nnx.state((model, optimizer)), tokens)
    nnx.update((model, optimizer), new_state)
    return loss

  step.jitted = pure_step  # For `.lower(...)`: the compiled HLO, say.
  return step
