r"""A small block-diffusion model trained on passkey / key-value retrieval at 256 tokens.

The source model of the long-context experiment (experiments/long_context_retrieval.py):
it is trained short, then evaluated at up to 16x its training length, as it is, with YaRN,
and after the extension fine-tune (configs/long_context_extension.py). Rows are
``BOS prompt SEP answer EOS`` from data/long_context.py; the answer's blocks and the
prompt are masked and scored. Byte tokens, a dense model (the question here is context,
not experts).

Run (600 steps: 20 minutes alone on a 2-core CPU, where it learns the text and the answer
format but not yet the retrieval; experiments/results/long_context_retrieval_cpu.md):
  python -m blockdiff_jax.main --config=configs/long_context_retrieval.py \
      --workdir=runs/lc_full --mode=train
A model that retrieves on a CPU (pass keys: 89% exact at its length after about 2 hours
in all): 1,750 steps of the above on passkey alone (--config.data.long_context_tasks=passkey
--config.train.steps=3000, stopped there), then 800 answer-only steps from it:
  python -m blockdiff_jax.main --config=configs/long_context_retrieval.py \
      --workdir=runs/lc_answer --mode=train --config.init_from.workdir=runs/lc_full \
      --config.data.long_context_tasks=passkey --config.data.long_context_score_prompt=False \
      --config.train.steps=800 --config.train.warmup_steps=20 --config.train.learning_rate=1e-3
With ChatDLM summary tokens (2 slots per block, the last 2 blocks in full; through the
same two phases it models the text as well but does not retrieve, see the results file):
  python -m blockdiff_jax.main --config=configs/long_context_retrieval.py \
      --workdir=runs/lc_summary --mode=train --config.model.summary.num_slots=2
Passkey / KV exact match at 1x to 16x the training length (add
--config.model.summary.num_slots=2 for the summary model, and
--config.sample.kv_cache=hierarchical for the compressed cache):
  python -m blockdiff_jax.main --config=configs/long_context_retrieval.py \
      --workdir=runs/lc_full --mode=eval
Extension to 4x (1,024 tokens), YaRN then a short fine-tune:
  python -m blockdiff_jax.main --config=configs/long_context_extension.py:long_context_retrieval,4 \
      --config.init_from.workdir=runs/lc_full --workdir=runs/lc_full_x4 --mode=train
"""

from blockdiff_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.corpus = "long_context"  # Passkey / key-value prompts over stdlib docstrings.
  c.data.long_context_tasks = "passkey,kv_recall"  # Tasks, cycled by example.
  c.data.long_context_num_pairs = 2  # Key-value pairs per kv_recall prompt.
  c.data.long_context_min_length = 0  # 0 = from what the tasks need up to seq_len - 24.
  # Score the prompt too: a far denser signal than the 5-8 answer tokens per row, which
  # alone taught only the answer format in 200 steps.
  c.data.long_context_score_prompt = True
  c.data.seq_len = 256  # The training length (tokens = bytes per row).
  c.data.batch_size = 16  # Rows per step.
  c.data.sft_block_multiple = 16  # The diffusion block: the answer's blocks are scored.
  c.diffusion.block_size = 16  # Tokens per diffusion block.
  c.model.d_model = 128  # Residual width.
  c.model.num_layers = 4  # Transformer blocks.
  c.model.num_heads = 4  # Query heads.
  c.model.num_kv_heads = 2  # Key/value heads.
  c.model.head_dim = 32  # Per-head width.
  c.model.mlp_dim = 384  # Dense SwiGLU width.
  c.model.moe.num_experts = 0  # Dense.
  c.model.summary.num_slots = 0  # 2 = ChatDLM summary tokens (see the docstring).
  c.model.summary.window_blocks = 2  # Blocks before its own that a token reads in full.
  c.train.steps = 600  # Optimizer steps.
  c.train.learning_rate = 2e-3  # Peak learning rate.
  c.train.warmup_steps = 100  # Linear warmup steps.
  c.train.log_every = 50  # Steps between metric lines.
  c.train.eval_every = 200  # Steps between validation NELBO evaluations.
  c.train.eval_batches = 2  # Validation batches per evaluation.
  c.train.checkpoint_every = 100  # Steps between checkpoints.
  c.sample.max_new_tokens = 16  # One block: the answers are at most 8 tokens.
  c.eval.tasks = "likelihood,long_context"  # What --mode=eval runs by default here.
  c.eval.decoders = "topk:16"  # One token per step, most confident first.
  c.eval.long_context_num_pairs = 2  # As trained (data.long_context_num_pairs).
  c.eval.long_context_lengths = ""  # "" = 256 to 4,096: 1x to 16x the training length.
  c.sample.max_len = 16384  # Context of evaluation prompts, far past the training length.
  c.sample.policy = "topk"  # Fill the most confident MASK positions first...
  c.sample.policy_value = 16  # ...in 16 steps per block: one token per step.
  return c
