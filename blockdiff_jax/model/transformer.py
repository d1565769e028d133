"""Decoder transformer with MoE feed-forward layers for block diffusion."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from blockdiff_jax import masks
from blockdiff_jax.model import attention
from blockdiff_jax.model import layers
from blockdiff_jax.model import lora as lora_lib
from blockdiff_jax.model import moe as moe_lib
from blockdiff_jax.model import rope
from blockdiff_jax.model import sharding
from blockdiff_jax.model import summary as summary_lib

Array = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Static architecture of the model (built from ``config.model`` by ``from_config``)."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  moe: moe_lib.MoEConfig | None = None
  moe_every: int = 1
  first_dense_layers: int = 0
  qkv_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = True
  rope_theta: float = 10000.0
  rope_scaling: rope.RopeScaling = rope.RopeScaling()
  norm_eps: float = 1e-6
  mask_spec: masks.MaskSpec = masks.MaskSpec()
  attention_impl: str = "xla"
  interpret: bool | None = None
  dtype: str = "float32"
  scan_layers: bool = False
  remat: bool = False
  lora: lora_lib.LoraConfig | None = None
  summary: summary_lib.SummaryConfig | None = None

  def __post_init__(self):
    layers.require_ints(self, "model", (
        "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
        "mlp_dim", "moe_every", "first_dense_layers"))
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "moe_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} is not a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads}")
    # rope.inverse_frequencies needs d >= 4 too (NTK divides by d - 2): refused here,
    # where validate sees it, rather than inside the first traced forward.
    if self.head_dim % 2 or self.head_dim < 4:
      raise ValueError(f"model.head_dim must be even and >= 4 for RoPE, got {self.head_dim}")
    if self.dtype not in DTYPES:
      raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
    if self.attention_impl not in attention.ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl must be one of {attention.ATTENTION_IMPLS}, "
                       f"got {self.attention_impl!r}")
    if self.summary is not None:
      w = self.summary.window_blocks
      if self.mask_spec.window_blocks not in (0, w):
        raise ValueError(f"mask_spec.window_blocks={self.mask_spec.window_blocks} differs "
                         f"from model.summary.window_blocks={w}")
      # The summary window is a property of the mask every attention layer uses.
      object.__setattr__(self, "mask_spec",
                         dataclasses.replace(self.mask_spec, window_blocks=w))
    elif self.attention_impl == "structured":
      raise ValueError("model.attention_impl='structured' needs summary tokens "
                       "(model.summary.num_slots > 0)")
    if not 0 <= self.first_dense_layers <= self.num_layers:
      raise ValueError(f"model.first_dense_layers={self.first_dense_layers} must be in "
                       f"[0, num_layers={self.num_layers}]")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def is_moe_layer(self, i: int) -> bool:
    return (self.moe is not None and i >= self.first_dense_layers
            and (i - self.first_dense_layers) % self.moe_every == 0)

  def layer_segments(self) -> list[tuple[bool, int]]:
    """Runs of consecutive layers of the same kind: [(is_moe, count), ...]."""
    segments = []
    for i in range(self.num_layers):
      kind = self.is_moe_layer(i)
      if segments and segments[-1][0] == kind:
        segments[-1] = (kind, segments[-1][1] + 1)
      else:
        segments.append((kind, 1))
    return segments

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.num_layers))

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict, vocab_size: int | None = None,
                  mask_spec: masks.MaskSpec = masks.MaskSpec(),
                  block_size: int | None = None) -> "TransformerConfig":
    """Builds the static config from ``config.model`` (vocab from the tokenizer if 0).

    ``block_size`` (``diffusion.block_size``) is needed with summary tokens on.
    """
    m = model
    moe_cfg = None
    if m.moe.num_experts:
      moe_cfg = moe_lib.MoEConfig(
          num_experts=m.moe.num_experts, top_k=m.moe.top_k, expert_dim=m.moe.expert_dim,
          shared_expert_dim=m.moe.shared_expert_dim,
          shared_expert_gate=m.moe.get("shared_expert_gate", False),
          router_func=m.moe.router_func,
          router_mode=m.moe.router_mode, normalize_topk=m.moe.normalize_topk,
          block_coverage=m.moe.block_coverage, block_min_experts=m.moe.block_min_experts,
          impl=m.moe.impl, tile_size=m.moe.tile_size, expert_parallel=m.moe.expert_parallel,
          capacity_factor=m.moe.capacity_factor, interpret=m.get("interpret"),
          load_balance_weight=m.moe.load_balance_weight, z_loss_weight=m.moe.z_loss_weight)
    vocab = m.vocab_size or vocab_size
    if not vocab:
      raise ValueError("model.vocab_size is 0 and no tokenizer vocabulary was given")
    return cls(
        vocab_size=vocab, d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, mlp_dim=m.mlp_dim, moe=moe_cfg,
        moe_every=m.moe.moe_every, first_dense_layers=m.moe.first_dense_layers,
        qkv_bias=m.qkv_bias, qk_norm=m.qk_norm, tie_embeddings=m.tie_embeddings,
        rope_theta=m.rope_theta,
        rope_scaling=rope.scaling_from_config(m.rope_scaling),
        norm_eps=m.norm_eps, mask_spec=mask_spec, attention_impl=m.attention_impl,
        interpret=m.get("interpret"), dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat,
        lora=lora_lib.from_config(m.get("lora")),
        summary=summary_lib.from_config(m.get("summary"), block_size))


class Block(nn.Module):
  """Pre-norm residual block: attention then dense or MoE SwiGLU."""

  cfg: TransformerConfig
  use_moe: bool
  return_kv: bool = False
  summary_layout: masks.SummaryLayout | None = None

  @nn.compact
  def __call__(self, x, meta, layer_cache, cache_meta, lora_gate=None):
    cfg = self.cfg
    dtype = cfg.compute_dtype
    h = layers.RMSNorm(cfg.norm_eps, dtype, name="attn_norm")(x)
    cache = None if layer_cache is None else (*layer_cache, cache_meta)
    a, kv = attention.Attention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm, rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling, mask_spec=cfg.mask_spec, impl=cfg.attention_impl,
        interpret=cfg.interpret, norm_eps=cfg.norm_eps, dtype=dtype, lora=cfg.lora,
        summary_layout=self.summary_layout, name="attention")(h, meta, cache, lora_gate)
    x = x + a
    h = layers.RMSNorm(cfg.norm_eps, dtype, name="mlp_norm")(x)
    if self.use_moe:
      m, stats = moe_lib.MoEFeedForward(cfg.moe, dtype=dtype, name="moe")(h, meta)
    else:
      m, stats = layers.SwiGLU(cfg.mlp_dim, dtype=dtype, lora=cfg.lora, name="mlp")(
          h, lora_gate), {}
    x = layers.constrain(x + m, ("activation_batch", "activation_length", "activation_embed"))
    return x, (kv if self.return_kv else None, stats)


class Transformer(nn.Module):
  """The MoE block-diffusion transformer.

  Call with tokens [B, T] and their metadata; returns fp32 logits and an aux dict with
  ``moe`` (per-MoE-layer statistics stacked on axis 0), ``aux_loss`` (the weighted
  MoE load-balance and z-losses, a scalar; 0 for a dense model), ``metrics`` (scalar
  MoE metrics for logging) and, if ``return_kv``, ``kv`` (keys and values of the
  input tokens, [num_layers, B, T, Hkv, Dh] each).

  With summary tokens (``cfg.summary``) and ``summary="bd3"`` or ``"clean"``, the
  clean stream's blocks get S learned slots appended after the input (see
  ``model/summary.py``); logits and ``kv`` stay those of the input tokens, and
  with ``return_kv`` aux also holds ``summary_kv`` ((k, v) of the slots,
  [num_layers, B, G*S, Hkv, Dh]) and ``summary_meta`` (their TokenMeta [B, G*S]).
  """

  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens: Array, meta: masks.TokenMeta, cache: dict | None = None,
               return_kv: bool = False, logits_slice: tuple[int, int] | None = None,
               summary: str = "none"):
    """Forward pass.

    Args:
      tokens: int32 [B, T].
      meta: token metadata [B, T].
      cache: optional ``{"k": [L, B, S, Hkv, Dh], "v": ..., "meta": TokenMeta [B, S]}``,
        and optionally ``"factored"``: a ``factored_kv.FactoredKV`` with leading axis L
        whose positions follow the S of ``k`` in ``meta``.
      return_kv: also return the rotated keys/values of ``tokens`` for caching.
      logits_slice: static ``(start, length)``: compute the head only there.
      summary: static: which summary slots to append (``model/summary.py``):
        "bd3" (input ``[x_t ; x_0]``), "clean" (clean-only input), "first_block" (the
        input's first block, clean) or "none".
    """
    cfg = self.cfg
    dtype = cfg.compute_dtype
    # Nested lists (a hand-written prompt) would otherwise fail deep inside on `.shape`.
    tokens = jnp.asarray(tokens)
    meta = masks.TokenMeta(*(jnp.asarray(getattr(meta, f.name))
                             for f in dataclasses.fields(meta)))
    if meta.positions.shape[-1] == tokens.shape[-1]:
      # One metadata row for the batch: MoE and XLA attention broadcast it, the summary
      # slots' LoRA gate and structured attention failed on it.
      meta = meta.broadcast_to(tokens.shape)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32, dtype=dtype,
                     embedding_init=layers.logical_init(
                         nn.initializers.normal(stddev=cfg.d_model ** -0.5), ("vocab", "embed")),
                     name="embed")
    # The lookup names its output layout: under Explicit mesh axes a gather of a
    # [vocab@tensor, embed@fsdp] table by batch-split ids has no unique one.
    # mode="fill": an out-of-range id gives NaNs (as nn.Embed's take), not a clamped row.
    # A negative id (a -1 pad, a -100 ignore label) would wrap around to one of the last
    # rows like a Python index and give finite, wrong logits: sent past the end instead.
    ids = jnp.where(tokens < 0, cfg.vocab_size, tokens)
    x = embed.embedding.astype(dtype).at[ids].get(
        mode="fill", fill_value=jnp.nan,
        out_sharding=sharding.out_spec(sharding.TOKEN_AXES, tokens.shape + (cfg.d_model,)))
    if meta.segment_ids.shape[-1] == tokens.shape[-1]:
      # Padding (segment < 0) is masked out of attention, which still multiplies its
      # zero weights by the padded keys' values: a NaN from a bad id there (a -1 pad)
      # would reach every real position. Padding reads zeros whatever its id.
      x = jnp.where((meta.segment_ids < 0)[..., None], jnp.zeros((), x.dtype), x)
    x = layers.constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    cache_meta = None if cache is None else cache["meta"]
    # Computed once from the token ids and passed down to every adapter.
    lora_gate = lora_lib.lora_gate(tokens, cfg.lora)
    num_tokens = tokens.shape[1]
    if logits_slice is not None:
      start, length = logits_slice
      # A negative start counts from the end in the slice below (start -1 gives no row
      # at all) and a slice past the input is cut short: both silently change the
      # number of logits the caller lines up with its tokens.
      if not (0 <= start and 0 <= length and start + length <= num_tokens):
        raise ValueError(f"logits_slice=(start={start}, length={length}) must lie inside "
                         f"the {num_tokens} input tokens (0 <= start, start + length <= "
                         f"{num_tokens})")
    layout = None
    if cfg.summary is not None:
      # Created in every mode, so an init without slots has the parameter too.
      table = self.param("summary_embed", layers.logical_init(
          nn.initializers.normal(stddev=cfg.d_model ** -0.5), (None, "embed")),
                         (cfg.summary.num_slots, cfg.d_model), jnp.float32)
      layout = cfg.summary.layout(summary)
    elif summary != "none":
      raise ValueError(f"summary={summary!r} needs summary tokens "
                       "(model.summary.num_slots > 0)")
    if layout is not None:
      slot_meta = cfg.summary.slot_meta(meta, summary)
      num_blocks = slot_meta.shape[-1] // layout.num_slots
      slots = jnp.broadcast_to(table.astype(dtype)[None, None],
                               (x.shape[0], num_blocks) + table.shape)
      x = jnp.concatenate([x, slots.reshape(x.shape[0], -1, cfg.d_model)], axis=1)
      x = layers.constrain(x, ("activation_batch", "activation_length", "activation_embed"))
      meta = meta.concat(slot_meta)
      if lora_gate is not None:
        # A slot is never a MASK token, so a gated adapter stays shut on it; plain
        # LoRA is a change of weights (merge_adapters folds it) and acts on it too.
        lora_gate = jnp.concatenate(
            [lora_gate, jnp.full(slot_meta.shape, 0.0 if cfg.lora.gated else 1.0,
                                 lora_gate.dtype)], axis=1)
      # Only full-sequence passes use the structured path; with a cache it
      # falls back to the materialised mask (a block against a short cache).
      attn_layout = layout if cache is None and summary != "first_block" else None
    else:
      attn_layout = None

    kvs, moe_stats, start = [], [], 0
    for seg, (use_moe, count) in enumerate(cfg.layer_segments()):
      seg_cache = None
      if cache is not None:
        seg_cache = (cache["k"][start:start + count], cache["v"][start:start + count])
        if cache.get("factored") is not None:  # Expanded per layer, inside attention.
          seg_cache += (jax.tree.map(lambda a: a[start:start + count], cache["factored"]),)
      block_cls = Block
      if cfg.remat:
        block_cls = nn.remat(Block, prevent_cse=not cfg.scan_layers)
      if cfg.scan_layers:
        stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast), length=count,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, (kv, stats) = stack(cfg, use_moe, return_kv, attn_layout, name=f"stack_{seg}")(
            x, meta, seg_cache, cache_meta, lora_gate)
        kvs.append(kv)
        if use_moe:
          moe_stats.append(stats)
      else:
        for i in range(count):
          layer_cache = None if seg_cache is None else jax.tree.map(lambda c: c[i], seg_cache)
          x, (kv, stats) = block_cls(cfg, use_moe, return_kv, attn_layout,
                                     name=f"layer_{start + i}")(
              x, meta, layer_cache, cache_meta, lora_gate)
          kvs.append(None if kv is None else jax.tree.map(lambda a: a[None], kv))
          if use_moe:
            moe_stats.append(jax.tree.map(lambda a: a[None], stats))
      start += count

    x = x[:, :num_tokens]  # the slots carry no loss: no head on them
    x = layers.RMSNorm(cfg.norm_eps, dtype, name="final_norm")(x)
    if logits_slice is not None:
      x = x[:, logits_slice[0]:logits_slice[0] + logits_slice[1]]
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, embed.embedding.astype(dtype),
                          preferred_element_type=jnp.float32)
    else:
      logits = layers.DenseGeneral(cfg.vocab_size, ("embed", "vocab"), dtype=dtype,
                                   name="lm_head")(x).astype(jnp.float32)
    aux = {"moe": jax.tree.map(lambda *a: jnp.concatenate(a), *moe_stats) if moe_stats else {}}
    if moe_stats:
      aux["aux_loss"], aux["metrics"] = moe_lib.auxiliary_loss(aux["moe"], cfg.moe)
    else:
      aux["aux_loss"], aux["metrics"] = jnp.zeros((), jnp.float32), {}
    if return_kv:
      kv = jax.tree.map(lambda *a: jnp.concatenate(a), *kvs)
      aux["kv"] = jax.tree.map(lambda a: a[:, :, :num_tokens], kv)
      if layout is not None:
        aux["summary_kv"] = jax.tree.map(lambda a: a[:, :, num_tokens:], kv)
        aux["summary_meta"] = slot_meta
    return logits, aux
