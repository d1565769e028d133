"""Tiny MoE block-diffusion model for tests and smoke runs (seconds on a CPU).

Run:
  python -m blockdiff_jax.main --config=configs/tiny.py --workdir=/tmp/tiny --mode=train
"""

from blockdiff_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.max_bytes = 200_000  # A small slice of the stdlib corpus keeps start-up fast.
  c.data.seq_len = 64  # Tokens per sequence.
  c.data.batch_size = 8  # Sequences per step.
  c.diffusion.block_size = 8  # Tokens per diffusion block.
  c.train.steps = 20  # Optimizer steps.
  c.train.log_every = 5  # Steps between metric lines.
  c.train.eval_every = 10  # Steps between validation NELBO evaluations.
  c.train.checkpoint_every = 10  # Steps between checkpoints.
  c.model.moe.impl = "tiled"  # The fastest dropless dispatch on CPUs (see model/moe.py).
  return c
