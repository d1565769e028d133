"""``--config.init.pretrained``: training, sampling and evaluation start from real weights."""

import json
import os

import jax
import numpy as np

from conftest import link_smollm2
from conftest import load_config_file
import test_interop_pretrained as tiny
from blockdiff_jax import config as config_lib
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.interop import pretrained
from blockdiff_jax.sampling import sample
from blockdiff_jax.train import trainer


def _tiny_folder(tmp_path) -> str:
  folder = str(tmp_path / "hf")
  real = tiny._folder_with_unmasked_tokenizer(folder)  # pylint: disable=protected-access
  tiny._tiny_llama(real).save_pretrained(folder)  # pylint: disable=protected-access
  return folder


def _config(folder: str):
  c = config_lib.base_config()
  c.init.pretrained = folder
  c.data.corpus = "synthetic"
  c.data.seq_len = 64
  c.data.batch_size = 2
  c.train.steps = 2
  c.train.warmup_steps = 1
  c.train.learning_rate = 1e-9  # The weights barely move: they must be the pretrained ones.
  c.train.eval_every = 0
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.async_checkpoints = False
  c.train.tensorboard = False
  return c


def _shifted_config(folder: str, objective: str, block_size: int = 16, sft: bool = True,
                    lora_rank: int = 0):
  """``_config`` for a token-shifted objective; SFT on 20 synthetic pairs; plain LoRA."""
  c = _config(folder)
  c.diffusion.token_shift = True
  c.diffusion.objective = objective
  c.diffusion.block_size = block_size
  if sft:
    c.data.corpus = "sft"
    c.data.sft_source = "synthetic"
    c.data.sft_max_examples = 20
    c.data.sft_block_multiple = block_size
  if lora_rank:
    c.model.lora.rank = lora_rank
    c.model.lora.gated = False
    c.train.trainable = "lora"
  return c


def test_training_starts_from_the_pretrained_weights(tmp_path):
  folder = _tiny_folder(tmp_path)
  workdir = str(tmp_path / "run")
  c = _config(folder)
  # The base config's architecture (4-expert MoE, d 64) is replaced by the checkpoint's.
  assert c.model.moe.num_experts and c.model.num_kv_heads == 2
  trainer.run(c, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)["model"]
  pre = pretrained.load(folder, None)
  assert saved["moe"]["num_experts"] == 0 and saved["d_model"] == 64
  assert saved["vocab_size"] == pre.model_overrides["vocab_size"]
  _, model, tok, params = inference.load_for_inference(workdir)
  assert tok.mask_id == pre.mask_id and model.cfg.vocab_size == tok.vocab_size
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                       params, pre.params))
  assert max(diffs) < 1e-5  # Random init would be O(0.1) away.


def test_resume_keeps_the_checkpoint_not_the_pretrained_weights(tmp_path):
  folder = _tiny_folder(tmp_path)
  workdir = str(tmp_path / "run")
  c = _config(folder)
  c.train.learning_rate = 1e-2
  trainer.run(c, workdir)
  _, _, _, trained = inference.load_for_inference(workdir)
  c.train.steps = 4
  c.train.checkpoint_every = 4
  c.train.learning_rate = 1e-9
  trainer.run(c, workdir)  # Resumes at step 2 from the checkpoint.
  _, _, _, resumed = inference.load_for_inference(workdir)
  pre = pretrained.load(folder, None)
  moved = lambda p: max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(a - b).max()), p, pre.params)))
  assert moved(trained) > 1e-3 and abs(moved(resumed) - moved(trained)) < 1e-4


def test_sampling_smollm2_without_a_checkpoint_is_its_own_ar_model(tmp_path, smollm2_cache):
  # The README's AR baseline: no training, the bundled model's greedy chat answer.
  c = load_config_file("smollm2")
  c.sample.prompts = c.sample.prompts.split(";")[0]  # "What is the capital of France?"
  c.sample.max_new_tokens = 8
  link_smollm2(smollm2_cache, tmp_path)
  rows = sample.run(c, str(tmp_path))
  assert "Paris" in rows[0]["completion"], rows[0]["completion"]
  assert rows[0]["tpf"] == 1.0  # One token per forward: plain AR decoding.
