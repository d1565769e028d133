"""Configs a hostile user gets through today must be refused before compiling, naming the field."""

import os

import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax.train import step as step_lib
from blockdiff_jax.train import trainer
from conftest import load_config_file


def _set(c, field, value):
  section, _, name = field.rpartition(".")
  node = c
  for part in section.split("."):
    node = node[part]
  node[name] = value


BAD = [
    ("model.moe.expert_dim", -5), ("model.moe.expert_dim", 0), ("model.moe.top_k", 0),
    ("model.moe.num_experts", -1), ("model.moe.shared_expert_dim", -8),
    ("model.moe.tile_size", 0), ("model.d_model", 0), ("model.num_layers", -1),
    ("model.head_dim", -16), ("model.mlp_dim", 0), ("model.vocab_size", -3),
    ("train.warmup_steps", -1), ("train.eval_every", -10), ("train.grad_clip", -1.0),
    ("train.weight_decay", -0.1), ("train.weight_decay", float("nan")),
    ("train.min_lr_ratio", -0.5), ("train.b2", 1.0), ("train.eval_batches", 0),
]


@pytest.mark.parametrize("field, value", BAD, ids=[f"{f}={v}" for f, v in BAD])
def test_validate_refuses_and_names_the_field(field, value):
  c = config_lib.base_config()
  _set(c, field, value)
  with pytest.raises(ValueError, match=field.replace(".", r"\.") + r" must be"):
    config_lib.validate(c)


@pytest.mark.parametrize("field, value", [("train.warmup_steps", 0), ("train.eval_every", 0),
                                          ("train.grad_clip", 0.0),
                                          ("train.weight_decay", 0.0),
                                          ("model.moe.num_experts", 0)])
def test_zero_still_means_off(field, value):
  c = load_config_file("tiny")
  _set(c, field, value)
  config_lib.validate(c)


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if the trainer gets as far as building its jitted step."""
  def refuse(*args, **kwargs):
    raise AssertionError("reached compilation")
  monkeypatch.setattr(step_lib, "make_sharded_train", refuse)


def test_trainer_refuses_expert_dim_before_touching_the_workdir(tmp_path, no_compile):
  c = load_config_file("tiny")
  c.model.moe.expert_dim = -5
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"model\.moe\.expert_dim must be >= 1, got -5"):
    trainer.run(c, workdir)
  assert not os.path.exists(workdir)


def test_vocab_smaller_than_the_tokenizers_is_refused_before_compiling(tmp_path, no_compile):
  c = load_config_file("tiny")
  c.model.vocab_size = 100  # The byte tokenizer has 256 bytes plus specials.
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"model\.vocab_size=100 is smaller than the "
                                       r"tokenizer's \d+ tokens"):
    trainer.run(c, workdir)
  assert not os.path.exists(os.path.join(workdir, "config.json"))
