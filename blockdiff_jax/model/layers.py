"""Basic layers whose weights carry logical axis names."""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = Any
Dtype = Any


class LogicalAxes(nn.LogicallyPartitioned):
  """Logical axis names whose unbox applies no sharding constraint.

  flax's ``nn.DenseGeneral`` creates a multi-axis kernel flat (2-D), unboxes it and
  reshapes it, and ``Scope.param`` re-runs that init under ``eval_shape`` on every
  apply: with a mesh and logical rules active (sharded training), the N-D
  constraint would land on the 2-D kernel and fail. Parameters take their layout
  from jit's in/out shardings (``train/partitioning.py``) instead.
  """

  def unbox(self, apply_constraint=True):
    del apply_constraint
    return self.value


def logical_init(init, axes: Sequence[str]):
  """Wraps an initializer so the parameter is boxed with logical axis names."""
  axes = tuple(axes)

  def wrapped(*args, **kwargs):
    return LogicalAxes(init(*args, **kwargs), axes)

  return wrapped


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """Sharding constraint by logical axis names (a no-op without a mesh and rules)."""
  return nn.with_logical_constraint(x, tuple(axes))


class RMSNorm(nn.Module):
  """Root-mean-square layer norm computed in fp32."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", logical_init(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


class DenseGeneral(nn.Module):
  """A DenseGeneral with logical axes on the kernel (and the bias)."""

  features: int | tuple[int, ...]
  kernel_axes: tuple[str, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    bias_axes = self.kernel_axes[-len(features):]
    return nn.DenseGeneral(
        features=features, axis=self.axis, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=logical_init(
            nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal"),
            self.kernel_axes),
        bias_init=logical_init(nn.initializers.zeros, bias_axes),
    )(x)


class SwiGLU(nn.Module):
  """Gated MLP: down(silu(gate(x)) * up(x))."""

  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    gate = DenseGeneral(self.hidden_dim, ("embed", "mlp"), dtype=self.dtype, name="gate")(x)
    up = DenseGeneral(self.hidden_dim, ("embed", "mlp"), dtype=self.dtype, name="up")(x)
    h = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return DenseGeneral(d, ("mlp", "embed"), dtype=self.dtype, name="down")(h)
