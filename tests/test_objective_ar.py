"""AR SFT objective (the baseline of a diffusion adaptation) against a slow reference."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from test_objective_fastdllm import MASK, _model
from blockdiff_jax import masks
from blockdiff_jax.diffusion import autoregressive
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.model import build


def _reference(apply_fn, params, x0, loss_mask, seg):
  """One forward per scored token over its own example's tokens before it, no shift code.

  Each forward holds those tokens at the front of a row as wide as x0 (one shape, one
  compile) and reads the output of the last of them; the 0s after it are positions a
  causal forward must not see.
  """
  x0, loss_mask, seg = map(np.asarray, (x0, loss_mask, seg))
  width = x0.shape[1]
  forward = jax.jit(lambda toks, first: apply_fn(params, toks[None], masks.make_meta(
      (first + jnp.arange(width))[None], 1, masks.CLEAN))[0][0])
  total, count = 0.0, 0
  for row in range(x0.shape[0]):
    for i in range(1, x0.shape[1]):
      if loss_mask[row, i] <= 0 or seg[row, i] != seg[row, i - 1]:
        continue
      start = int(np.argmax(seg[row] == seg[row, i]))  # The example's first token.
      toks = np.zeros((width,), np.int32)
      toks[:i - start] = x0[row, start:i]
      logits = forward(jnp.asarray(toks), start)
      pred = np.array(logits[i - start - 1], np.float64)
      pred[MASK] = -np.inf
      logp = pred - pred.max() - np.log(np.sum(np.exp(pred - pred.max())))
      total += -logp[x0[row, i]]
      count += 1
  return total / count, count


@pytest.mark.parametrize("length,prompt,packed", [(12, 4, False), (16, 3, True), (16, 0, True)])
def test_loss_equals_slow_reference(length, prompt, packed):
  model, params = _model()
  apply_fn = build.make_apply(model)
  b = 2
  x0 = jax.random.randint(jax.random.key(1), (b, length), 0, MASK)
  if packed:  # Two examples per row, each with its own prompt.
    half = length // 2
    seg = np.repeat([[1] * half + [2] * (length - half)], b, axis=0)
    loss_mask = (np.arange(length) % half >= prompt)[None].repeat(b, 0)
  else:
    seg = np.ones((b, length), np.int32)
    loss_mask = (np.arange(length) >= prompt)[None].repeat(b, 0)
  batch = {"tokens": x0, "loss_mask": jnp.asarray(loss_mask, jnp.float32),
           "segment_ids": jnp.asarray(seg, jnp.int32)}
  obj = autoregressive.AutoregressiveObjective(mask_id=MASK)
  loss, metrics = autoregressive.autoregressive_loss(apply_fn, params, batch,
                                                     jax.random.key(0), obj)
  ref, count = _reference(apply_fn, params, x0, loss_mask, seg)
  np.testing.assert_allclose(float(loss), ref, rtol=2e-5)
  _, scored, _, _ = autoregressive.per_token_terms(apply_fn, params, batch, obj)
  assert int(jnp.sum(scored)) == count
  assert 0.0 <= float(metrics["token_accuracy"]) <= 1.0


def test_config_selects_the_ar_objective_and_needs_the_shift():
  c = ml_collections.ConfigDict()
  c.diffusion = diffusion_config.default_diffusion_config()
  c.data = ml_collections.ConfigDict({"seq_len": 64})
  c.diffusion.objective = "ar"
  with pytest.raises(ValueError, match="token_shift"):
    diffusion_config.validate(c)
  with pytest.raises(ValueError, match="token_shift"):
    diffusion_config.objective(c, MASK)
  c.diffusion.token_shift = True
  diffusion_config.validate(c)
  obj = diffusion_config.objective(c, MASK)
  assert isinstance(obj, autoregressive.AutoregressiveObjective)
  loss_fn, _ = diffusion_config.loss_functions(obj)
  assert loss_fn is autoregressive.autoregressive_loss


def test_trainer_runs_ar_sft_with_lora_from_a_pretrained_checkpoint(tmp_path):
  """The same trainer: a tiny Llama, plain LoRA, the AR objective; its CE falls."""
  from test_init_pretrained import _shifted_config, _tiny_folder  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import trainer  # pylint: disable=g-import-not-at-top
  c = _shifted_config(_tiny_folder(tmp_path), "ar", lora_rank=4)
  c.train.learning_rate = 3e-2
  c.train.steps = 6
  c.train.checkpoint_every = 6
  workdir = str(tmp_path / "run")
  trainer.run(c, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  ce = [r["ar_ce"] for r in rows if "ar_ce" in r]
  assert len(ce) == 6 and all(np.isfinite(ce))
  assert ce[-1] < ce[0]
