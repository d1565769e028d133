"""configs/qwen2_5_1_5b.py with a Qwen2.5 folder: the Fast-dLLM v2 recipe on the folder's
weights (a tiny random Qwen2 built here), AR-exact at the start, and it trains."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

from blockdiff_jax import config as config_lib
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.interop import causal_lm
from blockdiff_jax.train import trainer
from conftest import load_repo_module
import test_interop_pretrained as tiny


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("qwen2"))
  vocab = tiny._folder_with_unmasked_tokenizer(folder)  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
      tie_word_embeddings=True, max_position_embeddings=512))
  with torch.no_grad():  # Biases and norms away from 0 / 1, so a dropped one shows.
    for p in model.parameters():
      p.copy_(0.3 * torch.randn_like(p) + (1.0 if p.ndim == 1 else 0.0))
  model.eval().save_pretrained(folder)
  return folder, model


def _config(folder):
  return load_repo_module("configs", "qwen2_5_1_5b").get_config(folder)


def test_the_recipe_is_fast_dllm_v2s_on_the_folder(qwen_folder):
  folder, _ = qwen_folder
  c = _config(folder)
  assert c.init.pretrained == folder
  assert (c.diffusion.token_shift, c.diffusion.objective, c.diffusion.block_size) == (
      True, "fastdllm", 32)
  assert (c.sample.policy, c.sample.policy_value, c.sample.sub_block_size) == (
      "threshold", 0.9, 8)
  config_lib.validate(c)
  # Without a folder: the 1.5B architecture from random weights (plans only).
  bare = load_repo_module("configs", "qwen2_5_1_5b").get_config()
  assert bare.init.pretrained == "" and bare.model.d_model == 1536
  config_lib.validate(bare)


def test_the_start_is_the_folders_ar_model(qwen_folder, tmp_path):
  """Before any fine-tuning the adapted model is the folder's AR model (token shift)."""
  folder, hf_model = qwen_folder
  c = _config(folder)
  c.model.dtype = "float32"  # The recipe computes in bf16; parity is checked in fp32.
  config, model, _, params = inference.load_for_inference(str(tmp_path / "w"), c)
  assert (config.model.d_model, config.model.num_layers, config.model.qkv_bias) == (64, 1, True)
  rng = np.random.RandomState(0)
  vocab = hf_model.config.vocab_size
  tokens = rng.randint(0, vocab, (2, 10)).astype(np.int64)
  valid = np.ones_like(tokens, bool)
  ours = causal_lm.logits(model.cfg, params, tokens, valid)
  with torch.no_grad():
    ref = hf_model(torch.tensor(tokens)).logits.float().numpy()
  np.testing.assert_allclose(ours[..., :vocab], ref, atol=1e-4, rtol=0)


def test_two_fine_tuning_steps_run_and_checkpoint(qwen_folder, tmp_path):
  folder, _ = qwen_folder
  c = _config(folder)
  c.data.update(sft_source="synthetic", sft_max_examples=20, seq_len=64, batch_size=2)
  c.train.update(steps=2, warmup_steps=1, log_every=1, eval_every=0, checkpoint_every=2,
                 async_checkpoints=False, tensorboard=False)
  c.model.update(dtype="float32", remat=False)
  workdir = str(tmp_path / "run")
  trainer.run(c, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if '"step"' in line]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
