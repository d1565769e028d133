"""Config hardening: a recipe file's own checks, ``file.py:arg`` paths, ``init_from.step``
and overrides of fields a config lacks.

* ``main`` runs the config file's ``validate`` (``configs/long_context_extension.py``):
  without ``--config.init_from.workdir`` its fine-tune trained YaRN from random weights.
* ``config.from_file`` takes ``path:arg`` as ``--config`` does.
* The extension's ``<base>,<factor>`` argument names a bad factor and refuses extra parts.
* ``init_from.step`` is checked before the workdir is written.
* ``--config.mesh.fsdp=2`` on a config without a mesh is a one-line flag error, not a
  ``KeyError: "'mesh'"`` traceback.
"""

import os
import subprocess
import sys

from absl import flags
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax import main as main_lib
from conftest import ROOT, load_repo_module

# ml_collections' config_flags loads each config file with the deprecated load_module().
pytestmark = pytest.mark.filterwarnings(
    "ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")

EXTENSION = os.path.join(ROOT, "configs", "long_context_extension.py")
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _parsed(*words: str):
  """(flag holders, flag values) of ``blockdiff_jax.main`` over ``words``."""
  argv = ["blockdiff_jax.main", *words]
  values = flags.FlagValues()
  holders = main_lib.define_flags(values, sys_argv=argv)
  main_lib.parse_flags(argv, values)
  return holders, values


def test_main_runs_the_recipe_files_own_checks(tmp_path):
  run = f"--workdir={tmp_path / 'x2'}"
  ok, values = _parsed(f"--config={EXTENSION}:tiny,2", run,
                       f"--config.init_from.workdir={tmp_path / 'src'}")
  main_lib.validate_config(ok, values)  # The documented command: accepted.
  # Without the source run the fine-tune would start from random weights.
  bare, values = _parsed(f"--config={EXTENSION}:tiny,2", run)
  config_lib.validate(bare.config.value)  # The base checks cannot know the recipe.
  with pytest.raises(ValueError, match="init_from.workdir is empty"):
    main_lib.validate_config(bare, values)
  # A longer seq_len than the YaRN factor was set for: 256 / 64 = 4, not 2.
  longer, values = _parsed(f"--config={EXTENSION}:tiny,2", run, "--config.data.seq_len=256",
                           f"--config.init_from.workdir={tmp_path / 'src'}")
  with pytest.raises(ValueError, match=r"model.rope_scaling.factor=2.0 but data.seq_len"):
    main_lib.validate_config(longer, values)


def test_a_recipe_without_its_source_run_stops_before_the_workdir(tmp_path):
  """The program itself (--mode=plan: nothing is trained when the check is missing)."""
  workdir = tmp_path / "x2"
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run(
      [sys.executable, "-m", "blockdiff_jax.main", f"--config={EXTENSION}:tiny,2",
       f"--workdir={workdir}", "--mode=plan"],
      cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=120)
  assert out.returncode != 0
  assert "init_from.workdir is empty" in out.stderr, out.stderr[-2000:]
  assert not workdir.exists()


def test_from_file_passes_the_argument_as_config_flags_does():
  got = config_lib.from_file(f"{EXTENSION}:tiny,4")
  want = load_repo_module("configs", "long_context_extension").get_config("tiny,4")
  assert got.to_dict() == want.to_dict()
  assert got.data.seq_len == 4 * config_lib.from_file(TINY).data.seq_len
  assert got.model.rope_scaling.factor == 4.0
  with pytest.raises(FileNotFoundError, match="missing.py"):
    config_lib.from_file(os.path.join(ROOT, "configs", "missing.py:tiny"))


@pytest.mark.parametrize("arg, message", [
    ("tiny,abc", r"factor must be an integer >= 2.*'abc'"),
    ("tiny,2.5", r"factor must be an integer >= 2.*'2.5'"),
    ("tiny,4,2", r"'<base config>\[,<factor>\]', got 'tiny,4,2'"),
])
def test_extension_argument_names_what_is_wrong(arg, message):
  module = load_repo_module("configs", "long_context_extension")
  assert module.get_config("tiny,4").model.rope_scaling.factor == 4.0  # The control.
  with pytest.raises(ValueError, match=message):
    module.get_config(arg)


