"""Noise schedules and per-block noise-level sampling (BD3-LM)."""

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp

Array = Any


@dataclasses.dataclass(frozen=True)
class LogLinearSchedule:
  """Masking probability equal to t; ELBO weight 1/t.

  With alpha_t = 1 - t (the probability that a token is still clean), the continuous
  masked-diffusion NELBO weights the cross-entropy of a masked token by
  -alpha'_t / (1 - alpha_t) = 1 / t.

  Attributes:
    eps: smallest t ever used (avoids the 1/t singularity).
  """

  eps: float = 1e-3

  def __post_init__(self):
    # eps <= 0 gives an unbounded 1/t weight, and eps >= 1 weights every t alike. A
    # non-number (None, "1e-3") failed the comparison in a TypeError naming no field.
    if (isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real)
        or not 0.0 < self.eps < 1.0):  # Also refuses NaN.
      raise ValueError(f"diffusion.eps must be in (0, 1), got {self.eps!r}")

  def mask_prob(self, t: Array) -> Array:
    return t

  def loss_weight(self, t: Array) -> Array:
    return 1.0 / jnp.maximum(t, self.eps)


SCHEDULES = {"loglinear": LogLinearSchedule}


def make_schedule(name: str, eps: float = 1e-3):
  if name not in SCHEDULES:
    raise ValueError(f"diffusion.schedule must be one of {tuple(SCHEDULES)}, got {name!r}")
  return SCHEDULES[name](eps=eps)


@dataclasses.dataclass(frozen=True)
class NoiseRange:
  """Clipped noise interval [beta, omega] for training (BD3-LM's clipped schedules)."""

  beta: float = 1e-3
  omega: float = 1.0

  def __post_init__(self):
    for name in ("beta", "omega"):  # None failed the comparison below in a bare TypeError.
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"diffusion.{name} must be a number, got {value!r}")
    if not 0.0 <= self.beta < self.omega <= 1.0:
      raise ValueError(f"need 0 <= diffusion.beta < diffusion.omega <= 1, got "
                       f"beta={self.beta}, omega={self.omega}")


def sample_block_t(rng: Array, batch: int, num_blocks: int, noise: NoiseRange,
                   antithetic: bool = True) -> Array:
  """One noise level per block, [batch, num_blocks], in [beta, omega].

  Antithetic sampling places the batch*num_blocks draws on a stratified grid
  ((u + i) / n for i = 0..n-1, shuffled across blocks), which lowers the variance of
  the loss estimate without biasing it.
  """
  n = batch * num_blocks
  u = jax.random.uniform(rng, (n,))
  if antithetic:
    # Clipped, not wrapped: (u + n - 1) / n may round up to 1.0 in float32, and a
    # modulo would move the top stratum's draw from omega to beta.
    u = jnp.minimum(u / n + jnp.arange(n) / n, 1.0)
    u = jax.random.permutation(jax.random.fold_in(rng, 1), u)
  t = noise.beta + (noise.omega - noise.beta) * u
  return t.reshape(batch, num_blocks)
