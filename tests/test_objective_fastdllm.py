"""Fast-dLLM v2 objective: token shift and complementary masks against a slow reference."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.diffusion import schedules
from blockdiff_jax.model import build
from blockdiff_jax.model import transformer

MASK = 31


def _model(seed=0):
  cfg = transformer.TransformerConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4,
                                      num_kv_heads=2, head_dim=8, mlp_dim=64)
  model = transformer.Transformer(cfg)
  return model, build.init_params(model, seed)


def _reference_loss(apply_fn, params, x0, loss_mask, m, bs):
  """From the definition, one forward per scored token, no [x_t ; x_0] shift code.

  Token i of block b is predicted from the hidden state at i-1: for i inside its block,
  the noisy copy of i-1 in a forward over (clean blocks < b) + (noisy block b); for the
  first token of a block, the last clean token before it (a forward over x_0[:i]).
  Both copies (m and its complement over the response tokens) are scored once each.
  """
  x0, loss_mask, m = map(np.asarray, (x0, loss_mask, m))
  b, length = x0.shape
  apply_fn = jax.jit(apply_fn)  # One compile per forward width, not per op.
  total, count = 0.0, 0
  for row in range(b):
    maskable = (loss_mask[row] > 0) & (np.arange(length) > 0)
    prim = m[row] & maskable
    for mask in (prim, maskable & ~prim):
      xt = np.where(mask, MASK, x0[row])
      for i in np.nonzero(mask)[0]:
        blk = i // bs
        if i % bs == 0:
          toks = x0[row, :i]
          meta = masks.make_meta(np.arange(i)[None], bs, masks.CLEAN)
          logits, _ = apply_fn(params, jnp.asarray(toks[None]), meta)
          pred = np.asarray(logits[0, i - 1])
        else:
          start = blk * bs
          toks = np.concatenate([x0[row, :start], xt[start:start + bs]])
          stream = np.array([masks.CLEAN] * start + [masks.NOISY] * bs)
          meta = masks.make_meta(np.arange(start + bs)[None], bs, stream[None])
          logits, _ = apply_fn(params, jnp.asarray(toks[None]), meta)
          pred = np.asarray(logits[0, i - 1], np.float64)
        pred = np.array(pred, np.float64)
        pred[MASK] = -np.inf
        logp = pred - np.log(np.sum(np.exp(pred - pred.max()))) - pred.max()
        total += -logp[x0[row, i]]
        count += 1
  return total / count, count


@pytest.mark.parametrize("bs,length,prompt", [(4, 16, 5), (8, 16, 3)])
def test_loss_equals_slow_reference(bs, length, prompt):
  model, params = _model()
  apply_fn = build.make_apply(model)
  b = 2
  x0 = jax.random.randint(jax.random.key(1), (b, length), 0, MASK)
  loss_mask = jnp.broadcast_to(jnp.arange(length) >= prompt, (b, length)).astype(jnp.float32)
  batch = {"tokens": x0, "loss_mask": loss_mask}
  obj = fastdllm.FastDLLMObjective(block_size=bs, mask_id=MASK,
                                   noise=schedules.NoiseRange(0.3, 0.7))
  m = fastdllm.corrupt(jax.random.key(2), batch, obj)
  loss, metrics = fastdllm.fastdllm_loss(apply_fn, params, batch, jax.random.key(2), obj)
  ref, count = _reference_loss(apply_fn, params, x0, loss_mask, m, bs)
  np.testing.assert_allclose(float(loss), ref, rtol=2e-5)
  # Every response token (except position 0) is scored exactly once: count = scorable.
  assert count == b * (length - max(prompt, 1))
  np.testing.assert_allclose(float(metrics["masked_fraction"]),
                             count / float(jnp.sum(loss_mask)), rtol=1e-6)


def test_complementary_masks_cover_each_response_token_once_and_never_the_prompt():
  b, length, bs, prompt = 3, 32, 8, 7
  x0 = jax.random.randint(jax.random.key(0), (b, length), 0, MASK)
  loss_mask = jnp.broadcast_to(jnp.arange(length) >= prompt, (b, length)).astype(jnp.float32)
  batch = {"tokens": x0, "loss_mask": loss_mask}
  obj = fastdllm.FastDLLMObjective(block_size=bs, mask_id=MASK)
  seen = {}

  def apply_fn(params, tokens, meta):
    seen["tokens"] = tokens
    return jnp.zeros(tokens.shape + (32,)), {}

  _, is_masked, _, _ = fastdllm.per_token_terms(apply_fn, None, batch, jax.random.key(3), obj)
  is_masked = np.asarray(is_masked)
  assert is_masked.shape == (2 * b, length)
  np.testing.assert_array_equal(is_masked[:b] + is_masked[b:],
                                np.asarray(loss_mask, bool) & (np.arange(length) > 0))
  xt = np.asarray(seen["tokens"])[:, :length]
  np.testing.assert_array_equal(xt[:, :prompt], np.tile(np.asarray(x0)[:, :prompt], (2, 1)))
  np.testing.assert_array_equal(xt == MASK, is_masked)


def test_shift_uses_clean_stream_at_block_starts():
  bs, length = 4, 12
  logits = jnp.arange(2 * length, dtype=jnp.float32)[None, :, None]
  got = np.asarray(fastdllm.shifted_logits(logits, bs))[0, :, 0]
  want = [length + 0] + [(i - 1) if i % bs else length + i - 1 for i in range(1, length)]
  np.testing.assert_array_equal(got, want)


def test_config_selects_objective_and_validates():
  c = ml_collections.ConfigDict()
  c.diffusion = diffusion_config.default_diffusion_config()
  c.data = ml_collections.ConfigDict({"seq_len": 64})
  c.diffusion.objective = "fastdllm"
  with pytest.raises(ValueError, match="token_shift"):
    diffusion_config.validate(c)
  c.diffusion.token_shift = True
  c.diffusion.block_size = 32
  diffusion_config.validate(c)
  obj = diffusion_config.objective(c, MASK)
  assert isinstance(obj, fastdllm.FastDLLMObjective) and obj.block_size == 32
  c.diffusion.objective = "nope"
  with pytest.raises(ValueError, match="diffusion.objective"):
    diffusion_config.validate(c)


def test_trainer_runs_the_fastdllm_objective_from_a_pretrained_checkpoint(tmp_path):
  """The same trainer, checkpoints and metrics: two steps on a tiny Llama with the shift."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from test_init_pretrained import _shifted_config, _tiny_folder  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import trainer  # pylint: disable=g-import-not-at-top
  c = _shifted_config(_tiny_folder(tmp_path), "fastdllm")
  c.train.learning_rate = 1e-4
  workdir = str(tmp_path / "run")
  trainer.run(c, workdir)
  assert os.path.isdir(os.path.join(workdir, "checkpoints")) or any(
      "checkpoint" in n for n in os.listdir(workdir))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["diffusion"]["objective"] == "fastdllm"


