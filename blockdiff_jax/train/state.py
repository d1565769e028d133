"""The train state: step, fp32 parameters, optimizer state and an optional EMA."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to resume training exactly.

  Attributes:
    step: number of optimizer steps taken (int32 scalar).
    params: fp32 model parameters (unboxed).
    opt_state: optax state.
    ema_params: exponential moving average of params (``train.ema_decay``), or None when
      disabled. It starts as a copy of the starting params without bias correction
      (after n steps they still weigh ``ema_decay ** n``). When kept, it is what the
      validation, ``load_for_inference`` (``use_ema=True``: sampling, evaluation,
      serving) and ``init_from.use_ema`` read.
  """

  step: Any
  params: Any
  opt_state: Any
  ema_params: Any = None


def create(params: Any, tx: optax.GradientTransformation, use_ema: bool) -> TrainState:
  """A fresh state at step 0."""
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if use_ema else None)
