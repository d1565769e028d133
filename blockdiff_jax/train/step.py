"""The jit-compiled train and eval steps."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from blockdiff_jax.diffusion import losses
from blockdiff_jax.train import state as state_lib

Array = Any


def step_rng(base_rng: Array, step: Array) -> Array:
  """The noise key of a step: a pure function of the step, so resumed runs match."""
  return jax.random.fold_in(base_rng, step)


def make_train_step(apply_fn: Callable, obj: losses.BlockDiffusionObjective,
                    tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    grad_accum_steps: int = 1, ema_decay: float = 0.0):
  """Builds ``train_step(state, batch, base_rng) -> (state, metrics)`` (not yet jitted).

  Gradients are averaged over ``grad_accum_steps`` micro-batches with a scan. A step
  whose loss or gradient norm is not finite leaves the state unchanged and reports
  ``finite = 0`` so the host can stop the run.
  """

  def loss_fn(params, batch, rng, corrupted=None):
    return losses.block_diffusion_loss(apply_fn, params, batch, rng, obj, corrupted)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: state_lib.TrainState, batch: dict, base_rng: Array):
    rng = step_rng(base_rng, state.step)
    if grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, batch, rng)
    else:
      # Noise is drawn for the full batch, so accumulation changes no random draw.
      corrupted = losses.corrupt(rng, batch, obj)
      # Micro-batch j takes rows j, j + n, j + 2n... (n = grad_accum_steps): each
      # device's rows of a batch-split array then split evenly, no data moves.
      micro = jax.tree.map(
          lambda x: x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps,
                              *x.shape[1:]).swapaxes(0, 1),
          (batch, corrupted))

      def body(carry, mb):
        (_, m), g = grad_fn(state.params, mb[0], rng, mb[1])
        return jax.tree.map(jnp.add, carry, (g, m)), None

      first = jax.tree.map(lambda x: x[0], micro)
      metric_shapes = jax.eval_shape(loss_fn, state.params, first[0], rng, first[1])[1]
      zeros = (jax.tree.map(jnp.zeros_like, state.params),
               jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
      (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
      grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, (grads, metrics))

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    new = state_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               ema_params=ema)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    # A non-finite step is dropped whole: the state keeps its last good values.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(state.step),
                   finite=finite.astype(jnp.float32))
    return new, metrics

  return train_step


def make_eval_step(apply_fn: Callable, obj: losses.BlockDiffusionObjective):
  """Builds ``eval_step(params, batch, rng) -> metrics`` (NELBO with fresh noise)."""

  def eval_step(params, batch, rng):
    return losses.block_diffusion_loss(apply_fn, params, batch, rng, obj)[1]

  return eval_step


def jit_train_step(train_step, state_sharding=None, batch_sharding=None):
  """jit with the state donated (its buffers are reused for the new state)."""
  if state_sharding is None:
    return jax.jit(train_step, donate_argnums=0)
  return jax.jit(train_step, donate_argnums=0,
                 in_shardings=(state_sharding, batch_sharding, None),
                 out_shardings=(state_sharding, None))