@pytest.mark.parametrize("objective,attention,want", [
    ("fastdllm", "auto", masks.MaskSpec()),
    ("fastdllm", "bidirectional", masks.MaskSpec()),
    ("fastdllm", "causal", masks.MaskSpec(causal_noisy=True, causal_clean=True)),
    ("introspective", "auto", masks.MaskSpec(causal_noisy=True)),
    ("bd3", "causal", masks.MaskSpec(causal_noisy=True, causal_clean=True)),
])
def test_block_attention_selects_the_mask(objective, attention, want):
  from blockdiff_jax.model import config as model_config  # pylint: disable=g-import-not-at-top
  d = diffusion_config.default_diffusion_config()
  d.objective, d.block_attention = objective, attention
  assert model_config.mask_spec(d) == want


@pytest.mark.parametrize("objective,attention,message", [
    ("fastdllm", "sideways", "diffusion.block_attention must be one of"),
    ("introspective", "bidirectional", "contradicts diffusion.objective='introspective'"),
])
def test_block_attention_is_validated(objective, attention, message):
  c = ml_collections.ConfigDict()
  c.diffusion = diffusion_config.default_diffusion_config()
  c.data = ml_collections.ConfigDict({"seq_len": 64})
  c.diffusion.objective, c.diffusion.token_shift = objective, True
  c.diffusion.block_attention = attention
  with pytest.raises(ValueError, match=message):
    diffusion_config.validate(c)


