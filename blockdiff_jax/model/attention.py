"""Grouped-query attention whose mask comes from token metadata, with an optional KV cache."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from blockdiff_jax import masks
from blockdiff_jax.model import attention_ops
from blockdiff_jax.model import layers
from blockdiff_jax.model import rope
from blockdiff_jax.model import sharding
from blockdiff_jax.model import summary_attention

Array = Any

# xla: materialised mask; pallas: tiled kernel skipping masked tiles; structured:
# summary-token layouts block by block (window + summary bank, never T x T), the
# materialised mask elsewhere (decoding against a cache).
ATTENTION_IMPLS = ("xla", "pallas", "structured")


class Attention(nn.Module):
  """Multi-head attention with GQA, optional QKV bias, QK-norm and RoPE.

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (divides num_heads).
    head_dim: per-head dimension.
    qkv_bias: bias on the q/k/v projections (Qwen2).
    qk_norm: RMSNorm on q and k per head (Qwen3).
    rope_theta: RoPE base.
    rope_scaling: context-extension scaling.
    mask_spec: static mask options.
    impl: "xla" (materialized mask), "pallas" (tiled kernel) or "structured"
      (``summary_attention``; needs ``summary_layout``, else as "xla").
    summary_layout: static layout of a full-sequence input with summary slots
      (``masks.SummaryLayout``), or None.
    interpret: run the Pallas kernel in the interpreter; None = unless on a GPU.
    dtype: compute dtype.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  qkv_bias: bool = False
  qk_norm: bool = False
  rope_theta: float = 10000.0
  rope_scaling: rope.RopeScaling = rope.RopeScaling()
  mask_spec: masks.MaskSpec = masks.MaskSpec()
  impl: str = "xla"
  interpret: bool | None = None
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  lora: Any = None  # lora.LoraConfig | None: adapters on q/k/v/o.
  summary_layout: masks.SummaryLayout | None = None

  @nn.compact
  def __call__(self, x: Array, meta: masks.TokenMeta, cache=None, lora_gate=None):
    """Attends x's tokens to the cache (if any) and to themselves.

    Args:
      x: [B, T, D] activations.
      meta: metadata of x's tokens [B, T].
      cache: optional ``(k [B, S, Hkv, Dh], v [B, S, Hkv, Dh], meta [B, S])`` of
        previously committed tokens (already rotated), or ``(k, v, factored, meta)``
        where ``factored`` (``factored_kv.FactoredKV``) adds positions after the S.
      lora_gate: optional [B, T] per-token LoRA gate (see ``model/lora.py``).

    Returns:
      (output [B, T, D], (k, v) of x's tokens after RoPE, to be cached by the caller).
    """
    # TransformerConfig checks its attention_impl, but a module built directly with a
    # misspelt impl ("palas") silently ran the XLA path below.
    if self.impl not in ATTENTION_IMPLS:
      raise ValueError(f"Attention.impl must be one of {ATTENTION_IMPLS}, got {self.impl!r}")
    h, hk, dh = self.num_heads, self.num_kv_heads, self.head_dim
    lo = self.lora
    rank = lambda t: lo.rank if lo is not None and lo.has(t) else 0
    scale = lo.scale if lo is not None else 1.0
    proj = lambda n, heads_axis, name, t: layers.DenseGeneral(
        (n, dh), ("embed", heads_axis, "head_dim"), use_bias=self.qkv_bias, dtype=self.dtype,
        name=name, lora_rank=rank(t), lora_scale=scale)(x, lora_gate)
    q = proj(h, "heads", "query", "q")
    k = proj(hk, "kv_heads", "key", "k")
    v = proj(hk, "kv_heads", "value", "v")
    if self.qk_norm:
      q = layers.RMSNorm(self.norm_eps, self.dtype, "head_dim", name="query_norm")(q)
      k = layers.RMSNorm(self.norm_eps, self.dtype, "head_dim", name="key_norm")(k)
    inv_freq, attn_factor = rope.inverse_frequencies(dh, self.rope_theta, self.rope_scaling)
    q = rope.apply_rope(q, meta.positions, inv_freq)
    k = rope.apply_rope(k, meta.positions, inv_freq)
    if attn_factor != 1.0:
      q, k = q * attn_factor, k * attn_factor
    q = layers.constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
    new_kv = (k, v)

    kv_meta = meta
    if cache is not None:
      ck, cv, cmeta = cache[0], cache[1], cache[-1]
      if len(cache) == 4:  # A factored_kv.FactoredKV of this layer, expanded here.
        ck, cv = cache[2].extend(ck, cv)
      k = jnp.concatenate([ck.astype(k.dtype), k], axis=1)
      v = jnp.concatenate([cv.astype(v.dtype), v], axis=1)
      kv_meta = cmeta.concat(meta)
    if self.impl == "structured" and self.summary_layout is not None and cache is None:
      layout, spec = self.summary_layout, self.mask_spec

      def core(q, k, v, q_meta, kv_meta):  # self-attention: kv_meta is q_meta
        del kv_meta
        return summary_attention.structured_attention(q, k, v, q_meta, layout, spec)
    elif self.impl == "pallas":
      from pallas_kernels import block_attention  # pylint: disable=g-import-not-at-top
      core = functools.partial(block_attention.block_attention, spec=self.mask_spec,
                               interpret=self.interpret)
    else:
      core = functools.partial(attention_ops.masked_attention, spec=self.mask_spec)
    if sharding.explicit_mesh() is not None:
      # Under Explicit axes the GQA head grouping (heads -> kv_heads x groups) has
      # no unique typed layout when heads and kv_heads split differently; the
      # core runs with GSPMD choosing, and hands back q's layout.
      core = jax.sharding.auto_axes(core, out_sharding=jax.typeof(q).sharding.spec)
    out = core(q, k, v, meta, kv_meta)
    out = layers.DenseGeneral(x.shape[-1], ("heads", "head_dim", "embed"), axis=(-2, -1),
                              dtype=self.dtype, name="out", lora_rank=rank("o"),
                              lora_scale=scale)(out, lora_gate)
    return out, new_kv
