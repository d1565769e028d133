"""A trained workdir as (config, model, tokenizer, params), and the context to run it in."""

import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import initial
from blockdiff_jax.model import mesh as mesh_lib


def inference_context(config: ml_collections.ConfigDict):
  """``with inference_context(config):`` the config's mesh and rules (one device without).

  Sampling and evaluation run inside it, so the model's MoE dispatch and layout
  constraints see the mesh the params were restored onto (``load_for_inference``).
  """
  return mesh_lib.mesh_context(*mesh_lib.mesh_of(config))


def abstract_params(model: nn.Module, mesh, rules: mesh_lib.Rules) -> Any:
  """The params as ``jax.ShapeDtypeStruct``s on ``mesh`` (``initial.restore_target``)."""
  return initial.restore_target(model, mesh, rules)


def load_for_inference(workdir: str, config: ml_collections.ConfigDict | None = None,
                       step: int | None = None, use_ema: bool = True):
  """Loads (config, model, tokenizer, params) from a training workdir.

  Only the parameters are read (Orbax partial restore through tensorstore; the
  optimizer state stays on disk), laid out on ``config.mesh`` when the config has
  one (each device reads its own shards) and on one device otherwise (also when
  the mesh's fixed axes need more devices than this machine has; the returned
  config then has no mesh).

  A workdir without a checkpoint whose config has ``init.pretrained`` gives the
  pretrained weights (e.g. the AR baseline of a real model before any training).

  Args:
    workdir: a directory written by the trainer (or any folder, with a pretrained config).
    config: overrides the saved config (e.g. to switch the attention implementation
      or the mesh); architecture fields must match the checkpoint.
    step: checkpoint step; None = the latest.
    use_ema: return the EMA parameters when the run kept them.
  """
  config = checkpoints.load_config(workdir) if config is None else config
  config, model, tokenizer = initial.build_model(config, workdir)
  if config.get("mesh") is not None:
    try:
      mesh_lib.make_mesh(config.mesh)
    except ValueError as e:
      # E.g. a run trained on 8 devices, sampled on 1: the fixed mesh axes don't fit.
      print(f"config.mesh does not fit this machine ({e}); loading onto one device",
            flush=True)
      config = config.copy_and_resolve_references()
      del config.mesh
  mesh, rules = mesh_lib.mesh_of(config)
  abstract = abstract_params(model, mesh, rules)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  if step is None and not checkpoints.has_checkpoint(checkpoint_dir):
    # Nothing trained yet: a pretrained config answers with its own weights.
    params = initial.initial_params(config, model, workdir, mesh, rules)
    if params is not None:
      source = (f"init_from.workdir={config.init_from.workdir!r}"
                if config.get("init_from") is not None and config.init_from.get("workdir")
                else f"init.pretrained={config.init.pretrained!r}")
      print(f"{workdir} has no checkpoint: using the starting weights of {source}",
            flush=True)
      return config, model, tokenizer, params
  params = checkpoints.restore_params(
      checkpoint_dir, abstract, step,
      subtree="ema_params" if use_ema else "params", fallback_subtree="params")
  return config, model, tokenizer, params
