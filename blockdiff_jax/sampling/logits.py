"""What the decoders call instead of a model: a logits function.

A logits function is a hashable object (it keys the jit cache) with a ``kv_spec``
(``kv_cache.KVSpec``: the shape of the cache it reads) and

    fn(params, tokens [B, T], meta TokenMeta [B, T], cache: dict | None,
       logits_slice: (start, length) | None) -> (logits [B, n, V] fp32, (k, v), stats)

where ``cache`` is ``KVCache.attention_view()``'s ``{"k", "v", "meta"}`` (or None),
``(k, v)`` are the keys/values of ``tokens`` ([L, B, T, Hkv, Dh] each) and ``stats`` is
a dict of scalar diagnostics (``unique_experts``: mean distinct experts per MoE layer;
may be empty). ``params`` stays a traced argument so one compile serves any weights.
``from_model`` adapts a ``Transformer``; a test can pass a five-line fake.
"""

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax.model import rope
from blockdiff_jax.sampling import kv_cache

Array = Any


class LogitsFn(Protocol):
  """The interface the decoders drive (see the module docstring)."""

  kv_spec: kv_cache.KVSpec

  def __call__(self, params: Any, tokens: Array, meta: masks.TokenMeta,
               cache: dict | None = None,
               logits_slice: tuple[int, int] | None = None) -> tuple[Array, tuple, dict]:
    ...


@dataclasses.dataclass(frozen=True)
class ModelLogits:
  """A ``Transformer`` (or anything with its ``cfg`` and ``apply``) as a logits function."""

  model: Any

  @property
  def kv_spec(self) -> kv_cache.KVSpec:
    cfg = self.model.cfg
    with jax.ensure_compile_time_eval():  # Concrete even when read inside a jit.
      inv_freq, _ = rope.inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return kv_cache.KVSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                           cfg.compute_dtype,
                           tuple(float(x) for x in np.asarray(inv_freq, np.float64)))

  @property
  def summary(self):
    """The model's ``SummaryConfig`` (None without summary tokens)."""
    return getattr(self.model.cfg, "summary", None)

  def __call__(self, params, tokens, meta, cache=None, logits_slice=None, summary="none"):
    """``summary`` (a summary-token model): slots to append; their K/V and metadata come
    back in the stats as ``summary_kv`` and ``summary_meta``."""
    kw = {} if summary == "none" else {"summary": summary}
    logits, aux = self.model.apply({"params": params}, tokens, meta, cache=cache,
                                   return_kv=True, logits_slice=logits_slice, **kw)
    moe = aux.get("moe") or {}
    stats = {}
    if "unique_experts" in moe:
      stats["unique_experts"] = jnp.mean(moe["unique_experts"])
    if summary != "none":
      stats["summary_kv"], stats["summary_meta"] = aux["summary_kv"], aux["summary_meta"]
    return logits, aux["kv"], stats


def from_model(model: Any) -> ModelLogits:
  """The logits function of a model; pass its params to the decoder alongside."""
  return ModelLogits(model)


def check_no_summary_tokens(logits_fn: Any, decoder: str) -> None:
  """Refuses a summary-token model in a decoder that gives every token its own block.

  AR and ISD give each generated token a block of its own (block id = position), while
  a summary model's window counts blocks (``window_blocks``): a token would then see the
  full K/V of only the last few *tokens*, and nothing older, since these decoders keep no
  summary slots -- the prompt drops out of the model's view without an error.
  """
  su = getattr(logits_fn, "summary", None)
  if su is not None and getattr(su, "num_slots", 1):
    raise ValueError(f"{decoder} decoding gives every token its own block, so a model with "
                     "summary tokens (model.summary.num_slots > 0) would not see its prompt; "
                     "decode it with the block decoder")


def as_logits_fn(model_or_fn: Any) -> Any:
  """A logits function as is; a model (it has ``apply`` and ``cfg``) through ``from_model``."""
  if hasattr(model_or_fn, "kv_spec"):
    return model_or_fn
  return from_model(model_or_fn)
