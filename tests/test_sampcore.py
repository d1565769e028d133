"""Hardening of the block decoder's front end (generation, speedup): prompt lists and keys.

Each test checks the batch entry points against an independent reference: the same
prompts decoded one at a time, each with its own key, through the public decoders.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import speedup
from conftest import BigramLM

TOK = tokenizers.ByteTokenizer()
MASK, EOS, VOCAB = TOK.mask_id, TOK.eos_id, TOK.vocab_size


def _params(seed=0):
  table = np.random.default_rng(seed).normal(size=(VOCAB, VOCAB)).astype(np.float32)
  table[:, 256:] = -30.0  # Only bytes are ever likely.
  return {"table": jnp.asarray(table)}


def _options(temperature=1.0, **kw):
  return layout.DecodeOptions(block_size=4, mask_id=MASK, eos_id=EOS,
                              policy=policies.Threshold(0.5),
                              sampling=policies.Sampling(temperature=temperature), **kw)


# --- A bare string is not a list of prompts. ---

@pytest.mark.parametrize("entry", ["generate", "answer", "infill", "compare_with_ar"])
def test_a_single_string_is_refused_not_split_into_one_prompt_per_character(entry):
  """``"<|bos|>hi"`` iterated as prompts was 9 one-character prompts, decoded silently."""
  model, params = BigramLM(MASK), _params()
  text = "<|bos|>h<|mask:2|>i" if entry == "infill" else "<|bos|>hi"
  opt = _options(temperature=0.0, token_shift=entry == "compare_with_ar")
  calls = {
      "generate": lambda p: generation.generate(model, params, TOK, p, opt, 4, 32)[0],
      "answer": lambda p: generation.answer(model, params, TOK, p, opt, 4, 32)[0],
      "infill": lambda p: generation.infill(model, params, TOK, p, opt, 32),
      "compare_with_ar": lambda p: speedup.compare_with_ar(
          model, params, TOK, p, opt, 4, 32, speedup.Decoder("threshold"))[0],
  }
  name = "texts" if entry == "infill" else "prompts"
  shown = re.escape("'<|bos|>h")  # The error quotes the string it was given.
  with pytest.raises(TypeError, match=f"{name} must be a list of prompt strings.*{shown}"):
    calls[entry](text)
  rows = calls[entry]([text])  # The same prompt in a list: one row.
  assert len(rows) == 1


# --- Per-prompt keys follow their prompts in ``answer``. ---

PROMPTS = ["<|bos|>ab", "<|bos|>x<|mask:3|>yz", "<|bos|>cde", "<|bos|><|mask:2|>q"]


def _alone(model, params, opt, prompt, key):
  """One prompt decoded alone with its own key (a batch of one: its key is ``key[None]``)."""
  if "<|mask:" in prompt:
    (r,) = generation.infill(model, params, TOK, [prompt], opt, 32,
                             rng=jax.vmap(lambda k: jax.random.fold_in(k, 1))(key[None]))
    return [int(t) for t in r["tokens"]]
  (r,), _ = generation.generate(model, params, TOK, [prompt], opt, 6, 32, rng=key[None])
  return r["tokens"]


def test_answer_gives_each_prompt_its_own_key():
  """One key per prompt: a row's draws depend on its key alone, as in ``decoder.decode``.

  The continued prompts used to get all ``n`` keys for their smaller batch (a shape
  error), and the infilled ones ``fold_in`` of a key array (a JAX error).
  """
  model, params, opt = BigramLM(MASK), _params(), _options()
  keys = jax.random.split(jax.random.key(7), len(PROMPTS))
  rows, _ = generation.answer(model, params, TOK, PROMPTS, opt, 6, 32, rng=keys)
  for i, (prompt, row) in enumerate(zip(PROMPTS, rows)):
    assert "error" not in row, row
    want = _alone(model, params, opt, prompt, keys[i])
    assert row["tokens"] == want, i
    # The key matters: another prompt's key draws otherwise (so a mix-up would show).
    assert want != _alone(model, params, opt, prompt, keys[(i + 1) % len(PROMPTS)]), i


def test_answer_with_one_key_still_folds_it_for_the_infilled_prompts():
  model, params, opt = BigramLM(MASK), _params(), _options()
  key = jax.random.key(3)
  rows, _ = generation.answer(model, params, TOK, PROMPTS, opt, 6, 32, rng=key)
  cont = [p for p in PROMPTS if "<|mask:" not in p]
  fill = [p for p in PROMPTS if "<|mask:" in p]
  want_cont, _ = generation.generate(model, params, TOK, cont, opt, 6, 32, rng=key)
  want_fill = generation.infill(model, params, TOK, fill, opt, 32,
                                rng=jax.random.fold_in(key, 1))
  got_cont = [r["tokens"] for p, r in zip(PROMPTS, rows) if "<|mask:" not in p]
  got_fill = [r["tokens"] for p, r in zip(PROMPTS, rows) if "<|mask:" in p]
  assert got_cont == [r["tokens"] for r in want_cont]
  assert got_fill == [[int(t) for t in r["tokens"]] for r in want_fill]
