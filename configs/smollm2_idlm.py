r"""I-DLM on SmolLM2-135M-Instruct: introspective strided decoding, lossless against AR.

Recipe (I-DLM): keep SmolLM2's weights frozen and its token shift (the logits at i predict
token i+1), add gated LoRA adapters that are active only on MASK tokens, and train them with
the introspective objective: every block of ``isd_stride`` tokens gets an all-MASK noisy
copy with causal attention inside it, so MASK slot k learns to draft the token k+1 places
after the last clean token. The clean tokens never see an adapter, so the verifier of ISD
decoding is SmolLM2 itself and greedy ISD prints SmolLM2's own greedy text.

Training data is self-distilled: SmolLM2's own greedy answers to 64 everyday questions
shipped with the package (none of them is a sample prompt below) and to questions about
the standard library's functions (``--mode=distill`` writes them to <workdir>/distill/),
so the drafts learn to predict exactly what the verifier will accept.

The README's main job (about 4 minutes on 2 idle CPU cores; experiments/results/idlm_main_job.md):
  python -m blockdiff_jax.main --config=configs/smollm2_idlm.py --workdir=runs/idlm \
      --mode=distill
  python -m blockdiff_jax.main --config=configs/smollm2_idlm.py --workdir=runs/idlm \
      --mode=train
  python -m blockdiff_jax.main --config=configs/smollm2_idlm.py --workdir=runs/idlm \
      --mode=sample
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
  c.diffusion.token_shift = True  # The AR head is reused: logits at i predict token i+1.
  c.diffusion.objective = "introspective"  # CE_noisy + alpha * CE_clean, causal noisy blocks.
  # Noisy block length N of training (causal inside the block, so slot k of a block is
  # trained exactly as slot k of any longer stride; decoding at N <= 4 uses only these).
  c.diffusion.isd_stride = 4
  # 32 noisy blocks per row at random answer positions; with gated LoRA the clean stream
  # then runs without gradient (the backward covers 128 noisy tokens, not 2 x 256).
  c.diffusion.isd_anchors = 32
  c.diffusion.clean_weight = 0.2  # alpha (no gradient with gated LoRA: clean = base model).
  c.diffusion.block_size = 8  # Unused by this objective; kept a divisor of seq_len.

  c.model.lora.rank = 32  # Adapter rank on every projection.
  c.model.lora.alpha = 64.0  # Adapter scale numerator (scale 2).
  c.model.lora.gated = True  # Adapters only on MASK tokens: the verifier is SmolLM2 exactly.
  c.model.lora.mask_id = 49152  # The MASK row init.pretrained appends to SmolLM2's vocab.

  c.data.corpus = "sft"  # Packed prompt/response rows (data/sft.py), loss on responses.
  # distilled = <workdir>/distill/*.jsonl written by --mode=distill (SmolLM2's own answers).
  c.data.sft_source = "distilled"
  c.data.sft_max_examples = 4000  # Pairs per split read from the source.
  c.data.sft_block_multiple = 8  # Examples start on a noisy-block boundary.
  c.data.sft_score_padding = False  # Score the answer and its EOS, not the padding after it.
  c.data.validation_fraction = 0.05  # Held-out share (by sha1 of the prompt).
  c.data.seq_len = 256  # Tokens per packed row (2 x 256 in the [noisy ; clean] layout).
  c.data.batch_size = 2  # Rows per step.

  c.train.trainable = "lora"  # Base weights frozen (no weight gradients computed).
  c.train.steps = 40  # About 100 s on 2 idle CPU cores (2.2 s/step after warm-up).
  c.train.learning_rate = 2e-3  # Peak LR of the adapters.
  c.train.warmup_steps = 4  # Linear warmup steps.
  c.train.min_lr_ratio = 0.1  # Final LR as a fraction of the peak.
  c.train.weight_decay = 0.0  # No decay on the adapters.
  c.train.log_every = 5  # Steps between metric lines.
  c.train.eval_every = 0  # No validation pass (the sample step measures what matters).
  c.train.checkpoint_every = 40  # Steps between checkpoints.

  c.distill.source = "general,docstrings"  # 64 everyday questions, then stdlib questions.
  c.distill.num_prompts = 96  # Questions answered by SmolLM2 (greedy) for training.
  c.distill.max_new_tokens = 48  # Tokens per answer at most.
  c.distill.batch_size = 32  # Rows decoded together.
  c.distill.max_len = 160  # Question + answer limit.

  # ISD decoding, checked against SmolLM2's own greedy AR answers in the same run.
  c.sample.policy = "isd"  # Introspective strided decoding.
  c.sample.isd_stride = 4  # N: 1 pending + 3 drafts + 3 MASK slots per forward.
  c.sample.compare_ar = True  # Also decode by AR: print identity, TPF and speed-up.
  return c
