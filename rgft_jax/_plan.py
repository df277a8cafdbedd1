"""The plan: what `ErrorTracker` found in a model's calls, fixed once."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

from rgft_jax._components import Components
from rgft_jax._heads import Heads
from rgft_jax._intercept import Path
from rgft_jax._structure import Branch
from rgft_jax._structure import Site
from rgft_jax._structure import Structure


def branches_of(structure: Structure | None) -> Mapping[Site, Branch] | None:
  """The residual branches of `structure` by call site (None: none looked for)."""
  if structure is None:
    return None
  return types.MappingProxyType({b.site: b for b in structure.branches})


def all_shared(structure: Structure | None) -> bool:
  """Residual branches were found and every one of them computes only with
  shared parameters (a layer reused across depth): no component, and no
  fallback to class names either."""
  return structure is not None and structure.residual and not structure.branches


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """What `ErrorTracker.plan` found in a model's calls; immutable.

  `ErrorTracker.value_and_grad(loss_fn, plan=plan)` measures what the plan
  says instead of discovering it again from each trace's own arguments (the
  same result for the same model, found once).

  Attributes:
    components: the `Components`: the tapped components that own some
      parameter (named in call order), the parameters each one owns, the
      shared ones and the `layer_groups`.
    structure: the residual branches found from the model's dataflow
      (`select="branches"`), None for other selectors.
    heads: the attentions found from the model's dataflow, by output
      projection path (`select="heads"`), None for other selectors.

  Examples:
    >>> import flax.linen as nn
    >>> import jax, jax.numpy as jnp
    >>> import rgft_jax
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return x + nn.Dense(4, name="branch")(nn.LayerNorm()(x))
    >>> model, x = Net(), jnp.ones((2, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> plan = rgft_jax.ErrorTracker(model).plan(params, x)
    >>> plan.names, plan.scanned
    (('branch',), False)
  """

  components: Components
  structure: Structure | None = None
  heads: Mapping[Path, Heads] | None = None
  branches: Mapping[Site, Branch] | None = dataclasses.field(
    init=False, repr=False
  )  # `structure`'s branches by call site, set in __post_init__.

  def __post_init__(self):
    if not isinstance(self.components, Components):
      raise TypeError(
        f"A Plan's components must be Components, got {type(self.components).__name__}."
      )
    if self.heads is not None:
      object.__setattr__(self, "heads", types.MappingProxyType(dict(self.heads)))
    object.__setattr__(self, "branches", branches_of(self.structure))

  @property
  def names(self) -> tuple[str, ...]:
    """The component names, in call order (input side first)."""
    return self.components.names

  @property
  def layer_groups(self) -> tuple[tuple[str, ...], ...]:
    """The components that are one tapped module's layers inside a scan over
    layers, a tuple of names per tapped module (`Components.layer_groups`)."""
    return self.components.layer_groups

  @property
  def scanned(self) -> bool:
    """Whether some component is a layer of a scan over layers."""
    return bool(self.layer_groups)

  @property
  def all_shared(self) -> bool:
    """Whether every residual branch found computes only with shared
    parameters (no component)."""
    return all_shared(self.structure)
