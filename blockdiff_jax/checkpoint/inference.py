"""A trained workdir as (config, model, tokenizer, params), and the context to run it in."""

import dataclasses
import logging
import os
from typing import Any

import flax.linen as nn
import ml_collections

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import initial
from blockdiff_jax.model import config as model_config
from blockdiff_jax.model import lora as lora_lib
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


def fold_adapters(config: ml_collections.ConfigDict, model: nn.Module, params: Any):
  """(config, model, params) with plain LoRA adapters folded into the base weights.

  Exact up to float rounding: a plain model (no adapter code in serving or export). The
  returned config has ``model.lora.rank = 0`` and the model no adapters, so the three
  stay consistent. Gated adapters (I-DLM: active on MASK tokens only) and models without
  adapters come back unchanged.
  """
  cfg = getattr(model, "cfg", None)
  lora = getattr(cfg, "lora", None)
  if lora is None or lora.gated:
    return config, model, params
  params = lora_lib.merge_adapters(params, lora)
  config = config.copy_and_resolve_references()
  config.model.lora.rank = 0
  return config, model.clone(cfg=dataclasses.replace(cfg, lora=None)), params


def _saved_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The workdir's saved config for the checks below; None when the caller's config is all
  there is (no ``config.json``, or one that does not load)."""
  try:
    # As saved: a field it lacks is not checked (it is not known what the run used).
    return checkpoints.load_config(workdir, fill_defaults=False)
  except (FileNotFoundError, ValueError):
    return None


def _check_adapters_kept(workdir: str, model: nn.Module) -> None:
  """Raises when ``model`` has no place for ``workdir``'s adapters or runs them otherwise.

  A partial restore reads only the leaves the target names, so a config without
  ``model.lora`` would silently load the base weights of a LoRA run; and ``alpha`` and
  ``gated`` are not in the checkpoint's shapes, so another scale or gating would restore
  the adapters into another function without any error.
  """
  saved = _saved_config(workdir)
  if saved is None:
    return
  saved_lora = saved.get("model", {}).get("lora", {})
  rank = saved_lora.get("rank", 0)
  given = getattr(getattr(model, "cfg", None), "lora", None)
  if rank and given is None:
    raise ValueError(
        f"the run in {workdir!r} trained LoRA adapters (model.lora.rank={rank}) but the config "
        "given has model.lora.rank=0, so they would be dropped; pass the run's own config "
        "(the config load_for_inference returns has its adapters folded in)")
  if not rank or given is None:
    return
  for field in ("alpha", "gated"):
    if field in saved_lora and saved_lora[field] != getattr(given, field):
      raise ValueError(
          f"the run in {workdir!r} trained its LoRA adapters with model.lora.{field}="
          f"{saved_lora[field]!r} but the config given has model.lora.{field}="
          f"{getattr(given, field)!r}, which makes them compute another function; pass "
          f"--config.model.lora.{field}={saved_lora[field]}")


def _check_mask_kept(workdir: str, model: nn.Module) -> None:
  """Raises when ``model`` attends inside a block otherwise than ``workdir``'s run trained.

  ``diffusion.block_attention`` is not in the checkpoint's shapes, so a config that
  leaves it at its default would restore a causal-block run's weights under
  bidirectional blocks (or the reverse) without any error.
  """
  saved = (_saved_config(workdir) or {}).get("diffusion", {})
  spec = getattr(getattr(model, "cfg", None), "mask_spec", None)
  if spec is None or not saved:
    return
  name = lambda m: {(False, False): "bidirectional", (True, False): "causal noisy blocks",
                    (True, True): "causal"}.get((m.causal_noisy, m.causal_clean), str(m))
  trained = name(model_config.mask_spec(saved))
  if trained != name(spec):
    raise ValueError(
        f"the run in {workdir!r} was trained with {trained} attention inside a block "
        f"(diffusion.block_attention={saved.get('block_attention', 'auto')!r}, objective "
        f"{saved.get('objective')!r}) but the config given makes it {name(spec)}; pass "
        f"--config.diffusion.block_attention={saved.get('block_attention', 'auto')}")


# Model fields that change the function the weights compute without changing any
# parameter's shape, so a restore under another value raises nothing. Fields meant to be
# varied at inference (attention_impl, dtype, rope_scaling for a longer context, the MoE
# routing mode and coverage that routing_sweep varies, capacity_factor) are not listed.
_FUNCTION_FIELDS = ("rope_theta", "norm_eps", "moe.top_k", "moe.router_func",
                    "moe.normalize_topk")


def _field(section: Any, dotted: str) -> tuple[bool, Any]:
  """(present, value) of a dotted field in a config section (ConfigDict or dict)."""
  for name in dotted.split("."):
    if section is None or name not in section:
      return False, None
    section = section[name]
  return True, section


def _check_function_kept(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises when ``config`` (as built) gives the run's weights another function.

  E.g. a run trained with ``--config.model.moe.top_k=1`` and evaluated with its config
  file's default ``top_k=2`` would restore without error and route every token to an
  expert it never trained with. Both configs are compared after the pretrained
  architecture (if any) is applied; a field the saved config lacks is not checked.
  """
  saved = _saved_config(workdir)
  # Another pretrained base is another model (its restore fails on shapes or is meant);
  # resolving the saved one here would convert a second checkpoint into the workdir.
  if saved is None:
    return
  specs = [initial._spec(c) for c in (saved, config)]  # pylint: disable=protected-access
  if specs[0] != specs[1]:  # Also the same model spelt two ways: say the check is skipped.
    logging.warning("%s was trained from init.pretrained=%r, the config given names %r: "
                    "its rope_theta, norm_eps and MoE routing fields are not checked against "
                    "the run's", workdir, specs[0], specs[1])
    return
  try:
    saved = initial.resolve_config(saved, workdir)[0]
  except Exception:  # pylint: disable=broad-except
    return  # A saved config that no longer resolves: the caller's config is all there is.
  moe_on = [bool(_field(c.get("model"), "moe.num_experts")[1]) for c in (saved, config)]
  for dotted in _FUNCTION_FIELDS:
    if dotted.startswith("moe.") and not all(moe_on):
      continue  # The MoE fields mean nothing for a dense model (shapes differ otherwise).
    has_saved, trained = _field(saved.get("model"), dotted)
    has_given, given = _field(config.get("model"), dotted)
    if has_saved and has_given and trained != given:
      raise ValueError(
          f"the run in {workdir!r} was trained with model.{dotted}={trained!r} but the "
          f"config given has model.{dotted}={given!r}, which makes its weights compute "
          f"another function; pass --config.model.{dotted}={trained}")


