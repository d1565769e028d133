r"""Command-line entry point: train, sample, evaluate, serve, plan (memory per device), distill.

  python -m blockdiff_jax.main --config=configs/quickstart.py --workdir=runs/quickstart \
      --mode=train --config.train.steps=100
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "serve", "plan",
                                                    "distill"],
                          "What to run.")
_HOST = flags.DEFINE_string("host", None, "--mode=serve: interface (default serve.host, "
                            "127.0.0.1).")
_PORT = flags.DEFINE_integer("port", None, "--mode=serve: TCP port (default serve.port).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # --host/--port configure the server only; elsewhere they would be dropped silently.
  stray = [f"--{f}" for f in ("host", "port") if flags.FLAGS[f].present]
  if stray and _MODE.value != "serve":
    verb = "applies" if len(stray) == 1 else "apply"
    raise app.UsageError(f"{' and '.join(stray)} {verb} to --mode=serve only, not "
                         f"--mode={_MODE.value}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every checkpoint step at INFO; the progress lines say what matters.
    logging.set_verbosity(logging.WARNING)
  config, workdir = _CONFIG.value, _WORKDIR.value
  from blockdiff_jax.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize()  # From $JAX_COORDINATOR_ADDRESS etc.; no-op for one process.
  if _MODE.value == "plan":
    from blockdiff_jax.train import plan  # pylint: disable=g-import-not-at-top
    plan.run(config, workdir)
  elif _MODE.value == "train":
    from blockdiff_jax.train import trainer  # pylint: disable=g-import-not-at-top
    trainer.run(config, workdir)
  elif _MODE.value == "sample":
    from blockdiff_jax.sampling import sample  # pylint: disable=g-import-not-at-top
    sample.run(config, workdir)
  elif _MODE.value == "distill":
    from blockdiff_jax.sampling import distill  # pylint: disable=g-import-not-at-top
    distill.run(config, workdir)
  elif _MODE.value == "serve":
    from blockdiff_jax.serving import server  # pylint: disable=g-import-not-at-top
    server.run(config, workdir, host=_HOST.value, port=_PORT.value)
  else:
    from blockdiff_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.run(config, workdir)


if __name__ == "__main__":
  app.run(main)
