"""The RoPE-extension recipe config: scaling consistent with the data, source params load."""

import jax
import numpy as np
import pytest

from conftest import load_config_file, load_repo_module
from test_rope import _assert_matches_hf
from blockdiff_jax import config as config_lib
from blockdiff_jax.model import rope


def _module():
  return load_repo_module("configs", "long_context_extension")


@pytest.mark.parametrize("arg,base,factor", [(None, "quickstart", 8), ("tiny,4", "tiny", 4),
                                             ("synthetic,16", "synthetic", 16),
                                             ("long_context_retrieval,4",
                                              "long_context_retrieval", 4)])
def test_extension_scales_rope_to_the_new_length(arg, base, factor):
  module = _module()
  c, b = module.get_config(arg), load_config_file(base)
  config_lib.validate(c)
  rs = c.model.rope_scaling
  assert rs.type == "yarn" and rs.factor == factor
  assert rs.original_max_position == b.data.seq_len
  assert c.data.seq_len == factor * b.data.seq_len
  assert c.data.seq_len * c.data.batch_size <= b.data.seq_len * b.data.batch_size
  assert c.train.steps <= b.train.steps and c.train.learning_rate < b.train.learning_rate
  with pytest.raises(ValueError, match="init_from.workdir"):
    module.validate(c)
  c.init_from.workdir = "/tmp/source_run"
  module.validate(c)
  c.model.rope_scaling.factor = factor / 2
  with pytest.raises(ValueError, match="rope_scaling.factor"):
    module.validate(c)
  # The scaled frequencies are transformers' YaRN for this head_dim and length.
  _assert_matches_hf(rope.RopeScaling("yarn", float(factor), b.data.seq_len),
                     c.model.head_dim, c.model.rope_theta)


def test_source_checkpoint_params_fit_the_extended_model():
  from blockdiff_jax.model import transformer  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import build  # pylint: disable=g-import-not-at-top
  shapes = []
  for c in (load_config_file("tiny"), _module().get_config("tiny,4")):
    model = transformer.Transformer(config_lib.model_config(c, vocab_size=300))
    tree = jax.eval_shape(lambda m=model: build.init_params(m, 0))
    shapes.append(jax.tree.map(lambda x: (x.shape, x.dtype), tree))
  assert shapes[0] == shapes[1]


def test_long_context_eval_lengths_and_bad_bases():
  module = _module()
  c = module.get_config("quickstart,8")
  assert c.eval.long_context_lengths == "512,1024,2048"
  assert "long_context" in c.eval.tasks
  c.init_from.workdir = "/tmp/x"
  c.eval.long_context_depths = "0.5,1.5"
  with pytest.raises(ValueError, match="eval.long_context_depths"):
    module.validate(c)
  # chatdlm_7b.py describes the already-extended model (YaRN x32 over 4,096).
  with pytest.raises(ValueError, match="already scales RoPE"):
    module.get_config("chatdlm_7b,32")
  with pytest.raises(ValueError, match="not found"):
    module.get_config("no_such_config")
  with pytest.raises(ValueError, match="factor must be >= 2"):
    module.get_config("tiny,1")


def _small(c, steps):
  c.data.max_bytes, c.data.batch_size = 40_000, 4
  c.model.d_model, c.model.moe.expert_dim = 32, 32
  t = c.train
  t.steps, t.log_every, t.eval_every, t.checkpoint_every = steps, 1, 0, steps
  t.async_checkpoints, t.tensorboard = False, False
  return c


def test_extension_run_starts_from_the_source_checkpoint(tmp_path):
  """The trainer honours init_from: the fine-tune's one update (Adam, LR 1e-6: each weight
  moves by about 1e-6) is applied to the source run's parameters, not to a fresh init."""
  from blockdiff_jax.checkpoint import initial  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.checkpoint import inference  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import trainer  # pylint: disable=g-import-not-at-top
  source, ext = str(tmp_path / "source"), str(tmp_path / "ext")
  base = _small(load_config_file("tiny"), 3)
  base.train.ema_decay = 0.0  # One parameter set: what init_from reads is unambiguous.
  trainer.run(base, source)
  c = _small(_module().get_config("tiny,4"), 1)
  c.train.ema_decay, c.train.learning_rate = 0.0, 1e-6
  c.seed = base.seed + 1  # A fresh init would differ from the source.
  c.init_from.workdir = source
  _module().validate(c)
  trainer.run(c, ext)
  want = inference.load_for_inference(source)[3]
  _, model, _, got = inference.load_for_inference(ext)
  gap = lambda x, y: max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                         for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  assert gap(got, want) < 1e-5
  from blockdiff_jax.model import build  # pylint: disable=g-import-not-at-top
  assert gap(build.init_params(model, c.seed), want) > 1e-2  # What a fresh init would be.
  # Errors name the field: a source without a checkpoint.
  c.init_from.workdir = str(tmp_path / "empty")
  with pytest.raises(ValueError, match="init_from.workdir=.*has no checkpoint"):
    initial.initial_params(c, model, None)
  # With init.pretrained too (it fixed the architecture), the weights are the run's.
  c.init_from.workdir, c.init.pretrained = source, "smollm2"
  assert gap(initial.initial_params(c, model, None), want) < 1e-5
