"""Hardening of the train step's accumulated metrics, the metrics writer, the console
progress line, the KV-cache layout's field checks and the plan's mesh warnings."""

import io
import os

import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax import metrics_writer
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.model import config as model_config
from blockdiff_jax.model import kv_memory
from blockdiff_jax.model import mesh as mesh_lib
from blockdiff_jax.model import transformer
from blockdiff_jax.train import plan as plan_lib
from blockdiff_jax.train import step as step_lib
from conftest import sgd_steps_by_accumulation


def test_accumulated_masked_metrics_are_those_of_the_full_batch():
  """BD3-LM's masked_ce / masked_accuracy are means over masked tokens: accumulation
  weighed them by the scored count, so they missed the full batch's values."""
  cfg = config_lib.base_config()
  cfg.data.seq_len, cfg.data.batch_size = 32, 4
  cfg.model.d_model, cfg.model.moe.num_experts = 32, 0
  # Micro-batch 0 (rows 0, 2) scores 8 tokens, micro-batch 1 (rows 1, 3) 64: their
  # masked shares differ, which is what separates the two weighings.
  _, ((_, want), (_, got)) = sgd_steps_by_accumulation(cfg, [4, 32, 4, 32])
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=2e-6, err_msg=key)
  # Some but not all scored tokens are masked: the two counts differ.
  assert 0 < float(want["masked_fraction"]) < 1


@pytest.mark.parametrize("value,kind", [("abc", "str"), ("3", "str"), (None, "NoneType"),
                                        ({"a": 1.0}, "dict"), (1 + 2j, "complex")])
def test_a_metric_that_is_not_a_number_is_refused_naming_it(tmp_path, value, kind):
  """A string failed as float()'s bare "could not convert string to float" and a digit
  string was logged as a number; the error names the metric (with its prefix)."""
  writer = metrics_writer.MetricsWriter(str(tmp_path), tensorboard=False)
  with pytest.raises(TypeError, match=f"metric 'val_note' .*{kind}"):
    writer.write(3, {"loss": 1.0, "note": value}, prefix="val_")
  row = writer.write(4, {"loss": np.float32(2.0), "n": jnp.array([5])})
  writer.close()
  assert row == {"step": 4, "loss": 2.0, "n": 5.0}
  # The refused row wrote nothing: the file holds the good row only.
  rows = metrics_writer.read_rows(os.path.join(str(tmp_path), "metrics.jsonl"))
  assert rows == [row]


def test_progress_with_no_time_elapsed_reports_no_rate(monkeypatch):
  """With a clock that has not moved, the rate was 5 / 1e-9 = 5e9 steps/s."""
  monkeypatch.setattr(metrics_writer.time, "time", lambda: 100.0)
  stream = io.StringIO()
  p = metrics_writer.Progress(10, stream=stream)
  assert p.rate(5) == 0.0
  p.print(5)
  assert stream.getvalue() == "[5/10  50.0%] 0.00 step/s ETA ?\n"


def test_progress_of_a_finished_run_has_nothing_left(monkeypatch):
  """A run resumed at its last step has no rate (nothing trained yet) but nothing left:
  its ETA was "?"."""
  clock = iter([100.0, 160.0, 100.0, 160.0])
  monkeypatch.setattr(metrics_writer.time, "time", lambda: next(clock))
  p = metrics_writer.Progress(10, start=10)
  assert p.line(10) == "[10/10 100.0%] 0.00 step/s ETA 00:00:00"
  # With a rate, the ETA is the steps left over it, as before.
  q = metrics_writer.Progress(10, start=0)
  assert q.line(4) == "[4/10  40.0%] 0.07 step/s ETA 00:01:30"


@pytest.mark.parametrize("field,value", [("window", 1.5), ("chunk", 64.0), ("rank", 2.5),
                                         ("sinks", 0.5), ("window", True), ("chunk", "64")])
