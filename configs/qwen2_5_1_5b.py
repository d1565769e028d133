"""Qwen2.5-1.5B architecture (= Fast-dLLM v2 1.5B) as a dense block-diffusion model.

Exact architecture of Qwen/Qwen2.5-1.5B(-Instruct): 1,543,714,304 parameters (tied head).
Block 32 / sub-block 8 follow Fast-dLLM v2. Too big for a CPU run; plan or shard it:
  python -m blockdiff_jax.main --config=configs/qwen2_5_1_5b.py --workdir=runs/q15 --mode=train
"""

from blockdiff_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  m = c.model
  m.vocab_size = 151936  # Qwen2.5 vocabulary.
  m.d_model = 1536  # hidden_size.
  m.num_layers = 28  # num_hidden_layers.
  m.num_heads = 12  # num_attention_heads.
  m.num_kv_heads = 2  # num_key_value_heads.
  m.head_dim = 128  # hidden_size / num_heads.
  m.mlp_dim = 8960  # intermediate_size.
  m.qkv_bias = True  # Qwen2 has q/k/v biases.
  m.tie_embeddings = True  # tie_word_embeddings.
  m.rope_theta = 1_000_000.0  # rope_theta.
  m.norm_eps = 1e-6  # rms_norm_eps.
  m.dtype = "bfloat16"  # bf16 compute, fp32 master weights.
  m.scan_layers = True  # One compiled layer.
  m.remat = True  # Activation memory for 4k contexts.
  m.moe.num_experts = 0  # Dense.
  c.data.tokenizer = "bpe"  # Point at Qwen's tokenizer.json with --config.data.tokenizer=PATH.
  c.data.seq_len = 2048  # Fast-dLLM v2 SFT length.
  c.data.batch_size = 64  # Global batch.
  c.diffusion.block_size = 32  # Fast-dLLM v2 block.
  c.train.learning_rate = 2e-5  # Fine-tuning LR.
  c.train.steps = 7630  # ~1B tokens (Fast-dLLM v2's budget) at 64 x 2048 tokens per step.
  return c