def load_for_inference(workdir: str, config: ml_collections.ConfigDict | None = None,
                       step: int | None = None, use_ema: bool = True,
                       merge_lora: bool = True, return_step: bool = False):
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
      or the mesh); architecture fields must match the checkpoint, and so must the
      fields that change the function without a shape (block attention, LoRA,
      ``_FUNCTION_FIELDS``): each is checked against the run's ``config.json``.
    step: checkpoint step; None = the latest.
    use_ema: return the EMA parameters when the run kept them.
    merge_lora: fold plain (ungated) LoRA adapters into the base weights
      (``fold_adapters``); the returned config then has ``model.lora.rank = 0``.
    return_step: append the checkpoint step the params come from (the newest that
      restores when ``step`` is None; None for starting weights) to the tuple.
  """
  own_config = config is None  # The run's own config needs no _check_function_kept.
  config = checkpoints.load_config(workdir) if config is None else config
  moe = config.model.get("moe")
  if moe is not None and moe.get("num_experts") and moe.get("capacity_factor", 0.0):
    # The capacity bounds training's all-to-all buffers by dropping token copies past
    # it; at inference a row's answer would then depend on the rows sharing its device.
    config = config.copy_and_resolve_references()
    config.model.moe.capacity_factor = 0.0
    print("model.moe.capacity_factor set to 0 for inference (dropless expert dispatch)",
          flush=True)
  # The workdir's tokenizer is the one its checkpoints were trained with, whatever data
  # fields an eval or sampling config now sets.
  config, model, tokenizer = initial.build_model(config, workdir, strict_tokenizer=False)
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
      if merge_lora:
        config, model, params = fold_adapters(config, model, params)
      return (config, model, tokenizer, params) + ((None,) if return_step else ())
  _check_adapters_kept(workdir, model)
  _check_mask_kept(workdir, model)
  if not own_config:
    _check_function_kept(workdir, config)
  restored, params = checkpoints.restore_params(
      checkpoint_dir, abstract, step,
      subtree="ema_params" if use_ema else "params", fallback_subtree="params",
      return_step=True)
  if merge_lora:
    config, model, params = fold_adapters(config, model, params)
  return (config, model, tokenizer, params) + ((restored,) if return_step else ())
