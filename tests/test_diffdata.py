"""Hardening of the diffusion objectives and the data pipeline (diffdata round)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.data import pipeline
from blockdiff_jax.data import synthetic
from blockdiff_jax.data import tokenizers
from blockdiff_jax.diffusion import fastdllm


class _BosIsEos(tokenizers.ByteTokenizer):
  """A tokenizer whose bos is its eos, as SmolLM2's base model (<|endoftext|>)."""

  @property
  def bos_id(self):
    return self.eos_id


@pytest.mark.parametrize("tok", [tokenizers.ByteTokenizer(), _BosIsEos()],
                         ids=["distinct", "bos_is_eos"])
def test_packed_lm_loss_mask_gives_only_each_documents_bos(tok):
  docs = ["ab", "", "cdefg", "h", "ijklmnopq", "rs"]
  seq_len = 6
  ds = pipeline.PackedLMDataset(docs, tok, seq_len, 2, shuffle=False)
  # Reference: the stream laid out by hand, BOS positions known by construction.
  stream, bos_at = [], set()
  for d in docs:
    bos_at.add(len(stream))
    stream += [tok.bos_id, *tok.encode(d), tok.eos_id]
  for index in range(ds.num_windows // 2):
    batch = ds.get_batch(index)
    for b in range(2):
      start = (2 * index + b) * seq_len
      np.testing.assert_array_equal(batch["tokens"][b], stream[start:start + seq_len])
      want = [0.0 if start + i in bos_at else 1.0 for i in range(seq_len)]
      np.testing.assert_array_equal(batch["loss_mask"][b], want)
  # Every document's EOS is scored, so the model learns to end documents.
  eos_pos = [p - 1 for p in sorted(bos_at)[1:]] + [len(stream) - 1]
  scored = np.concatenate([ds.get_batch(i)["loss_mask"].ravel()
                           for i in range(ds.num_windows // 2)])
  assert all(scored[p] == 1.0 for p in eos_pos if p < len(scored))


def _one_hot_apply(params, tokens, meta, **kw):
  del meta, kw
  return jax.nn.one_hot(tokens, 16) * params, {}


@pytest.mark.parametrize("complementary", [True, False])
def test_fastdllm_masked_fraction_counts_only_scorable_positions(complementary):
  obj = fastdllm.FastDLLMObjective(block_size=4, mask_id=15, complementary=complementary)
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, 15, (3, 8)))
  seg = np.array([[0] * 4 + [1] * 4, [0] * 8, [0] * 3 + [1] * 5])
  loss_mask = np.ones((3, 8), np.float32)
  loss_mask[1, :2] = 0  # A prompt.
  batch = {"tokens": tokens, "loss_mask": jnp.asarray(loss_mask),
           "segment_ids": jnp.asarray(seg)}
  m = fastdllm.corrupt(jax.random.key(3), batch, obj)
  _, metrics = fastdllm.fastdllm_loss(_one_hot_apply, 1.0, batch, jax.random.key(0), obj, m)
  # By hand: a token is scorable when its loss mask is set and the token before it is
  # in its document (never position 0, never a packed document's first token).
  scorable = loss_mask > 0
  scorable[:, 0] = False
  scorable[:, 1:] &= seg[:, 1:] == seg[:, :-1]
  masked = np.asarray(m) & scorable
  n_masked = scorable.sum() if complementary else masked.sum()
  assert float(metrics["loss_tokens"]) == n_masked
  np.testing.assert_allclose(float(metrics["masked_fraction"]), n_masked / scorable.sum(),
                             rtol=1e-6)
  if complementary:  # Each scorable token masked in exactly one copy: the docstring's 1.
    assert float(metrics["masked_fraction"]) == 1.0


@pytest.mark.parametrize("task", synthetic.TASKS)
@pytest.mark.parametrize("digits", [1, 5, 11])
def test_longest_synthetic_example_bounds_every_generated_one(task, digits):
  prompt, answer = synthetic.longest_example(task, digits)
  assert synthetic.solve(task, prompt) == answer
  for split in synthetic.SPLITS:
    for i in range(300):
      p, a = synthetic.make_example(task, 0, i, split=split, digits=digits)
      assert len(p) <= len(prompt) and len(a) <= len(answer), (p, a)


def test_synthetic_dataset_too_short_seq_len_is_refused_at_construction():
  tok = tokenizers.ByteTokenizer()

  def need(j):
    _, p, a = synthetic.mixed_example(("add",), 0, j)
    return len(p) + len(a) + 3  # BOS, SEP, EOS.

  # The examples SFTDataset checks all fit, but a later one (two full 5-digit operands
  # with a carry: 25 tokens) does not: training used to stop at that batch.
  short = max(need(j) for j in range(pipeline.SFTDataset.CHECKED_EXAMPLES))
  longest = max(need(j) for j in range(200))
  assert short < longest == 25
  with pytest.raises(ValueError, match=r"seq_len=23.*data\.seq_len"):
    pipeline.SyntheticDataset(["add"], tok, short, 4, digits=5)
  ds = pipeline.SyntheticDataset(["add"], tok, longest, 4, digits=5)
  for i in range(50):  # Every row of the first 200 examples now builds.
    assert ds.get_batch(i)["tokens"].shape == (4, longest)
