"""Small MoE block-diffusion model on the verifiable synthetic tasks (sort, add, copy_edit).

Prompts stay clean; the answer and the EOS padding after it are noised and scored.

Run:
  python -m blockdiff_jax.main --config=configs/synthetic.py --workdir=runs/synthetic --mode=train
"""

from blockdiff_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.corpus = "synthetic"  # Prompt/answer pairs generated on the fly.
  c.data.synthetic_tasks = "sort,add,copy_edit"  # Tasks mixed uniformly.
  c.data.synthetic_digits = 12  # List length / operand digits / string length.
  c.data.seq_len = 64  # BOS prompt SEP answer EOS..., padded with EOS.
  c.data.batch_size = 64  # Sequences per step.
  c.diffusion.block_size = 16  # Tokens per diffusion block (answers span 1-3 blocks).
  c.model.d_model = 128  # Residual width.
  c.model.num_layers = 4  # Transformer blocks.
  c.model.num_heads = 4  # Query heads.
  c.model.num_kv_heads = 2  # Key/value heads.
  c.model.head_dim = 32  # Per-head width.
  c.model.mlp_dim = 256  # Dense SwiGLU width (unused when every layer is MoE).
  c.model.moe.num_experts = 4  # Experts per MoE layer.
  c.model.moe.expert_dim = 128  # Hidden width of each expert.
  c.train.steps = 3000  # Optimizer steps (about 2 minutes on an H100; long on a CPU).
  c.train.learning_rate = 2e-3  # Peak learning rate.
  c.train.warmup_steps = 100  # Linear warmup steps.
  c.train.log_every = 50  # Steps between metric lines.
  c.train.eval_every = 1000  # Steps between validation NELBO evaluations.
  c.train.checkpoint_every = 1000  # Steps between checkpoints.
  c.model.moe.impl = "tiled"  # The fastest dropless dispatch on CPUs (see model/moe.py).
  return c
