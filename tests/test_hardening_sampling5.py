"""Hardening of the traces' seeds and limits, distill's resume, and the sample/compare output.

A trace with key k draws what ``generate`` draws with key k, and says so when it traces
fewer tokens than asked; ``--mode=distill`` resumes a killed run to the very file an
uninterrupted run writes, and refuses a partial file of other settings; the samples JSON
is strict JSON and never overwrites an earlier run's; ``compare_with_ar`` checks every
prompt before decoding any. References: ``generation.generate``, an uninterrupted run,
hand-derived counts.
"""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import BigramLM
from blockdiff_jax import config as config_lib
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import ar as ar_lib
from blockdiff_jax.sampling import distill
from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import sample
from blockdiff_jax.sampling import speedup
from blockdiff_jax.sampling import trace

BYTES = tokenizers.ByteTokenizer()
PROMPT = "<|bos|>abc"  # 4 tokens.


def _bigram():
  """A bigram LM over the letters a-z only, so texts decode back to their tokens."""
  table = np.full((BYTES.vocab_size,) * 2, -30.0, np.float32)
  letters = np.arange(ord("a"), ord("z") + 1)
  table[:, letters] = np.random.default_rng(0).normal(size=(BYTES.vocab_size, 26))
  return BigramLM(BYTES.mask_id), {"table": jnp.asarray(table)}


def _options(temperature):
  return layout.DecodeOptions(block_size=4, mask_id=BYTES.mask_id, eos_id=BYTES.eos_id,
                              token_shift=True, stop_at_eos=False,
                              policy=policies.Threshold(0.05),
                              sampling=policies.Sampling(temperature, 0, 1.0))


# --- Traces: the seed is the decoder's, and a cut max_new_tokens is said. ---

