"""How `ErrorTracker` calls a Linen or an NNX model: one small object each.

`backend(model)` picks the backend once. `bind` fixes a loss function and its
arguments and returns a `Bound`: the parameters to differentiate and a `call`
that runs the loss function on given parameters with every module call handed
to a handle; `model_call` turns `components(params, *inputs)`'s arguments into
such a loss function (the model called on the inputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax import nnx

from rgft_jax._intercept import Embed
from rgft_jax._intercept import Handle
from rgft_jax._intercept import Path
from rgft_jax._intercept import linen_head_projection
from rgft_jax._intercept import linen_run
from rgft_jax._intercept import nnx_head_projections
from rgft_jax._intercept import nnx_run

# make_handle(is_head_projection) -> the handle for one call of the model, given
# whether `(path, module)` is a flax attention's output projection.
MakeHandle = Callable[[Callable[[Path, Any], bool]], Handle]


@dataclasses.dataclass(frozen=True)
class Bound:
  """A loss function bound to its arguments.

  Attributes:
    params: the parameters it is differentiated with respect to (Linen: the
      params tree; NNX: the `nnx.State` of the model's `nnx.Param`s).
    call: `call(params, make_handle, embed)` runs the loss function on
      `params`, every module call handed to `make_handle(...)`'s handle, and
      returns `(output, state)`: the model state the call changed (NNX) or
      None (Linen).
    finish: `finish(state)` writes that state back to the model (NNX) or does
      nothing (Linen).
  """

  params: Any
  call: Callable[[Any, MakeHandle, Embed | None], tuple[Any, Any]]
  finish: Callable[[Any], None]


@dataclasses.dataclass(frozen=True, eq=False)
class LinenBackend:
  """A `flax.linen.Module`: the loss function takes the params tree."""

  model: nn.Module

  def bind(self, loss_fn: Callable[..., Any], params: Any, args, kwargs) -> Bound:
    """`loss_fn(params, *args, **kwargs)`, bound."""

    def call(params, make_handle: MakeHandle, embed: Embed | None):
      handle = make_handle(linen_head_projection)
      return linen_run(loss_fn, params, handle, embed, args, kwargs), None

    return Bound(params, call, lambda state: None)

  def model_call(
    self, params: Any, inputs: tuple[Any, ...], rngs: Any, call_kwargs: dict
  ) -> tuple[Callable[..., Any], Any, Any]:
    """`(loss_fn, first argument, params)` for `model.apply({"params":
    params}, *inputs, **call_kwargs)`."""
    kwargs = dict(call_kwargs)
    # Other collections (batch statistics, say) are made on the fly.
    kwargs.setdefault("mutable", nn.DenyList("params"))
    if rngs is not None:
      kwargs["rngs"] = rngs

    def call(p):
      return self.model.apply({"params": p}, *inputs, **kwargs)

    return call, params, params


@dataclasses.dataclass(frozen=True, eq=False)
class NnxBackend:
  """A `flax.nnx.Module`: the loss function takes the model."""

  model: nnx.Module

  def bind(self, loss_fn: Callable[..., Any], model: Any, args, kwargs) -> Bound:
    """`loss_fn(model, *args, **kwargs)`, bound; it runs on a copy of `model`
    merged with the given parameters."""
    if not isinstance(model, nnx.Module):
      raise TypeError(
        "With a Flax NNX model, the loss function's first argument is the model "
        f"(an nnx.Module), got {type(model).__name__}."
      )
    graphdef, params, *others = nnx.split(model, nnx.Param, ...)
    (rest,) = others  # Two filters, two states.

    def call(params, make_handle: MakeHandle, embed: Embed | None):
      live = nnx.merge(graphdef, params, rest, copy=True)
      handle = make_handle(nnx_head_projections(live))
      out = nnx_run(loss_fn, live, handle, embed, args, kwargs)
      state = nnx.split(live, nnx.Param, ...)[-1]  # What the call changed.
      return out, state

    return Bound(params, call, lambda state: nnx.update(model, state))

  def model_call(
    self, params: Any, inputs: tuple[Any, ...], rngs: Any, call_kwargs: dict
  ) -> tuple[Callable[..., Any], Any, Any]:
    """`(loss_fn, first argument, params)` for `model(*inputs,
    **call_kwargs)`, `params` the `nnx.State` of the given model's (or
    state's) `nnx.Param`s."""
    if isinstance(params, nnx.Module):
      params = nnx.state(params, nnx.Param)
    if rngs is not None:
      call_kwargs = {**call_kwargs, "rngs": rngs}

    def call(m):
      return m(*inputs, **call_kwargs)

    return call, self.model, params


def backend(model: nn.Module | nnx.Module) -> LinenBackend | NnxBackend:
  """The backend of `model`."""
  if isinstance(model, nnx.Module):
    return NnxBackend(model)
  return LinenBackend(model)
