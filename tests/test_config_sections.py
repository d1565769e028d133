"""Config sections: one rule places them, and backend fields stay out of config.json."""

import json

import jax
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.data import config as data_config
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.evaluation import eval_config
from blockdiff_jax.model import config as model_config
from blockdiff_jax.sampling import sample
from blockdiff_jax.train import config as train_config
from pallas_kernels import backend


@pytest.mark.parametrize("section, default", [
    ("model", model_config.default_model_config),
    ("diffusion", diffusion_config.default_diffusion_config),
    ("data", data_config.default_data_config),
    ("train", train_config.default_train_config),
    ("sample", sample.default_sample_config),
    ("eval", eval_config.default_eval_config),
])
def test_each_section_is_its_modules_default(section, default):
  assert config_lib.base_config()[section].to_dict() == default().to_dict()


def test_interpret_is_decided_by_the_backend():
  assert backend.resolve_interpret(None) == (jax.default_backend() != "gpu")
  assert backend.resolve_interpret(True) is True
  assert backend.resolve_interpret(False) is False
  assert config_lib.base_config().model.interpret is None


@pytest.mark.parametrize("interpret", [None, True, False])
def test_interpret_is_not_saved_into_config_json(tmp_path, interpret):
  c = config_lib.base_config()
  c.model.interpret = interpret
  checkpoints.save_config(c, str(tmp_path))
  saved = json.loads((tmp_path / "config.json").read_text())
  assert "interpret" not in saved["model"]
  assert c.model.interpret is interpret  # The caller's config is left alone.
  loaded = checkpoints.load_config(str(tmp_path))
  assert model_config.model_config(loaded, 300).interpret is None
  assert (model_config.model_config(loaded, 300)
          == model_config.model_config(config_lib.base_config(), 300))


@pytest.mark.parametrize("field, value, message", [
    ("diffusion.block_size", 0, "diffusion.block_size"),
    ("data.seq_len", 60, "data.seq_len=60"),
    ("data.batch_size", 0, "data.batch_size"),
    ("train.ema_decay", 1.0, "train.ema_decay"),
    ("model.moe.router_mode", "nope", "model.moe.router_mode"),
])
def test_validate_names_the_bad_field(field, value, message):
  c = config_lib.base_config()
  section, _, name = field.rpartition(".")
  node = c
  for part in section.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    config_lib.validate(c)


def test_from_file_loads_a_config_file_as_the_flag_does(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = config_lib.from_file(os.path.join(repo, "configs", "smollm2_idlm.py"))
  # The file's own overrides on top of the file it builds on (configs/smollm2.py).
  assert c.diffusion.objective == "introspective" and c.init.pretrained == "smollm2"
  with pytest.raises(FileNotFoundError, match="nope.py"):
    config_lib.from_file(str(tmp_path / "nope.py"))


def test_serve_forwards_per_call_is_validated():
  from blockdiff_jax.serving import config as serve_config  # pylint: disable=g-import-not-at-top
  s = serve_config.default_serve_config()
  serve_config.validate(s)
  s.forwards_per_call = 0
  with pytest.raises(ValueError, match="serve.forwards_per_call"):
    serve_config.validate(s)