def _causal_lm_logits(model, params, x0):
  """Logits of a plain causal forward (every token its own clean block)."""
  pos = jnp.broadcast_to(jnp.arange(x0.shape[1], dtype=jnp.int32), x0.shape)
  logits, _ = model.apply({"params": params}, x0, masks.make_meta(pos, 1, masks.CLEAN))
  return logits


@pytest.mark.parametrize("bs,length", [(4, 12), (8, 16)])
def test_causal_blocks_given_the_left_context_are_the_causal_lm(bs, length):
  """With block_attention=causal, token k predicted in the [x_t ; x_0] layout with every
  earlier token of its block given (the rest masked) is the causal LM's prediction from
  tokens[:k], to float precision, so a pretrained AR model starts where it was. With
  bidirectional blocks the masks after k and the clean stream's look-ahead change it."""
  cfg = transformer.TransformerConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4,
                                      num_kv_heads=2, head_dim=8, mlp_dim=64)
  x0 = jax.random.randint(jax.random.key(1), (1, length), 0, MASK)
  ks = np.arange(1, length)
  # Row r predicts token ks[r]: its block's tokens from ks[r] on are masked.
  idx = np.arange(length)
  masked = (idx[None] >= ks[:, None]) & (idx[None] // bs == ks[:, None] // bs)
  xt = jnp.where(jnp.asarray(masked), MASK, x0)
  x0s = jnp.broadcast_to(x0, xt.shape)
  gaps = {}
  for name, spec in (("causal", masks.MaskSpec(causal_noisy=True, causal_clean=True)),
                     ("bidirectional", masks.MaskSpec())):
    model = transformer.Transformer(dataclasses.replace(cfg, mask_spec=spec))
    params = build.init_params(model, 0)
    logits, _ = model.apply({"params": params}, jnp.concatenate([xt, x0s], axis=1),
                            masks.training_meta(length, bs, len(ks)))
    got = fastdllm.shifted_logits(logits, bs)[np.arange(len(ks)), ks]
    want = _causal_lm_logits(model, params, x0)[0, ks - 1]
    gaps[name] = float(jnp.max(jnp.abs(got - want)))
  assert gaps["causal"] < 1e-4, gaps
  assert gaps["bidirectional"] > 1e-2, gaps


def test_a_packed_examples_first_token_is_never_masked():
  """Its shifted prediction would come from the previous example's last output."""
  b, length, bs = 2, 32, 8
  x0 = jax.random.randint(jax.random.key(0), (b, length), 0, MASK)
  seg = np.zeros((b, length), np.int32)
  seg[:, 11:] = 1  # Example 2 starts at 11 (mid-block), its first token scorable.
  seg[1, 20:] = 2
  batch = {"tokens": x0, "loss_mask": jnp.ones((b, length)), "segment_ids": jnp.asarray(seg)}
  obj = fastdllm.FastDLLMObjective(block_size=bs, mask_id=MASK)
  apply_fn = lambda params, tokens, meta: (jnp.zeros(tokens.shape + (32,)), {})
  _, is_masked, _, _ = fastdllm.per_token_terms(apply_fn, None, batch, jax.random.key(3), obj)
  covered = np.asarray(is_masked)[:b] | np.asarray(is_masked)[b:]
  starts = np.concatenate([np.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  np.testing.assert_array_equal(covered, ~starts)  # Every other token exactly once.