def test_hierarchy_fields_must_be_integers(field, value):
  """A float window made a float ring and byte counts (1.5 -> 640.0 slots); True passed
  as 1; a string failed as a bare '<' TypeError."""
  with pytest.raises(ValueError, match=f"kv hierarchy {field} must be an integer"):
    kv_memory.Hierarchy(**{field: value})
  sample = config_lib.base_config().sample
  sample[f"kv_{field}"] = value if not isinstance(value, (float, str)) else sample[
      f"kv_{field}"]
  if isinstance(value, bool):  # ml_collections casts only bools into an int field.
    with pytest.raises(ValueError, match=f"sample.kv_{field} must be an integer"):
      kv_memory.hierarchy_from_config(sample)
  # Integral numpy values stay accepted.
  h = kv_memory.Hierarchy(window=np.int64(2), chunk=np.int32(64), rank=4)
  assert h.ring == 192


def _tiny_plan_config(batch_size):
  c = config_lib.base_config()
  c.model.vocab_size, c.model.d_model, c.model.num_layers = 64, 32, 1
  c.model.moe.num_experts = 0
  c.data.seq_len, c.data.batch_size, c.diffusion.block_size = 16, batch_size, 4
  return c


@pytest.mark.parametrize("devices,batch_size,accum", [(8, 4, 1), (4, 8, 4), (4, 8, 2),
                                                      (2, 4, 1)])
def test_plan_warns_of_a_mesh_training_refuses(devices, batch_size, accum):
  """The batch shards must divide the micro-batch; the plan of a mesh they do not divide
  counted the whole micro-batch on every device and said it fit, with no warning."""
  c = _tiny_plan_config(batch_size)
  c.train.grad_accum_steps = accum
  r = plan_lib.plan(c, num_devices=devices)
  mc = mesh_lib.default_mesh_config()
  model = transformer.Transformer(model_config.model_config(c))
  try:  # The reference: what training does on that mesh (no arrays are made).
    step_lib.make_sharded_train(c, mesh_lib.abstract_mesh(mc, devices), model,
                                diffusion_config.objective(c, 63),
                                rules=mesh_lib.logical_rules(mc))
    refused = None
  except ValueError as e:
    refused = str(e)
  if refused is None:
    assert r["warnings"] == []
    assert "WARNING" not in plan_lib.format_table(r)
  else:
    assert len(r["warnings"]) == 1 and r["warnings"][0].startswith(refused)
    assert f"WARNING: {refused}" in plan_lib.format_table(r)
  assert (refused is None) == ((batch_size // accum) % devices == 0)


def test_plan_takes_the_byte_tokenizers_vocabulary():
  """--mode=plan of a byte-tokenizer config (vocab_size 0, e.g. configs/quickstart.py) sizes
  the byte vocabulary instead of refusing; another tokenizer still needs vocab_size."""
  c = _tiny_plan_config(2)
  c.model.vocab_size = 0
  got = plan_lib.plan(c)
  c.model.vocab_size = 256 + 8  # Bytes and the eight specials.
  assert got["params"] == plan_lib.plan(c)["params"]
  c.model.vocab_size, c.data.tokenizer = 0, "bpe"
  with pytest.raises(ValueError, match="model.vocab_size is 0"):
    plan_lib.plan(c)


def test_plan_of_an_upcycled_config_has_experts_as_wide_as_the_dense_mlp():
  c = _tiny_plan_config(2)
  c.model.mlp_dim, c.model.moe.num_experts, c.model.moe.top_k = 96, 4, 2
  c.model.moe.upcycle_from_dense = True
  c.init.pretrained = "smollm2"  # Required by upcycling; the plan loads no weights.
  got = plan_lib.plan(c)["params"]
  c.model.moe.upcycle_from_dense, c.model.moe.expert_dim = False, 96
  c.model.moe.first_dense_layers = 0
  assert got == plan_lib.plan(c)["params"]
  assert got > plan_lib.plan(_tiny_plan_config(2))["params"]
