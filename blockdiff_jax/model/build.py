"""Building a model from a config: construct, init in its shards, apply.

Init follows the usual three steps: ``jax.eval_shape`` gives the boxed parameter
shapes with their logical axis names, the mesh rules turn those into shardings,
and the init runs under ``jax.jit(out_shardings=...)`` so no device ever holds a
full-size copy. On a one-device mesh this is a plain init.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from blockdiff_jax.data import tokenizers
from blockdiff_jax import masks
from blockdiff_jax.model import config as model_config_lib
from blockdiff_jax.model import mesh as mesh_lib
from blockdiff_jax.model import transformer

Array = Any


def build_model(config: ml_collections.ConfigDict, workdir: str | None = None,
                tokenizer: tokenizers.Tokenizer | None = None, strict_tokenizer: bool = True):
  """(model, tokenizer) of a config.

  Args:
    config: the experiment config.
    workdir: where a trained BPE tokenizer is kept (``data.tokenizer=bpe``).
    tokenizer: use this one (a pretrained model's) instead of ``config.data``'s.
    strict_tokenizer: refuse a workdir's BPE tokenizer trained with other ``data``
      fields (``tokenizers.get_tokenizer``'s ``strict``); inference passes False.
  """
  model_config_lib.validate(config)
  if tokenizer is None:
    tokenizer = tokenizers.get_tokenizer(config.data, workdir, strict=strict_tokenizer)
  # Ids past the embedding table would turn the loss NaN at step 1.
  if config.model.vocab_size and config.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"tokenizer's {tokenizer.vocab_size} tokens")
  model = transformer.Transformer(model_config_lib.model_config(config, tokenizer.vocab_size))
  return model, tokenizer


def _dummy_inputs(length: int = 8):
  tokens = jnp.zeros((1, length), jnp.int32)
  meta = masks.make_meta(jnp.arange(length)[None], 1, masks.CLEAN)
  return tokens, meta


def abstract_params(model: nn.Module, length: int = 8) -> Any:
  """Boxed ShapeDtypeStructs of the params (``jax.eval_shape``: nothing is allocated)."""
  tokens, meta = _dummy_inputs(length)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, meta)["params"])


def param_shardings(model: nn.Module, mesh, rules: mesh_lib.Rules) -> Any:
  """NamedShardings of the model's (unboxed) params on ``mesh`` under ``rules``."""
  return mesh_lib.param_shardings(abstract_params(model), mesh, rules)


def init_params(model: nn.Module, seed: int, mesh=None, rules: mesh_lib.Rules = (),
                length: int = 8) -> Any:
  """fp32 parameters, unboxed, created in their shards.

  Args:
    model: the Transformer.
    seed: init PRNG seed (the PRNG is partitionable: values do not depend on the mesh).
    mesh: where the params live; None = the first device.
    rules: logical-axis rules (``mesh.logical_rules``).
    length: tokens of the dummy input used to trace the init.
  """
  if mesh is None:
    mesh = mesh_lib.make_mesh(mesh_lib.single_device_mesh_config(), jax.local_devices()[:1])
  shardings = param_shardings(model, mesh, rules)
  tokens, meta = _dummy_inputs(length)

  def init():
    return nn.unbox(model.init(jax.random.key(seed), tokens, meta)["params"])

  # Traced outside mesh_context on purpose: flax applies the logical rules to
  # intermediate (reshaped) kernels inside init when rules are active, which is
  # both wrong (rank mismatch) and unneeded: out_shardings alone sets the layout.
  return jax.jit(init, out_shardings=shardings)()


def make_apply(model: nn.Module) -> Callable:
  """``apply_fn(params, tokens, meta, **kwargs) -> (logits, aux)`` of a model.

  The objectives and likelihood evaluation call it on the training input
  ``[x_t ; x_0]``: a model with summary tokens gets ``summary="bd3"`` (slots for
  the clean stream) unless the caller passes ``summary`` itself.
  """
  defaults = {}
  if getattr(getattr(model, "cfg", None), "summary", None) is not None:
    defaults["summary"] = "bd3"

  def apply_fn(params, tokens, meta, **kwargs):
    return model.apply({"params": params}, tokens, meta, **{**defaults, **kwargs})
  return apply_fn
