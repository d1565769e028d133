r"""Fast-dLLM v2 on Qwen2.5-1.5B(-Instruct): adapt the AR model into a block-diffusion model.

Fast-dLLM v2's 1.5B model is Qwen2.5-1.5B-Instruct fine-tuned with this recipe (as
configs/smollm2_fastdllm.py on the bundled SmolLM2): keep the token shift (the AR head is
reused), fine-tune every weight with the ``fastdllm`` objective (complementary masks over
response tokens, blocks of 32 in the ``[x_t ; x_0]`` layout), then decode block by block
with the sub-block cache (sub-blocks of 8, confidence threshold 0.9). Nothing is
downloaded: the argument is a Hugging Face folder you already have (config.json,
*.safetensors, tokenizer.json and its chat template):
  python -m blockdiff_jax.main \
      --config=configs/qwen2_5_1_5b.py:/path/to/Qwen2.5-1.5B-Instruct \
      --workdir=runs/q15_fastdllm --config.data.sft_source=/path/to/pairs.jsonl
  python -m blockdiff_jax.main \
      --config=configs/qwen2_5_1_5b.py:/path/to/Qwen2.5-1.5B-Instruct \
      --workdir=runs/q15_fastdllm --mode=sample
The architecture then comes from the folder (a Qwen2.5 of another size works too); its
tokenizer and chat template render the SFT pairs ({"prompt", "response"} or chat
"messages" lines; the default, the standard library's docstring pairs, is only a smoke
test). Without an argument the config is the exact Qwen2.5-1.5B architecture
(1,543,714,304 parameters, tied head) from random weights, which is what plans and
shards it (too big for a CPU run):
  python -m blockdiff_jax.main --config=configs/qwen2_5_1_5b.py --workdir=runs/q15 --mode=plan
"""

from blockdiff_jax import config as config_lib
from blockdiff_jax.interop import tokenizer as tokenizer_lib

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QUESTIONS = ("What is the capital of France?", "Write a Python function that reverses a list.")


def get_config(pretrained: str = ""):
  """The recipe; ``pretrained``: a Qwen2.5 Hugging Face folder ("" = random init)."""
  c = config_lib.base_config()
  # A Hugging Face folder: config.model and the tokenizer come from it ("" = random init).
  c.init.pretrained = pretrained
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
  m.remat = True  # Activation memory for 2k contexts.
  m.moe.num_experts = 0  # Dense (upcycle with model.moe.upcycle_from_dense).

  c.diffusion.token_shift = True  # The AR head is reused: logits at i-1 predict token i.
  c.diffusion.objective = "fastdllm"  # Complementary masks, masked CE over responses.
  c.diffusion.block_size = 32  # Fast-dLLM v2 block.
  c.diffusion.beta = 0.1  # Lowest per-block mask ratio drawn for the primary mask.
  c.diffusion.omega = 0.9  # Highest (its complement covers the rest of the block).

  # With a folder its own tokenizer is used; without one (plans), bytes (or a
  # tokenizer.json path: Qwen's own).
  c.data.tokenizer = "byte"
  c.data.corpus = "sft"  # Packed prompt/response pairs (data/sft.py).
  c.data.sft_source = "docstrings"  # Your JSONL paths for a real run (comma-separated).
  c.data.sft_block_multiple = 32  # Every example padded to a whole number of blocks.
  c.data.sft_score_padding = True  # Score the EOS padding: the model learns to stop.
  c.data.validation_fraction = 0.05  # Held-out share (by sha1 of the prompt).
  c.data.seq_len = 2048  # Fast-dLLM v2 SFT length.
  c.data.batch_size = 64  # Global batch (each row runs twice: masks m and 1 - m).

  c.train.steps = 7630  # ~1B tokens (Fast-dLLM v2's budget) at 64 x 2048 tokens per step.
  c.train.learning_rate = 2e-5  # Fine-tuning peak LR.
  c.train.warmup_steps = 100  # Linear warmup steps.
  c.train.min_lr_ratio = 0.1  # Cosine to 10% of the peak.
  c.train.weight_decay = 0.0  # No decay away from the pretrained weights.
  c.train.checkpoint_every = 500  # Steps between checkpoints.

  # Block decoding with the sub-block cache (Fast-dLLM v2 defaults).
  c.sample.policy = "threshold"  # Fill every MASK whose confidence exceeds policy_value.
  c.sample.policy_value = 0.9  # Confidence threshold.
  c.sample.sub_block_size = 8  # Sub-blocks of 8 inside blocks of 32.
  c.sample.max_new_tokens = 256  # Tokens generated per prompt at most.
  c.sample.max_len = 2048  # Context limit (prompt + answer).
  c.sample.stream = False  # Print whole answers.
  # User turns in Qwen2.5's chat template (ChatML), ';'-separated.
  c.sample.prompts = ";".join(tokenizer_lib.render_chatml(
      [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
                              for q in QUESTIONS)
  return c
