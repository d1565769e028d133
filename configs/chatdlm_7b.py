"""A ChatDLM-7B-class MoE block-diffusion model (64 experts, top-2, 131,072 context).

ChatDLM's report gives the class (7B, 32-64 experts, top-2, ~512-token blocks, RoPE
extended 4,096 -> 131,072) but no layer-by-layer architecture, so the numbers here are
ours: 6,917,031,936 parameters in total, 1,065,977,856 active per token.
  python -m blockdiff_jax.main --config=configs/chatdlm_7b.py --workdir=runs/c7 --mode=plan
  python -m blockdiff_jax.main --config=configs/chatdlm_7b.py --workdir=runs/c7 --mode=train
"""

from blockdiff_jax import config as config_lib
from blockdiff_jax.model import mesh as mesh_lib


def get_config():
  c = config_lib.base_config()
  m = c.model
  m.vocab_size = 151936  # Qwen-style BPE vocabulary.
  m.d_model = 2048  # Residual width.
  m.num_layers = 24  # Transformer blocks, all MoE.
  m.num_heads = 16  # Query heads.
  m.num_kv_heads = 4  # Key/value heads.
  m.head_dim = 128  # Per-head width.
  m.mlp_dim = 5632  # Dense width (unused: every layer is MoE).
  m.tie_embeddings = False  # Separate lm_head.
  m.rope_theta = 10000.0  # Base of the 4,096-token pre-training.
  m.rope_scaling.type = "yarn"  # 4,096 -> 131,072 extension.
  m.rope_scaling.factor = 32.0  # 131,072 / 4,096.
  m.rope_scaling.original_max_position = 4096  # Pre-training context.
  m.dtype = "bfloat16"  # bf16 compute, fp32 master weights.
  m.scan_layers = True  # One compiled layer.
  m.remat = True  # Activation memory.
  m.moe.num_experts = 64  # Routed experts per layer.
  m.moe.top_k = 2  # Experts per token.
  m.moe.expert_dim = 640  # Hidden width of each expert.
  m.moe.router_mode = "block"  # dMoE coreset routing per block.
  c.data.tokenizer = "bpe"  # Point at a tokenizer.json with --config.data.tokenizer=PATH.
  c.data.seq_len = 4096  # Training context.
  c.data.batch_size = 64  # Global batch.
  c.diffusion.block_size = 512  # ChatDLM's ~512-token blocks.
  c.train.grad_accum_steps = 8  # 1 sequence per device per micro-batch on 8 GPUs.
  c.train.learning_rate = 3e-4  # Peak LR.
  c.train.steps = 100000  # Optimizer steps.
  c.mesh = mesh_lib.default_mesh_config()  # fsdp=-1: ZeRO-3 over all devices.
  c.mesh.plan_devices = 8  # --mode=plan checks one 8xH100 node.
  c.mesh.plan_memory_gib = 80.0  # H100 80GB.
  return c
