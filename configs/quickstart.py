"""The README's from-scratch quickstart: a small MoE block-diffusion model on the stdlib corpus.

Trains in under 10 minutes on a 2-core CPU and learns below the unigram entropy of the
validation bytes (about 3.6 against 4.81 bits/byte; the run prints both at every
evaluation).

Run:
  python -m blockdiff_jax.main --config=configs/quickstart.py --workdir=runs/quickstart --mode=train
  python -m blockdiff_jax.main --config=configs/quickstart.py --workdir=runs/quickstart --mode=sample
"""

from blockdiff_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.corpus = "stdlib"  # This interpreter's standard-library sources.
  c.data.max_bytes = 4_000_000  # 4 MB of code: more than the run sees, fast to load.
  c.data.seq_len = 128  # Tokens (bytes) per sequence.
  c.data.batch_size = 32  # Sequences per step.
  c.diffusion.block_size = 16  # Tokens per diffusion block.
  c.model.d_model = 128  # Residual width.
  c.model.num_layers = 4  # Transformer blocks.
  c.model.num_heads = 4  # Query heads.
  c.model.num_kv_heads = 2  # Key/value heads.
  c.model.head_dim = 32  # Per-head width.
  c.model.mlp_dim = 256  # Dense SwiGLU width (first layer).
  c.model.moe.num_experts = 4  # Experts per MoE layer.
  c.model.moe.top_k = 2  # Experts per token.
  c.model.moe.expert_dim = 256  # Hidden width of each expert.
  c.model.moe.first_dense_layers = 1  # Keep the first layer dense.
  c.train.steps = 300  # Optimizer steps.
  c.train.learning_rate = 3e-3  # Peak learning rate.
  c.train.warmup_steps = 30  # Linear warmup steps.
  c.train.log_every = 20  # Steps between metric lines.
  c.train.eval_every = 100  # Steps between validation NELBO evaluations.
  c.train.eval_batches = 4  # Validation batches per evaluation.
  c.train.checkpoint_every = 100  # Steps between checkpoints.
  c.sample.prompts = ("<|bos|>import os\nimport sys\n\n\ndef main(argv):\n    "
                      ";<|bos|>class Config:\n    def __init__(self, ")  # ';'-separated.
  c.sample.max_new_tokens = 64  # Four blocks of 16.
  c.eval.tasks = "likelihood,throughput"  # What --mode=eval runs by default here.
  c.model.moe.impl = "tiled"  # The fastest dropless dispatch on CPUs (see model/moe.py).
  return c
