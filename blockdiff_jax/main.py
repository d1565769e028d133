r"""Command-line entry point: train, sample, evaluate, serve, plan (memory per device), distill.

  python -m blockdiff_jax.main --config=configs/quickstart.py --workdir=runs/quickstart \
      --mode=train --config.train.steps=100
"""

import os
import re
import sys
from typing import NamedTuple

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from blockdiff_jax import config as config_lib

MODES = ("train", "sample", "eval", "serve", "plan", "distill")


class Flags(NamedTuple):
  """The holders of the command's flags."""
  config: flags.FlagHolder
  workdir: flags.FlagHolder
  mode: flags.FlagHolder
  host: flags.FlagHolder
  port: flags.FlagHolder


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 sys_argv: list[str] | None = None) -> Flags:
  """Defines the command's flags on ``flag_values``.

  Args:
    flag_values: where to define them (tests pass a fresh ``flags.FlagValues()``).
    sys_argv: the command line whose ``--config.*`` overrides config_flags registers;
      None = ``sys.argv`` at parse time.
  """
  f = Flags(
      config=config_flags.DEFINE_config_file(
          "config", None, "Experiment config file.", flag_values=flag_values,
          lock_config=False, sys_argv=sys_argv),
      workdir=flags.DEFINE_string("workdir", None,
                                  "Where checkpoints, metrics and outputs go.",
                                  flag_values=flag_values),
      mode=flags.DEFINE_enum("mode", "train", list(MODES), "What to run.",
                             flag_values=flag_values),
      host=flags.DEFINE_string("host", None, "--mode=serve: interface (default "
                               "serve.host, 127.0.0.1).", flag_values=flag_values),
      port=flags.DEFINE_integer("port", None, "--mode=serve: TCP port (default "
                                "serve.port).", flag_values=flag_values))
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)
  return f


def check_flags(f: Flags, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Refuses a --workdir that is empty or a file, and flags that would be dropped silently.

  Runs nothing and writes nothing (a --workdir that does not exist yet is fine).
  """
  workdir = f.workdir.value
  # An empty --workdir (an unset $WORKDIR) joins to relative paths: training wrote its
  # lock, config.json and checkpoints/ into the current directory, then failed.
  if not workdir or not workdir.strip():
    raise app.UsageError(f"--workdir must name a directory, got {workdir!r}")
  # A file there failed as "File exists" (train) or "no checkpoint in <file>/checkpoints".
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise app.UsageError(f"--workdir={workdir} is a file, not a directory")
  # --host/--port configure the server only; elsewhere they would be dropped silently.
  stray = [f"--{name}" for name in ("host", "port") if flag_values[name].present]
  if stray and f.mode.value != "serve":
    verb = "applies" if len(stray) == 1 else "apply"
    raise app.UsageError(f"{' and '.join(stray)} {verb} to --mode=serve only, not "
                         f"--mode={f.mode.value}")


def validate_config(f: Flags, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Every section of the config (whatever the mode), then the config file's own checks.

  The modes check only what they read, some of it after writing to the workdir or
  compiling (a negative seed failed in numpy there). A recipe file's ``validate``
  (``configs/long_context_extension.py``) was skipped here before: without
  ``--config.init_from.workdir`` its fine-tune trained from random weights.
  """
  config = f.config.value
  config_lib.validate(config)
  config_lib.validate_file(config, config_flags.get_config_filename(flag_values[f.config.name]))


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """``flag_values(argv)``, with an override of a field the config lacks as a flag error.

  config_flags raises a bare KeyError or AttributeError there, which absl printed as a
  traceback ending in ``KeyError: "'mesh'"`` (``--config.mesh.fsdp=2`` on a config
  without a mesh section), naming neither the flag nor the field it lacks.
  """
  try:
    return flag_values(argv)
  except (KeyError, AttributeError) as e:
    if not _raised_by_override(e):  # A config file's own bug: its traceback.
      raise
    detail = e.args[0] if e.args else ""
    if isinstance(detail, BaseException):  # AttributeError(KeyError(message)).
      detail = detail.args[0] if detail.args else ""
    # The first name config_flags quotes ("'mesh'", "'stepz'\nDid you mean ...").
    quoted = re.search(r"'([^']+)'", str(detail))
    key = quoted.group(1) if quoted else None
    for word in argv[1:]:
      if not word.startswith("--config."):
        continue
      name = word[len("--config."):].partition("=")[0]
      parts = name.split(".")
      if key in parts:
        field = ".".join(parts[:parts.index(key) + 1])
        hint = str(detail).partition("\n")[2].strip()
        raise flags.IllegalFlagValueError(
            f"--config.{name}: the config has no field {field!r}"
            + (f" ({hint})" if hint else "")
            + ("; only configs with a mesh section (chatdlm_7b) take --config.mesh.*"
               if parts[0] == "mesh" else "")) from None
    raise


def _raised_by_override(error: BaseException) -> bool:
  """Whether ``error`` came from applying an override, not from the config file's
  ``get_config`` (a bug there must keep its own traceback)."""
  tb = error.__traceback__
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "get_config":
      return False
    tb = tb.tb_next
  return True


def _parse_flags_with_usage(argv: list[str]) -> list[str]:
  """absl's ``parse_flags_with_usage`` over ``parse_flags``: one line, exit status 1."""
  try:
    return parse_flags(argv)
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


# Defined only when run as a program: importing this module (tests) defines no global
# flags, which would clash with a script's own --config (experiments/train_throughput.py).
_FLAGS: Flags | None = None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  check_flags(_FLAGS)
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every checkpoint step at INFO; the progress lines say what matters.
    logging.set_verbosity(logging.WARNING)
  config, workdir, mode = _FLAGS.config.value, _FLAGS.workdir.value, _FLAGS.mode.value
  from blockdiff_jax.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize()  # From $JAX_COORDINATOR_ADDRESS etc.; no-op for one process.
  validate_config(_FLAGS)
  if mode == "plan":
    from blockdiff_jax.train import plan  # pylint: disable=g-import-not-at-top
    plan.run(config, workdir)
  elif mode == "train":
    from blockdiff_jax.train import trainer  # pylint: disable=g-import-not-at-top
    trainer.run(config, workdir)
  elif mode == "sample":
    from blockdiff_jax.sampling import sample  # pylint: disable=g-import-not-at-top
    sample.run(config, workdir)
  elif mode == "distill":
    from blockdiff_jax.sampling import distill  # pylint: disable=g-import-not-at-top
    distill.run(config, workdir)
  elif mode == "serve":
    from blockdiff_jax.serving import server  # pylint: disable=g-import-not-at-top
    server.run(config, workdir, host=_FLAGS.host.value, port=_FLAGS.port.value)
  else:
    from blockdiff_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.run(config, workdir)


if __name__ == "__main__":
  _FLAGS = define_flags()
  app.run(main, flags_parser=_parse_flags_with_usage)
