"""Hardening of generation's results, compare_with_ar's set-up check and distill's resume.

A decoder stopping at ``options.eos_id`` (a chat model's end-of-turn token) had its MASK
padding counted as generated text; options with another MASK than the tokenizer's
decoded nothing and returned the canvas; ``compare_with_ar`` refused ISD on a model
without token_shift only after the first prompt's warm AR decodes; ``--mode=distill``
resumed answers rendered with another chat template. References: hand-derived counts,
an uninterrupted run.
"""

import json
import os

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
from blockdiff_jax.sampling import speedup

BYTES = tokenizers.ByteTokenizer()
NEWLINE = ord("\n")


def _bigram(stop_after_q=None):
  """A bigram LM over a-z; ``q`` is followed by ``stop_after_q`` when given."""
  table = np.full((BYTES.vocab_size,) * 2, -30.0, np.float32)
  letters = np.arange(ord("a"), ord("z") + 1)
  table[:, letters] = 3 * np.random.default_rng(0).normal(size=(BYTES.vocab_size, 26))
  if stop_after_q is not None:
    table[ord("q"), stop_after_q] = 50.0
  return BigramLM(BYTES.mask_id), {"table": jnp.asarray(table)}


def _options(**kw):
  kw = {"block_size": 4, "mask_id": BYTES.mask_id, "eos_id": BYTES.eos_id,
        "token_shift": True, **kw}
  return layout.DecodeOptions(**kw)


@pytest.mark.parametrize("decoder", [{}, {"ar": True}, {"isd_stride": 3}])
def test_results_stop_at_the_decoders_stop_token_not_the_tokenizers_eos(decoder):
  # Before: the cut used the tokenizer's EOS, so the 9 MASK slots left after the stop
  # token counted as generated: 10 tokens (MASK ids among them), TPF 10 for one forward.
  fn, params = _bigram(stop_after_q=NEWLINE)
  rows, summary = generation.generate(fn, params, BYTES, ["<|bos|>aq"], _options(
      eos_id=NEWLINE), 10, 40, **decoder)
  # The bigram says q -> newline: the first token is the stop token, in one forward.
  assert rows[0]["tokens"] == [NEWLINE]
  assert rows[0]["generated_tokens"] == 1 and summary["generated_tokens"] == 1
  assert rows[0]["nfe"] == 1 and rows[0]["tpf"] == 1.0
  assert rows[0]["completion"] == ""


def test_a_tokenizer_eos_before_the_stop_token_is_generated_text():
  # The decoder does not stop at the tokenizer's EOS when options stop elsewhere: what
  # follows it is generated text. Before: the row was cut at that EOS, 1 token in 6 NFE.
  fn, params = _bigram(stop_after_q=BYTES.eos_id)
  opts = _options(eos_id=NEWLINE)
  rows, _ = generation.generate(fn, params, BYTES, ["<|bos|>q"], opts, 6, 40, ar=True)
  canvas = layout.generation_canvas([np.array([BYTES.bos_id, ord("q")])], 6, 4,
                                    BYTES.mask_id, 40)
  want = [int(t) for t in np.asarray(ar_lib.decode_ar(fn, params, canvas, opts)["tokens"])[0, 2:8]]
  assert want[0] == BYTES.eos_id and NEWLINE not in want  # No stop: all 6 are the answer.
  assert rows[0]["tokens"] == want
  assert rows[0]["generated_tokens"] == rows[0]["nfe"] == 6 and rows[0]["tpf"] == 1.0


@pytest.mark.parametrize("call", ["generate", "infill", "answer"])
def test_options_with_another_mask_than_the_tokenizers_are_refused(call):
  # Before: the block decoder filled no slot and returned the canvas's 6 MASK tokens as a
  # 6-token answer (TPF 2); AR and ISD decoded (so the mismatch went unseen there).
  fn, params = _bigram()
  opts = _options(mask_id=BYTES.token_id("<|fim_suffix|>"))
  with pytest.raises(ValueError, match=r"options.mask_id=262 is not the tokenizer's "
                     r"mask_id=259"):
    if call == "infill":
      generation.infill(fn, params, BYTES, ["<|bos|>a<|mask:3|>b"], opts, 40)
    else:
      getattr(generation, call)(fn, params, BYTES, ["<|bos|>ab"], opts, 6, 40)
  if call != "generate":
    return
  # The tokenizer's MASK decodes the 6 tokens AR decodes (a bigram LM: greedy rows agree).
  rows, _ = generation.generate(fn, params, BYTES, ["<|bos|>ab"], _options(), 6, 40)
  ar_rows, _ = generation.generate(fn, params, BYTES, ["<|bos|>ab"], _options(), 6, 40,
                                   ar=True)
  assert BYTES.mask_id not in rows[0]["tokens"]
  assert len(rows[0]["tokens"]) == len(ar_rows[0]["tokens"]) == 6


