"""Qwen3-8B architecture (= I-DLM-8B) as a dense block-diffusion model.

Exact architecture of Qwen/Qwen3-8B: 8,190,735,360 parameters (untied head, QK-norm).
  python -m blockdiff_jax.main --config=configs/qwen3_8b.py --workdir=runs/q8 --mode=train
"""

from blockdiff_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  m = c.model
  m.vocab_size = 151936  # Qwen3 vocabulary.
  m.d_model = 4096  # hidden_size.
  m.num_layers = 36  # num_hidden_layers.
  m.num_heads = 32  # num_attention_heads.
  m.num_kv_heads = 8  # num_key_value_heads.
  m.head_dim = 128  # head_dim.
  m.mlp_dim = 12288  # intermediate_size.
  m.qkv_bias = False  # No q/k/v biases in Qwen3.
  m.qk_norm = True  # Per-head RMSNorm on q and k.
  m.tie_embeddings = False  # Separate lm_head.
  m.rope_theta = 1_000_000.0  # rope_theta.
  m.norm_eps = 1e-6  # rms_norm_eps.
  m.dtype = "bfloat16"  # bf16 compute, fp32 master weights.
  m.scan_layers = True  # One compiled layer.
  m.remat = True  # Activation memory.
  m.moe.num_experts = 0  # Dense.
  c.data.tokenizer = "bpe"  # Point at Qwen's tokenizer.json with --config.data.tokenizer=PATH.
  c.data.seq_len = 4096  # Context used for training.
  c.data.batch_size = 64  # Global batch.
  c.diffusion.block_size = 32  # Block size.
  c.train.learning_rate = 1e-5  # Fine-tuning LR.
  c.train.steps = 10000  # Optimizer steps.
  return c
