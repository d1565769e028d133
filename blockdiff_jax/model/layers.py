"""Basic layers whose weights carry logical axis names."""

import math
import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from blockdiff_jax.model import sharding

Array = Any
Dtype = Any


class LogicalAxes(nn.LogicallyPartitioned):
  """Logical axis names whose unbox applies no sharding constraint.

  flax's ``nn.DenseGeneral`` creates a multi-axis kernel flat (2-D), unboxes it and
  reshapes it, and ``Scope.param`` re-runs that init under ``eval_shape`` on every
  apply: with a mesh and logical rules active (sharded training), the N-D
  constraint would land on the 2-D kernel and fail. Parameters take their layout
  from jit's in/out shardings (``train/step.py``) instead.
  """

  def unbox(self, apply_constraint=True):
    del apply_constraint
    return self.value


def require_ints(obj: Any, section: str, names: Sequence[str]) -> None:
  """Raises ValueError naming the first field of ``obj`` in ``names`` that is not an int.

  A size like 2.5 or 64.0 would pass a ``>= 1`` check and surface later as a shape or
  slicing error that names no field (a fractional block size gives float block ids).
  """
  for name in names:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise ValueError(f"{section}.{name} must be an integer, got {value!r}")


def logical_init(init, axes: Sequence[str]):
  """Wraps an initializer so the parameter is boxed with logical axis names."""
  axes = tuple(axes)

  def wrapped(*args, **kwargs):
    return LogicalAxes(init(*args, **kwargs), axes)

  return wrapped


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """Sharding constraint by logical axis names (a no-op without a mesh and rules).

  Under Explicit axes a constraint is an assertion, so it takes the spec fitted to the
  shape (``sharding.logical_spec``: axes that do not divide a dimension dropped), the
  layout every other op produces; the unfitted one would fail on, say, a batch of 3.
  """
  mesh = sharding.explicit_mesh()
  if mesh is None or not nn.get_logical_axis_rules():
    return nn.with_logical_constraint(x, tuple(axes))
  return jax.lax.with_sharding_constraint(x, sharding.logical_spec(tuple(axes), x.shape, mesh))


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
    return (y * sharding.replicate_for_use(scale)).astype(self.dtype)


# Logical axis of the activation a kernel's output axis produces.
_ACTIVATION_OF = {"embed": "activation_embed", "heads": "activation_heads",
                  "kv_heads": "activation_heads", "mlp": "activation_mlp", "vocab": "vocab"}


class _Kernel(nn.Module):
  """The projection itself (a submodule so parameter paths stay ``<name>/DenseGeneral_0``).

  Same parameters and init as ``flax.linen.DenseGeneral`` (the kernel is drawn
  flat [in, out] and reshaped), but the contraction names its output layout, as
  Explicit mesh axes require when it contracts a split axis (Megatron's
  row-parallel projection over ``tensor``).
  """

  features: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  axis: tuple[int, ...]
  use_bias: bool
  dtype: Dtype
  init_scale: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    axis = tuple(sorted(a % x.ndim for a in self.axis))
    in_shape = tuple(x.shape[a] for a in axis)
    n_in, n_out = math.prod(in_shape), math.prod(self.features)
    flat_init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")

    def kernel_init(key, shape, dtype=jnp.float32):
      return flat_init(key, (n_in, n_out), dtype).reshape(shape)

    kernel = self.param("kernel", logical_init(kernel_init, self.kernel_axes),
                        in_shape + self.features, jnp.float32)
    batch = [d for d in range(x.ndim) if d not in axis]
    out_shape = tuple(x.shape[d] for d in batch) + self.features
    names = (("activation_batch", "activation_length") + (None,) * x.ndim)[:len(batch)] + tuple(
        _ACTIVATION_OF.get(a) for a in self.kernel_axes[-len(self.features):])
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((axis, tuple(range(len(axis)))), ((), ())),
                            out_sharding=sharding.out_spec(names, out_shape))
    if self.use_bias:
      bias = self.param("bias", logical_init(nn.initializers.zeros,
                                             self.kernel_axes[-len(self.features):]),
                        self.features, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class DenseGeneral(nn.Module):
  """A DenseGeneral with logical axes on the kernel (and the bias), and optional LoRA.

  With ``lora_rank > 0`` it adds ``lora_scale * gate * (x A) B`` (``lora_a``
  [in..., r], ``lora_b`` [r, out...], B zero-initialised), ``gate`` [B, T] per token.
  """

  features: int | tuple[int, ...]
  kernel_axes: tuple[str, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  init_scale: float = 1.0
  lora_rank: int = 0
  lora_scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array, gate: Array | None = None) -> Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    y = _Kernel(features, tuple(self.kernel_axes), axis, self.use_bias, self.dtype,
                self.init_scale, name="DenseGeneral_0")(x)
    if not self.lora_rank:
      return y
    axis = tuple(sorted(a % x.ndim for a in axis))
    in_shape = tuple(x.shape[a] for a in axis)
    n_in, r = math.prod(in_shape), self.lora_rank
    a_init = lambda key, shape, dtype=jnp.float32: nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal")(key, (n_in, r), dtype).reshape(shape)
    lora_a = self.param("lora_a", logical_init(
        a_init, self.kernel_axes[:len(axis)] + (None,)), in_shape + (r,), jnp.float32)
    lora_b = self.param("lora_b", logical_init(
        nn.initializers.zeros, (None,) + self.kernel_axes[len(axis):]), (r,) + features,
                        jnp.float32)
    batch = tuple(d for d in range(x.ndim) if d not in axis)
    batch_shape = tuple(x.shape[d] for d in batch)
    batch_names = (("activation_batch", "activation_length") + (None,) * x.ndim)[:len(batch)]
    # Named outputs, as in _Kernel: under Explicit axes x A contracts an input split over
    # ``tensor`` (a row-parallel projection), which is ambiguous without one.
    h = jax.lax.dot_general(x.astype(self.dtype), lora_a.astype(self.dtype),
                            ((axis, tuple(range(len(axis)))), ((), ())),
                            out_sharding=sharding.out_spec(batch_names + (None,),
                                                           batch_shape + (r,)))
    if gate is not None:
      h = h * gate.reshape(gate.shape + (1,) * (h.ndim - gate.ndim)).astype(h.dtype)
    out_names = batch_names + tuple(_ACTIVATION_OF.get(a)
                                    for a in self.kernel_axes[-len(features):])
    d = jax.lax.dot_general(h, lora_b.astype(self.dtype),
                            (((len(batch),), (0,)), ((), ())),
                            out_sharding=sharding.out_spec(out_names, batch_shape + features))
    return y + (self.lora_scale * d).astype(y.dtype)


class SwiGLU(nn.Module):
  """Gated MLP: down(silu(gate(x)) * up(x))."""

  hidden_dim: int
  dtype: Dtype = jnp.float32
  lora: Any = None  # lora.LoraConfig | None

  @nn.compact
  def __call__(self, x: Array, lora_gate: Array | None = None) -> Array:
    d = x.shape[-1]
    dense = lambda n, axes, name: DenseGeneral(
        n, axes, dtype=self.dtype, name=name,
        lora_rank=self.lora.rank if self.lora is not None and self.lora.has(name) else 0,
        lora_scale=self.lora.scale if self.lora is not None else 1.0)
    gate = dense(self.hidden_dim, ("embed", "mlp"), "gate")(x, lora_gate)
    up = dense(self.hidden_dim, ("embed", "mlp"), "up")(x, lora_gate)
    h = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return dense(d, ("mlp", "embed"), "down")(h, lora_gate)