@pytest.mark.parametrize("decoder", ["block", "isd"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_trace_with_key_k_draws_what_generate_draws_with_key_k(decoder, temperature):
  # Before: the traces had no key; every trace drew with key 0 whatever was asked.
  fn, params = _bigram()
  opt = _options(temperature)
  got, want = [], []
  for seed in (0, 1):
    rng = jax.random.key(seed)
    if decoder == "block":
      t = trace.block_trace(fn, params, BYTES, PROMPT, opt, 28, 32, rng=rng)
    else:
      t = trace.isd_trace(fn, params, BYTES, PROMPT, opt, 3, 28, 32, rng=rng)
    (row,), _ = generation.generate(fn, params, BYTES, [PROMPT], opt, 28, 32, rng=rng,
                                    isd_stride=3 if decoder == "isd" else 0)
    got.append(t["completion"])
    want.append(row["completion"])
  assert got == want
  assert all(len(c) == 28 for c in got)
  # Sampled, the seeds draw different texts (so the key reached the draws); greedy, one.
  assert len(set(got)) == (2 if temperature else 1)
  # A raw jax.random.PRNGKey(1) is the typed key(1) (its rank read it as two row keys).
  raw = jax.random.PRNGKey(1)
  t = (trace.block_trace(fn, params, BYTES, PROMPT, opt, 28, 32, rng=raw)
       if decoder == "block" else trace.isd_trace(fn, params, BYTES, PROMPT, opt, 3, 28, 32,
                                                  rng=raw))
  assert t["completion"] == got[1]


@pytest.mark.parametrize("decoder", ["block", "isd"])
def test_trace_warns_when_it_traces_fewer_tokens_than_asked(decoder):
  # Before: 64 tokens asked with max_len=32 silently traced 28 (generate refuses it).
  fn, params = _bigram()
  opt = _options(0.0)
  run = ((lambda n: trace.block_trace(fn, params, BYTES, PROMPT, opt, n, 32))
         if decoder == "block" else
         (lambda n: trace.isd_trace(fn, params, BYTES, PROMPT, opt, 3, n, 32)))
  with pytest.raises(ValueError, match="max_new_tokens=64 it exceeds the context of 32"):
    generation.generate(fn, params, BYTES, [PROMPT], opt, 64, 32)
  with pytest.warns(UserWarning, match=r"max_new_tokens=64 with a 4-token prompt exceeds "
                    r"max_len=32 .* tracing 28 new tokens"):
    t = run(64)
  assert len(t["completion"]) == 28  # 32 - 4 letters, one byte each.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert len(run(28)["completion"]) == 28  # What fits is traced without a word.


# --- Distillation resumes, and refuses a partial file of other settings. ---

STEP = {"value": 3}


def _distill_setup(monkeypatch, tmp_path):
  fn, params = _bigram()

  def load(workdir, config=None, return_step=False, **kw):
    del workdir, kw
    out = (config, fn, BYTES, params)
    return out + (STEP["value"],) if return_step else out

  monkeypatch.setattr(inference, "load_for_inference", load)
  STEP["value"] = 3
  qfile = tmp_path / "q.txt"
  qfile.write_text("\n".join(f"question {i}?" for i in range(6)))
  c = config_lib.base_config()
  c.diffusion.token_shift = True
  c.distill.source, c.distill.num_prompts, c.distill.batch_size = str(qfile), 6, 3
  c.distill.max_new_tokens, c.distill.max_len = 8, 64
  return c  # 6 questions in batches of 2 (one row pins the shape): 3 batches.


def _counting_decoder(monkeypatch, die_at=None):
  real, calls = ar_lib.decode_ar, []

  def decode(*a, **k):
    calls.append(1)
    if len(calls) == die_at:
      raise KeyboardInterrupt("killed")
    return real(*a, **k)

  monkeypatch.setattr(ar_lib, "decode_ar", decode)
  return calls


def _killed_run(monkeypatch, c, workdir, batches_done=2):
  _counting_decoder(monkeypatch, die_at=batches_done + 1)
  with pytest.raises(KeyboardInterrupt):
    distill.run(c, workdir)


@pytest.mark.parametrize("damage", ["none", "torn_line", "half_batch"])
def test_distill_resumes_to_the_file_of_an_uninterrupted_run(monkeypatch, tmp_path, damage):
  # Before: a killed run left nothing; the rerun decoded every batch again.
  c = _distill_setup(monkeypatch, tmp_path)
  _counting_decoder(monkeypatch)
  with open(distill.run(c, str(tmp_path / "whole")), "rb") as f:
    want = f.read()
  workdir = str(tmp_path / "killed")
  _killed_run(monkeypatch, c, workdir)
  partial = os.path.join(workdir, distill.PARTIAL)
  with open(partial, encoding="utf-8") as f:
    lines = f.read().splitlines(keepends=True)
  assert len(lines) == 1 + 4  # The settings, then the 2 answers of each of 2 batches.
  if damage == "torn_line":
    lines.append(lines[-1][:10])  # A write cut mid-line.
  elif damage == "half_batch":
    lines.pop()  # The second batch half there: it is decoded again, whole.
  with open(partial, "w", encoding="utf-8") as f:
    f.writelines(lines)
  calls = _counting_decoder(monkeypatch)
  path = distill.run(c, workdir)
  assert len(calls) == (2 if damage == "half_batch" else 1)
  with open(path, "rb") as f:
    assert f.read() == want
  assert not os.path.exists(partial)
  assert len(want.splitlines()) == 6


@pytest.mark.parametrize("field,change,message", [
    ("max_new_tokens", 9, "max_new_tokens: 8 there, 9 now"),
    ("num_prompts", 5, "num_questions: 6 there, 5 now"),
    ("step", 4, "step: 3 there, 4 now"),
    ("block_size", 16, "block_size: 8 there, 16 now"),
])
def test_distill_refuses_a_partial_file_of_other_settings(monkeypatch, tmp_path, field,
                                                          change, message):
  # Before: the rerun overwrote (or would have mixed) answers of other settings.
  c = _distill_setup(monkeypatch, tmp_path)
  workdir = str(tmp_path / "run")
  _killed_run(monkeypatch, c, workdir)
  partial = os.path.join(workdir, distill.PARTIAL)
  with open(partial, "rb") as f:
    before = f.read()
  if field == "step":
    STEP["value"] = change
  elif field == "block_size":
    c.diffusion.block_size = change
  else:
    c.distill[field] = change
  calls = _counting_decoder(monkeypatch)
  with pytest.raises(ValueError, match=f"other settings .*{message}"):
    distill.run(c, workdir)
  assert not calls
  with open(partial, "rb") as f:
    assert f.read() == before  # Kept as it was, to be resumed with its own settings.


def test_distill_partial_file_without_answers_is_replaced(monkeypatch, tmp_path):
  """A run killed before its first batch left no answer: other settings may start over."""
  c = _distill_setup(monkeypatch, tmp_path)
  workdir = str(tmp_path / "run")
  _killed_run(monkeypatch, c, workdir, batches_done=0)
  c.distill.max_new_tokens = 9
  calls = _counting_decoder(monkeypatch)
  with open(distill.run(c, workdir), encoding="utf-8") as f:
    assert len(f.readlines()) == 6
  assert len(calls) == 3


# --- sample's JSON and compare_with_ar's inputs. ---

def test_samples_json_is_strict_and_same_second_runs_keep_both(monkeypatch, tmp_path):
  # Before: the AR summary's unique_experts was written as NaN (not JSON), and a second
  # run in the same second overwrote the first run's file.
  fn, params = _bigram()
  rows, summary = generation.generate(fn, params, BYTES, [PROMPT], _options(0.0), 4, 32,
                                      ar=True)
  assert np.isnan(summary["unique_experts"])
  monkeypatch.setattr(sample.time, "strftime", lambda fmt: "20260101_000000")
  first = sample._write_samples(str(tmp_path), {"summary": summary, "samples": rows})
  second = sample._write_samples(str(tmp_path), {"summary": {}, "samples": []})
  assert first != second and sorted(os.listdir(tmp_path / "samples")) == [
      "samples_20260101_000000.json", "samples_20260101_000000_1.json"]

  def strict(c):
    raise ValueError(f"not JSON: {c}")

  with open(first, encoding="utf-8") as f:
    record = json.loads(f.read(), parse_constant=strict)
  assert record["summary"]["unique_experts"] is None
  assert record["samples"][0]["tokens"] == rows[0]["tokens"]
  with open(second, encoding="utf-8") as f:
    assert json.load(f) == {"summary": {}, "samples": []}


@pytest.mark.parametrize("prompts,message", [
    (["<|bos|>a", "<|bos|>b", "<|bos|>" + "x" * 40], r"prompt 2 .*exceeds the context"),
    (["<|bos|>a", ""], r"prompt 1 .*empty"),
    (["<|bos|>a", "<|bos|>a<|mask:2|>"], r"prompt 1 .*<\|mask:N\|> spans"),
    ([], "at least one prompt"),
])
def test_compare_with_ar_checks_every_prompt_before_decoding(monkeypatch, prompts, message):
  # Before: the bad prompt was met after the others' warm runs (called "prompt 0"), and
  # no prompt at all divided by zero.
  fn, params = _bigram()
  calls = []
  monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(1))
  with pytest.raises(ValueError, match=message):
    speedup.compare_with_ar(fn, params, BYTES, prompts, _options(0.0), 4, 32,
                            speedup.Decoder("isd", 2))
  assert not calls
