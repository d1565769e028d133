"""The base experiment config that every file in ``configs/`` starts from, and its validation.

One rule places every section: its defaults (``default_*_config``) and its checks
live next to the code it configures, and this module only assembles them:

| section     | defined in                          |
|-------------|-------------------------------------|
| init        | ``blockdiff_jax/checkpoint/initial.py`` |
| model       | ``blockdiff_jax/model/config.py``   |
| diffusion   | ``blockdiff_jax/diffusion/config.py`` |
| data        | ``blockdiff_jax/data/config.py``    |
| train       | ``blockdiff_jax/train/config.py``   |
| mesh        | ``blockdiff_jax/model/mesh.py`` (optional; none = one device) |
| sample      | ``blockdiff_jax/sampling/sample.py`` |
| distill     | ``blockdiff_jax/sampling/distill.py`` |
| eval        | ``blockdiff_jax/evaluation/eval_config.py`` |
| serve       | ``blockdiff_jax/serving/config.py`` |

Config files override what they need; the command line overrides the rest, e.g.
``--config.model.moe.num_experts=8``. ``validate`` runs before anything compiles and
names the offending field and value. This module sits at the top of the import
order (next to ``main``): library code imports the section modules, never this one.
"""

import importlib.util
import os

import ml_collections

from blockdiff_jax.checkpoint import initial
from blockdiff_jax.data import config as data_config
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.evaluation import eval_config
from blockdiff_jax.model import config as model_config_lib
from blockdiff_jax.model import mesh as mesh_lib
from blockdiff_jax.sampling import distill as distill_lib
from blockdiff_jax.sampling import sample as sample_lib
from blockdiff_jax.serving import config as serve_config
from blockdiff_jax.train import config as train_config

# The static model config and the objective of an experiment config, for config
# files, experiments and notebooks (library code calls the section modules).
model_config = model_config_lib.model_config
objective = diffusion_config.objective


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all experiments (a tiny MoE block-diffusion model)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seed of parameter init, noise draws and data order.
  c.init = initial.default_init_config()  # Random init or a pretrained checkpoint.
  c.init_from = initial.default_init_from_config()  # Or another run's checkpoint.
  c.model = model_config_lib.default_model_config()  # Architecture.
  c.diffusion = diffusion_config.default_diffusion_config()  # Blocks, noise schedule.
  c.data = data_config.default_data_config()  # Corpus, tokenizer, sequence length, batch.
  c.sample = sample_lib.default_sample_config()  # Decoding policy, limits, prompts.
  c.distill = distill_lib.default_distill_config()  # --mode=distill: self-distillation data.
  c.eval = eval_config.default_eval_config()  # Tasks and settings of --mode=eval.
  c.serve = serve_config.default_serve_config()  # --mode=serve: host, port, slots, queue.
  c.train = train_config.default_train_config()  # Optimizer, schedule, logging, checkpoints.
  return c


def _load_file(path: str):
  """The module of a config file (``path`` without a ``:arg``), loaded by path."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(
      "config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def from_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file (as ``--config=path`` loads it), for notebooks.

  ``path[:arg]``: as config_flags does, everything after the first colon is passed to
  ``get_config`` (``configs/long_context_extension.py:quickstart,8``).
  """
  # Without the split, a documented "file.py:arg" was reported as a missing file.
  file, sep, arg = path.partition(":")
  module = _load_file(file)
  return module.get_config(arg) if sep else module.get_config()


def validate_file(config: ml_collections.ConfigDict, path: str) -> None:
  """The checks of the config file ``path[:arg]`` itself: its ``validate(config)``, if any.

  A recipe file may require fields the base checks cannot know about
  (``configs/long_context_extension.py`` needs ``init_from.workdir``, or its fine-tune
  would train YaRN from random weights without a word).
  """
  check = getattr(_load_file(path.partition(":")[0]), "validate", None)
  if check is not None:
    check(config)


def _validate_init_from(config: ml_collections.ConfigDict) -> None:
  """``init_from.step`` is read only when the trainer restores the source run: after
  config.json is written and the data is built. Checked here before that."""
  source = config.get("init_from")
  if source is None:
    return
  step = source.get("step", -1)
  if isinstance(step, bool) or not isinstance(step, int) or step < -1:
    raise ValueError(f"init_from.step must be -1 (latest) or a step >= 0, got {step!r}")
  # Without a source run the step is dropped and the run starts from random weights.
  if step != -1 and not source.get("workdir"):
    raise ValueError(f"init_from.step={step} picks a checkpoint of init_from.workdir, "
                     "which is empty; give the source run with --config.init_from.workdir")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid field; silent when the config is sound.

  Every section is checked, whatever the mode: a config that trains is one that
  ``--mode=eval``, ``serve`` and ``distill`` accept later on the same workdir.
  """
  seed = config.get("seed", 0)
  # numpy's generators (the data order) refuse negative seeds, after the model is built.
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
  if seed >= 2**32:  # jax.random.key keeps its low 32 bits: 2**32 + 5 would be seed 5.
    raise ValueError(f"seed must be below 2**32, got {seed!r}")
  _validate_init_from(config)
  train_config.validate(config)
  if config.get("mesh") is not None:  # Before any device is asked for: a typo'd axis.
    mesh_lib.validate(config.mesh)
  sample_lib.validate(config)
  distill_lib.validate(config)
  # Over the defaults, as evaluate.run and server.run read them: a config saved before
  # a field existed gets that field's default.
  for name, default, check in (("eval", eval_config.default_eval_config, eval_config.validate),
                               ("serve", serve_config.default_serve_config,
                                serve_config.validate)):
    if config.get(name) is not None:
      section = default()
      section.update(config[name].to_dict())
      check(section)
