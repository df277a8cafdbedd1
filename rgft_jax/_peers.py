"""Two published ways to spend a backward-pass budget, for `Budget` to run.

* DropBP (Woo et al., "DropBP: Accelerating fine-tuning of large language
  models by dropping backward propagation", NeurIPS 2024; code:
  github.com/WooSunghyeon/dropbp). Residual branches are detached at random,
  each with its own rate, re-drawn every step. The rates come from a
  sensitivity measured once, at 10% of training: how much the gradient
  norms move when one branch alone is dropped.
* GreenTrainer (Huang et al., "Towards green AI in fine-tuning large
  language models via adaptive backpropagation", ICLR 2024; code:
  github.com/pittisl/GreenTrainer). Parameter *tensors* are frozen: their
  weight gradients are not computed, and activation gradients stop below the
  deepest trained tensor. The trained set maximises an importance from a
  trial step within a FLOPs budget, by dynamic programming, re-chosen a few
  times per run.

Where these depart from the original code, the docstrings say so and why.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core

from rgft_jax._components import leaves_by_path
from rgft_jax._components import path_str
from rgft_jax._costs import flops_of
from rgft_jax._sparse import hold_masked
from rgft_jax._validation import in_range

# DropBP's allocation: rates rise in steps of 0.1 up to 0.9.
_DROPBP_TENTHS = 9


def dropbp_sensitivity(
  grads_of: Callable[[frozenset[str]], Any], names: Sequence[str]
) -> np.ndarray:
  """DropBP's sensitivity of each branch: how dropping it alone moves the
  gradient norms.

  `S_l = sum_P (||g_P|| - ||g_P^(-l)||) ** 2`, summed over every parameter
  tensor `P`, where `g` is the gradient with nothing dropped and `g^(-l)`
  the gradient with branch `l` alone detached (Frobenius norms; the code's
  default `gradnorm=True`). The original measures it on the first sequence
  of one batch; pass `grads_of` closing over whichever batch to use.

  Args:
    grads_of: `grads_of(detached)`, the gradients (any pytree) of one batch
      with the components in the frozenset `detached` detached.
    names: the branches, in the order of the result.

  Returns:
    float64[len(names)], each >= 0.
  """

  def norms(grads):
    leaves = jax.tree.leaves(grads)
    return np.array([float(jnp.linalg.norm(jnp.ravel(g))) for g in leaves])

  base = norms(grads_of(frozenset()))
  return np.array(
    [float(((base - norms(grads_of(frozenset({n})))) ** 2).sum()) for n in names]
  )


def dropbp_rates(sensitivity: Any, flops: Any, keep: float) -> np.ndarray:
  """DropBP's drop rates: greedy steps of 0.1 on the least sensitive branches.

  Every rate starts at 0. While the FLOPs kept, `sum_l flops_l * (1 -
  p_l)`, exceed `keep * sum_l flops_l`, the branch minimising
  `S_l * (p_l + 0.1)` among those below 0.9 gets 0.1 more (ties: the higher
  index, as the original's max-heap of `-S_l * (p_l + 0.1)` pops). This is
  `allocate_p.cc` with `min_rate = 0`. Rates are counted in whole tenths, so
  the cap is exactly 0.9 (the original's float32 sum reaches it as
  0.9000001); the target is not truncated to an integer (the original's
  `int(...)` of analytic FLOPs per token).

  Args:
    sensitivity: `S_l >= 0` per branch (`dropbp_sensitivity`).
    flops: the cost of each branch's backward pass (>= 0); `Budget` passes
      what detaching it saves (`DetachCosts.saving`), where the original
      uses analytic forward FLOPs per token.
    keep: the fraction of `sum(flops)` to keep in expectation, in [0, 1].

  Returns:
    float64 rates in {0, 0.1, ..., 0.9}. When even 0.9 everywhere keeps
    more than `keep`, every rate is 0.9 (the original asserts instead).

  Examples:
    >>> import rgft_jax
    >>> rgft_jax.dropbp_rates([1.0, 2.0, 0.5], [1.0, 2.0, 1.0], 0.5).tolist()
    [0.5, 0.3, 0.9]
  """
  s = np.asarray(sensitivity, np.float64)
  f = np.asarray(flops, np.float64)
  if s.shape != f.shape or s.ndim != 1:
    raise ValueError(
      f"sensitivity and flops must be 1-D of one length, got {s.shape} and {f.shape}."
    )
  if not (np.isfinite(s).all() and (s >= 0).all()):
    raise ValueError(f"sensitivity must be finite and >= 0, got {s.tolist()}.")
  if not (np.isfinite(f).all() and (f >= 0).all()):
    raise ValueError(f"flops must be finite and >= 0, got {f.tolist()}.")
  in_range("keep", keep, 0.0, 1.0)
  tenths = np.zeros(len(s), np.int64)
  target = float(keep) * f.sum()
  kept = f.sum()
  while kept > target + 1e-9 * max(f.sum(), 1.0):
    open_ = np.flatnonzero(tenths < _DROPBP_TENTHS)
    if not open_.size:
      break
    priority = s[open_] * (tenths[open_] + 1) / 10
    # The least priority; among equals the highest index.
    best = open_[np.flatnonzero(priority == priority.min())[-1]]
    tenths[best] += 1
    kept -= f[best] / 10
  return tenths / 10


def dropbp_draw(
  rates: Any, rng: np.random.Generator, saving: Any, room: float
) -> frozenset[int]:
  """One step's dropped branches: a Bernoulli draw per branch, topped up.

  Each branch `l` is dropped with probability `rates[l]`, independently.
  Then, while the kept branches cost more than `room` (what the budget
  allows this step above a fully detached one), kept branches are dropped in
  order of descending rate (ties: the lower index first). The original tops
  up by *count*, dropping until the step's share of dropped branches reaches
  the target mean rate; here the top-up is by FLOPs, so that a run never
  exceeds its budget (`Budget`'s guarantee).

  Returns:
    The indices dropped.
  """
  rates = np.asarray(rates, np.float64)
  saving = np.asarray(saving, np.float64)
  dropped = rng.random(len(rates)) < rates
  kept_cost = saving[~dropped].clip(min=0).sum()
  for i in np.argsort(-rates, kind="stable"):
    if kept_cost <= room:
      break
    if not dropped[i] and saving[i] > 0:
      dropped[i] = True
      kept_cost -= saving[i]
  return frozenset(int(i) for i in np.flatnonzero(dropped))


# GreenTrainer.


def tensor_order(loss: Callable[..., Any], params: Any, *args: Any) -> tuple[str, ...]:
  """The parameter tensors of `loss(params, *args)` by first use, input first.

  Traces the loss and orders each leaf of `params` (named by its `/`-joined
  path) by the first operation that reads it; leaves never read come last,
  in tree order. A leaf stacked over the layers of a scan is one tensor,
  read by the scan (its layers cannot be frozen apart: use a looped layout).
  """
  names = list(leaves_by_path(params))
  closed = jax.make_jaxpr(loss)(params, *args)
  n = len(jax.tree.leaves(params))
  if n != len(names):
    raise ValueError("params must be a pytree of arrays (one leaf per tensor).")
  invars = closed.jaxpr.invars[:n]
  first = {v: i for i, v in enumerate(invars)}
  seen: dict[int, int] = {}
  for position, eqn in enumerate(closed.jaxpr.eqns):
    for var in eqn.invars:
      k = first.get(var) if not isinstance(var, jex_core.Literal) else None
      if k is not None and k not in seen:
        seen[k] = position
  order = sorted(range(n), key=lambda k: (seen.get(k, math.inf), k))
  return tuple(names[k] for k in order)


def freeze_step(
  loss: Callable[..., Any], tx: optax.GradientTransformation
) -> Callable[..., Any]:
  """A train step that freezes parameter tensors, as GreenTrainer does.

  `step(params, opt_state, *args, frozen=frozenset())` differentiates
  `loss(params, *args)` (a scalar) with respect to the leaves not named in
  `frozen` only: frozen leaves are closed over, so neither their weight
  gradients nor the activation gradients below the deepest trained tensor
  are computed. Their updates are zero and their optimizer state is held
  (`hold_masked`). Returns `(loss, params, opt_state)`. Each frozen set is
  its own program (jit it with `frozen` static).
  """

  def step(params, opt_state, *args, frozen: frozenset[str] = frozenset()):
    flat, tree = jax.tree_util.tree_flatten_with_path(params)
    names = [path_str(p) for p, _ in flat]
    unknown = sorted(set(frozen) - set(names))
    if unknown:
      raise ValueError(f"frozen names {unknown} are not parameters.")
    trained = [i for i, n in enumerate(names) if n not in frozen]
    leaves = [x for _, x in flat]

    def of_trained(sub):
      full = list(leaves)
      for i, x in zip(trained, sub, strict=True):
        full[i] = x
      return loss(jax.tree.unflatten(tree, full), *args)

    value, sub_grads = jax.value_and_grad(of_trained)([leaves[i] for i in trained])
    grads = [jnp.zeros_like(x) for x in leaves]
    for i, g in zip(trained, sub_grads, strict=True):
      grads[i] = g
    grads = jax.tree.unflatten(tree, grads)
    masks = jax.tree.unflatten(tree, [n in frozen for n in names])
    updates, new_state = tx.update(grads, opt_state, params)
    updates, new_state = hold_masked(tx, masks, updates, new_state, opt_state)
    return value, optax.apply_updates(params, updates), new_state

  return step


@dataclasses.dataclass(frozen=True)
class FreezeCosts:
  """FLOPs of a `freeze_step` as a function of the tensors it trains.

  Tensors are ordered from the input (`names[0]`) to the output. With `d`
  the deepest trained tensor, a step that trains the set `T` costs

    `forward + alone[d] + sum(weight[t] for t in T if t > d)`:

  the forward pass, what training `d` alone adds (its weight gradient and
  the activation gradients from the loss down to it), and the weight
  gradient of each other trained tensor. (GreenTrainer's `t_dy`/`t_dw`
  model, with XLA's counts; the deepest tensor's own input gradient is not
  paid, since nothing below it needs it.) `weight[0]` is 0: no tensor lies
  below the first, so its weight gradient is never paid apart from
  `alone[0]`.

  Attributes:
    names: the tensors, input first.
    forward: FLOPs of a step that trains nothing.
    alone: float64[n], FLOPs that training tensor `i` alone adds.
    weight: float64[n], FLOPs that training tensor `i` adds when a deeper
      one is trained.
    checks: `(trained names, measured, predicted)` of sampled sets.
  """

  names: tuple[str, ...]
  forward: float
  alone: np.ndarray
  weight: np.ndarray
  checks: tuple[tuple[tuple[str, ...], float, float], ...] = ()

  def __post_init__(self):
    names = tuple(self.names)
    if any(not isinstance(n, str) for n in names) or len(set(names)) != len(names):
      raise ValueError(f"names must be distinct strings, got {names!r}.")
    in_range("forward", self.forward, 0.0, None, low_open=True, finite=True)
    for field in ("alone", "weight"):
      value = np.array(getattr(self, field), np.float64)
      if value.shape != (len(names),) or not np.isfinite(value).all():
        raise ValueError(
          f"{field} must hold one finite number per tensor ({len(names)}), "
          f"got {getattr(self, field)!r}."
        )
      object.__setattr__(self, field, value)
    object.__setattr__(self, "names", names)
    object.__setattr__(self, "forward", float(self.forward))

  def step(self, frozen: Any) -> float:
    """Predicted FLOPs of a step with the tensors in `frozen` frozen."""
    if isinstance(frozen, str):
      raise TypeError(f"frozen must be a collection of names, got {frozen!r}.")
    unknown = sorted(set(frozen) - set(self.names))
    if unknown:
      raise ValueError(f"Unknown tensors {unknown}; the tensors are {self.names}.")
    trained = [i for i, n in enumerate(self.names) if n not in set(frozen)]
    return self.cost(trained)

  def cost(self, trained: Sequence[int]) -> float:
    """Predicted FLOPs of a step training the tensors at indices `trained`."""
    if not len(trained):
      return self.forward
    d = min(trained)
    return float(
      self.forward + self.alone[d] + sum(self.weight[t] for t in set(trained) if t > d)
    )

  @property
  def full(self) -> float:
    """Predicted FLOPs of a step training every tensor."""
    return self.cost(range(len(self.names)))

  @property
  def floor(self) -> float:
    """FLOPs of a step training nothing."""
    return self.forward

  @property
  def additivity_error(self) -> float:
    """Largest relative gap between a checked set's FLOPs and the prediction."""
    return max((abs(m - p) / m for _, m, p in self.checks), default=0.0)


def freeze_costs(
  step: Callable[..., Any],
  names: Sequence[str],
  *args: Any,
  samples: int = 2,
  seed: int = 0,
) -> FreezeCosts:
  """Measures a `freeze_step`'s `FreezeCosts` from XLA's cost analysis.

  Lowers the step training nothing, each tensor alone, and each tensor with
  everything above it (`2 n` lowerings), then `samples` random sets to check
  the model (`FreezeCosts.additivity_error`; a warning above 5%).

  Args:
    step: `step(*args, frozen=frozenset)`, from `freeze_step`.
    names: the tensors, input first (`tensor_order`).
    *args: example arguments of the step.
    samples: random sets checked.
    seed: seed of those sets.
  """
  names = tuple(names)
  n = len(names)
  if not n:
    raise ValueError("names is empty: there is no tensor to train.")

  def flops(trained):
    frozen = frozenset(names) - {names[i] for i in trained}
    return flops_of(lambda *a: step(*a, frozen=frozen), *args)

  forward = flops(())
  alone = np.array([flops((i,)) - forward for i in range(n)])
  # above[i]: training i and everything above it, minus training i alone,
  # is the weight gradients of the tensors above i.
  above = np.array(
    [flops(range(i, n)) - forward - alone[i] for i in range(n - 1)] + [0.0]
  )
  weight = np.zeros(n)
  weight[1:] = above[:-1] - above[1:]
  costs = FreezeCosts(names, forward, alone, weight)
  rng = np.random.default_rng(seed)
  sets = [tuple(i for i in range(n) if rng.random() < 0.5) for _ in range(samples)]
  checks = tuple(
    (tuple(names[i] for i in s), flops(s), costs.cost(s)) for s in sets if s
  )
  costs = dataclasses.replace(costs, checks=checks)
  if costs.additivity_error > 0.05:
    warnings.warn(
      f"Freeze costs do not add up (largest gap {costs.additivity_error:.1%} on "
      "the sampled sets): budgets will be off by about that much.",
      RuntimeWarning,
      stacklevel=2,
    )
  return costs


def greentrainer_importance(
  loss: Callable[..., Any],
  tx: optax.GradientTransformation,
  params: Any,
  opt_state: Any,
  *args: Any,
  names: Sequence[str] | None = None,
) -> np.ndarray:
  """GreenTrainer's tensor importance, from one trial step that is undone.

  `I_t = -sum(g(w_1)_t * (w_1 - w_0)_t)`, normalised by `max_t |I_t|`: the
  first-order loss change that tensor `t`'s trial update makes, with the
  gradient taken after the update, as the original code does (`train.py`:
  `grad_1 * dw_0`). `w_1` is one step of `tx` from `w_0 = params` on the
  batch `args`. Nothing is kept: the original restores the weights but
  leaves its optimizer's moments advanced by the trial; here `opt_state` is
  not touched.

  Returns:
    float64 importance per tensor in `names` (default: tree order).
  """
  grad = jax.grad(loss)
  g0 = grad(params, *args)
  updates, _ = tx.update(g0, opt_state, params)
  g1 = grad(optax.apply_updates(params, updates), *args)
  g1, delta = leaves_by_path(g1), leaves_by_path(updates)
  names = tuple(names) if names is not None else tuple(g1)
  unknown = sorted(set(names) - set(g1))
  if unknown:
    raise ValueError(f"names {unknown} are not parameters.")
  score = np.array([-float(jnp.vdot(g1[n], delta[n])) for n in names], np.float64)
  top = np.abs(score).max(initial=0.0)
  return score / top if top > 0 else score


def greentrainer_select(
  importance: Any, costs: FreezeCosts, capacity: float, buckets: int = 1000
) -> frozenset[int]:
  """GreenTrainer's dynamic program: the most importance within `capacity`.

  Maximises `sum(importance[t] for t in T)` subject to `costs.cost(T) -
  costs.forward <= capacity`. Costs are counted in `buckets` units of the
  full backward pass (`costs.full - costs.forward`), as the original counts
  thousandths of it, but rounded up rather than down, so that a chosen set
  never exceeds the capacity (the original can, by up to a bucket per
  tensor). For each candidate deepest tensor `d`, a 0/1 knapsack over the
  tensors above it holds their weight gradients in what `alone[d]` leaves.
  The original's table stops one tensor short when the budget covers every
  activation gradient (its `N_limit`), so it never trains the tensor
  nearest the input then; this one considers every tensor.

  Returns:
    The indices (into `costs.names`) trained; empty when nothing has
    positive importance or fits.

  Examples:
    >>> import numpy as np, rgft_jax
    >>> costs = rgft_jax.FreezeCosts(("a", "b", "c"), 10.0,
    ...     alone=np.array([6.0, 3.0, 2.0]), weight=np.array([0.0, 2.0, 2.0]))
    >>> sorted(rgft_jax.greentrainer_select([0.5, 1.0, 0.2], costs, 5.0))
    [1, 2]
  """
  value = np.asarray(importance, np.float64)
  n = len(costs.names)
  if value.shape != (n,) or not np.isfinite(value).all():
    raise ValueError(f"importance must hold {n} finite numbers, got {value.tolist()}.")
  in_range("buckets", buckets, 1, None, integer=True)
  span = max(costs.full - costs.forward, 1e-30)
  unit = span / buckets
  room = math.floor(capacity / unit + 1e-9) if capacity >= 0 else -1
  if room < 0:
    return frozenset()
  alone = np.ceil(costs.alone / unit - 1e-9).astype(np.int64).clip(min=0)
  weight = np.ceil(costs.weight / unit - 1e-9).astype(np.int64).clip(min=0)
  # best[c]: the most importance of tensors above the current one whose
  # weight gradients fit in c buckets; took[k][c]: whether tensor k is in it.
  best = np.zeros(room + 1)
  took = np.zeros((n, room + 1), bool)
  top_value, top_set = 0.0, frozenset[int]()
  for d in range(n - 1, -1, -1):
    if value[d] > 0 and alone[d] <= room:
      total = value[d] + best[room - alone[d]]
      if total > top_value + 1e-12:
        top_value = total
        top_set = frozenset({d}) | _read_back(took, weight, d + 1, room - alone[d])
    if value[d] > 0 and weight[d] <= room:
      w = weight[d]
      with_d = np.full(room + 1, -np.inf)
      with_d[w:] = best[: room + 1 - w] + value[d]
      took[d] = with_d > best + 1e-12
      best = np.where(took[d], with_d, best)
  return top_set


def _read_back(
  took: np.ndarray, weight: np.ndarray, start: int, c: int
) -> frozenset[int]:
  """The knapsack of tensors `start..` at capacity `c`, from `took`."""
  chosen = set()
  for k in range(start, len(weight)):
    if took[k, c]:
      chosen.add(k)
      c -= int(weight[k])
  return frozenset(chosen)