@pytest.mark.parametrize("workdir, step, message", [
    ("runs/src", -5, r"init_from.step must be -1 \(latest\) or a step >= 0, got -5"),
    ("", 3, r"init_from.step=3 picks a checkpoint of init_from.workdir, which is empty"),
])
def test_init_from_step_is_refused_before_anything_runs(workdir, step, message):
  c = config_lib.from_file(TINY)
  c.init_from.workdir, c.init_from.step = workdir, step
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


@pytest.mark.parametrize("workdir, step", [("", -1), ("runs/src", -1), ("runs/src", 0),
                                           ("runs/src", 300)])
def test_init_from_sound_values_pass(workdir, step):
  c = config_lib.from_file(TINY)
  c.init_from.workdir, c.init_from.step = workdir, step
  config_lib.validate(c)


def test_an_override_of_a_missing_field_names_it(tmp_path):
  run = f"--workdir={tmp_path}"
  with pytest.raises(flags.IllegalFlagValueError,
                     match=r"--config.mesh.fsdp: the config has no field 'mesh'; only configs "
                           r"with a mesh section"):
    _parsed(f"--config={TINY}", run, "--config.mesh.fsdp=2")
  with pytest.raises(flags.IllegalFlagValueError,
                     match=r"--config.train.stepz: the config has no field 'train.stepz' "
                           r"\(Did you mean \"steps\""):
    _parsed(f"--config={TINY}", run, "--config.train.stepz", "5")
  # A config with a mesh takes the same override.
  holders, _ = _parsed(f"--config={os.path.join(ROOT, 'configs', 'chatdlm_7b.py')}", run,
                       "--config.mesh.fsdp=2")
  assert holders.config.value.mesh.fsdp == 2


def test_the_program_prints_one_line_for_a_missing_field(tmp_path, monkeypatch, capsys):
  """What ``__main__`` hands absl: a flag error and exit status 1, not a traceback."""
  argv = ["blockdiff_jax.main", f"--config={TINY}", f"--workdir={tmp_path}",
          "--config.mesh.fsdp=2"]
  values = flags.FlagValues()
  main_lib.define_flags(values, sys_argv=argv)
  parse = main_lib.parse_flags
  monkeypatch.setattr(main_lib, "parse_flags", lambda a: parse(a, values))
  with pytest.raises(SystemExit) as e:
    main_lib._parse_flags_with_usage(argv)  # pylint: disable=protected-access
  assert e.value.code == 1
  assert capsys.readouterr().err.startswith(
      "FATAL Flags parsing error: --config.mesh.fsdp: the config has no field 'mesh'")


def test_long_context_min_length_past_the_rows_is_refused_before_the_run():
  c = config_lib.from_file(os.path.join(ROOT, "configs", "long_context_retrieval.py"))
  room = c.data.seq_len - 24  # LongContextDataset.ANSWER_ROOM.
  c.data.long_context_min_length = room + 1
  with pytest.raises(ValueError, match=rf"long_context_min_length={room + 1} must be <= "):
    config_lib.validate(c)
  c.data.long_context_min_length = room  # The longest prompt is still a valid shortest.
  config_lib.validate(c)


def test_a_config_files_own_error_is_not_blamed_on_an_override(tmp_path):
  bad = tmp_path / "bad_config.py"
  bad.write_text("from blockdiff_jax import config as c\n\n"
                 "def get_config():\n  cfg = c.base_config()\n  cfg.train.warmup\n"
                 "  return cfg\n")
  with pytest.raises(AttributeError, match="warmup") as e:
    _parsed(f"--config={bad}", f"--workdir={tmp_path}", "--config.train.warmup=5")
  assert not isinstance(e.value, flags.IllegalFlagValueError)