def test_compare_with_ar_refuses_isd_without_token_shift_before_decoding(monkeypatch):
  # Before: the first prompt's AR was decoded twice (warm-up and timed), then ISD refused.
  calls = []
  real = generation.generate
  monkeypatch.setattr(generation, "generate",
                      lambda *a, **k: calls.append(k) or real(*a, **k))
  fn, params = _bigram()
  with pytest.raises(ValueError, match="ISD needs a token-shifted model"):
    speedup.compare_with_ar(fn, params, BYTES, ["<|bos|>ab"], _options(token_shift=False),
                            4, 16, speedup.Decoder("isd", 3))
  assert not calls
  rows, summary = speedup.compare_with_ar(fn, params, BYTES, ["<|bos|>ab"], _options(), 4,
                                          16, speedup.Decoder("isd", 3))
  assert summary["identical"] and rows[0]["generated_tokens"] == 4


class _ChatBytes(tokenizers.ByteTokenizer):
  """The byte tokenizer with a chat template: "Q: " before the question."""

  def encode_chat(self, messages, add_generation_prompt=True):
    del add_generation_prompt
    text = "Q: " + messages[-1]["content"]
    return np.concatenate([[self.bos_id], self.encode(text), [self.sep_id]])


def test_distill_refuses_to_resume_answers_of_another_chat_template(monkeypatch, tmp_path):
  # Before: the settings held the raw questions only; a run resumed after the template
  # changed mixed answers to two different contexts in one file.
  fn, params = _bigram()
  tok = {"value": BYTES}

  def load(workdir, config=None, return_step=False, **kw):
    del workdir, kw
    out = (config, fn, tok["value"], params)
    return out + (3,) if return_step else out

  monkeypatch.setattr(inference, "load_for_inference", load)
  qfile = tmp_path / "q.txt"
  qfile.write_text("\n".join(f"question {i}?" for i in range(6)))
  c = config_lib.base_config()
  c.diffusion.token_shift = True
  c.distill.source, c.distill.num_prompts, c.distill.batch_size = str(qfile), 6, 3
  c.distill.max_new_tokens, c.distill.max_len = 4, 64
  real, calls, die_at = ar_lib.decode_ar, [], [2]

  def decode(*a, **k):
    calls.append(1)
    if len(calls) in die_at:
      raise KeyboardInterrupt("killed")
    return real(*a, **k)

  monkeypatch.setattr(ar_lib, "decode_ar", decode)
  workdir = str(tmp_path / "run")
  with pytest.raises(KeyboardInterrupt):
    distill.run(c, workdir)
  partial = os.path.join(workdir, distill.PARTIAL)
  with open(partial, "rb") as f:
    before = f.read()
  assert len(before.splitlines()) == 1 + 2  # Settings, then the first batch's 2 answers.
  tok["value"] = _ChatBytes()
  calls.clear()
  die_at.clear()
  with pytest.raises(ValueError, match="other settings .*contexts: "):
    distill.run(c, workdir)
  assert not calls
  with open(partial, "rb") as f:
    assert f.read() == before
  # Back to the template it was written with, it resumes: 2 more batches, 6 answers.
  tok["value"] = BYTES
  with open(distill.run(c, workdir), encoding="utf-8") as f:
    assert len(f.readlines()) == 6
  assert len(calls) == 2


@pytest.mark.parametrize("decoder", [{}, {"ar": True}, {"isd_stride": 3}])
def test_a_dense_model_reports_unknown_experts_with_every_decoder(decoder):
  # Before: the block decoder said 0.0 ("0 experts") where AR and ISD said NaN.
  fn, params = _bigram()
  _, summary = generation.generate(fn, params, BYTES, ["<|bos|>ab"], _options(), 6, 40,
                                   **decoder)
  assert np.isnan(summary["unique_experts"])


def test_a_partial_file_from_before_the_context_check_resumes_with_a_warning(tmp_path,
                                                                              capsys):
  # Review: every in-progress file written before "contexts" joined the settings was
  # refused with "restore the settings", which a user cannot do: hours of answers lost.
  path = str(tmp_path / "answers.jsonl.partial")
  answer = {"prompt": "p", "response": "r", "finished": True}
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps({"distill_settings": {"model": "m"}}) + "\n")
    f.write(json.dumps(answer) + "\n")
  assert distill.read_partial(path, {"model": "m", "contexts": "c"}, 1, 4) == [("p", "r", True)]
  assert "predates the prompt-context check" in capsys.readouterr().err
  with pytest.raises(ValueError, match="model: 'm' there, 'n' now"):
    distill.read_partial(path, {"model": "n", "contexts": "c"}, 1, 4)
