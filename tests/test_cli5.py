"""The command line, config validation and metrics files refuse or survive what broke them."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from absl import flags

from blockdiff_jax import config as config_lib
from blockdiff_jax import main as main_lib
from blockdiff_jax import metrics_writer
from conftest import load_config_file


def _check(argv_tail):
  """Parses ``main``'s flags from ``argv_tail`` and runs its flag checks."""
  argv = ["blockdiff_jax.main", "--config=configs/tiny.py"] + argv_tail
  values = flags.FlagValues()
  holders = main_lib.define_flags(values, sys_argv=argv)
  values(argv)
  main_lib.check_flags(holders, values)


@pytest.fixture
def in_repo(monkeypatch):
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("workdir", ["", "  "])
def test_empty_workdir_is_a_usage_error(in_repo, workdir):
  # It was joined to relative paths: train wrote .lock, config.json and checkpoints/ into
  # the current directory before failing on os.makedirs('').
  with pytest.raises(app.UsageError, match=r"--workdir must name a directory"):
    _check([f"--workdir={workdir}", "--mode=train"])


def test_workdir_that_is_a_file_is_a_usage_error(in_repo, tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("x")
  with pytest.raises(app.UsageError, match=r"--workdir=.*notes\.txt is a file"):
    _check([f"--workdir={path}", "--mode=sample"])


def test_a_new_or_existing_directory_is_accepted(in_repo, tmp_path):
  _check([f"--workdir={tmp_path}", "--mode=train"])
  _check([f"--workdir={tmp_path / 'new'}", "--mode=eval"])


def _set(c, field, value):
  node = c
  parts = field.split(".")
  for part in parts[:-1]:
    node = node[part]
  node[parts[-1]] = value


BAD = [
    # None failed in a bare TypeError naming no field.
    ("train.steps", None, "train.steps must be an integer"),
    ("train.learning_rate", None, "train.learning_rate must be a number"),
    ("train.eval_every", None, "train.eval_every must be an integer"),
    # True passed as 1 (ml_collections lets a bool into an int field).
    ("train.steps", True, "train.steps must be an integer"),
    ("train.grad_accum_steps", True, "train.grad_accum_steps must be an integer"),
    # The first update sent the weights to inf; the run stopped on "NaN/Inf" at step 2.
    ("train.weight_decay", math.inf, "train.weight_decay must be finite"),
    ("diffusion.block_size", True, "diffusion.block_size must be an integer"),
    ("diffusion.block_size", None, "diffusion.block_size must be an integer"),
    ("diffusion.eps", None, "diffusion.eps must be a number"),
    ("data.seq_len", None, "data.seq_len must be an integer"),
]


@pytest.mark.parametrize("field, value, message", BAD,
                         ids=[f"{f}={v}" for f, v, _ in BAD])
def test_validate_names_the_field(field, value, message):
  c = load_config_file("tiny")
  _set(c, field, value)
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    config_lib.validate(c)


def _introspective(clean_weight):
  c = load_config_file("tiny")
  c.diffusion.objective = "introspective"
  c.diffusion.token_shift = True
  c.diffusion.clean_weight = clean_weight
  return c


def test_infinite_clean_weight_is_refused():
  config_lib.validate(_introspective(0.5))
  with pytest.raises(ValueError, match=r"diffusion\.clean_weight must be a finite number"):
    config_lib.validate(_introspective(math.inf))


def test_finite_or_none_gives_strict_json_for_numpy_and_jax_values():
  tree = {"f32": np.float32(1.5), "i64": np.int64(3), "b": np.bool_(True),
          "jax": jnp.float32(2.0), "arr": np.array([1.0, np.nan]), "nan32": np.float32("nan"),
          "zero_d": np.array(4.0), "keep": [1, "x", None]}
  text = json.dumps(metrics_writer.finite_or_none(tree), allow_nan=False)
  assert json.loads(text) == {"f32": 1.5, "i64": 3, "b": True, "jax": 2.0, "arr": [1.0, None],
                              "nan32": None, "zero_d": 4.0, "keep": [1, "x", None]}


TORN = '{"step": 5, "lo'


def test_read_rows_skips_a_torn_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n' + TORN)
  assert metrics_writer.read_rows(str(path)) == [{"step": 1, "loss": 2.0}]
  path.write_text(TORN + '\n{"step": 1, "loss": 2.0}\n')  # Not the last: still an error.
  with pytest.raises(json.JSONDecodeError):
    metrics_writer.read_rows(str(path))


@pytest.mark.parametrize("tail, kept", [(TORN, []), ('{"step": 5, "loss": 1.0}', [5])])
def test_appending_writer_does_not_glue_onto_an_unended_line(tmp_path, tail, kept):
  # --mode=eval appends its row without truncating: glued onto a torn row, both were lost.
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n' + tail)
  writer = metrics_writer.MetricsWriter(str(tmp_path), tensorboard=False)
  writer.write(9, {"eval/x": np.float32(0.5)})
  writer.close()
  rows = metrics_writer.read_rows(str(path))
  assert [r["step"] for r in rows] == [1] + kept + [9]
  assert rows[-1]["eval/x"] == 0.5


@pytest.mark.parametrize("field, value, message", [
    ("timeout_s", None, r"eval\.timeout_s must be a finite number > 0, got None"),
    ("long_context_depths", None, r"eval\.long_context_depths must be comma-separated"),
])
def test_eval_fields_of_the_wrong_type_are_named(field, value, message):
  c = load_config_file("tiny")
  c.eval[field] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)
