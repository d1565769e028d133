r"""Self-distillation data: a model's own greedy answers, the ``distill`` section, ``--mode=distill``.

A drafter (I-DLM's MASK slots, Fast-dLLM's blocks) is accepted only where it agrees with
the verifier, so the most useful fine-tuning text is the verifier's own output: this
module answers questions with the model's greedy AR decoder and writes the pairs as
``{"prompt", "response", "finished"}`` JSONL lines to ``<workdir>/distill/answers.jsonl``,
which ``data.sft_source = "distilled"`` reads back. ``finished`` is false for an answer
cut at ``distill.max_new_tokens``: the SFT pipeline then gives it no EOS (see
``data/sft.py``), so the model does not learn to stop wherever the limit fell.

  python -m blockdiff_jax.main --config=configs/smollm2_idlm.py --workdir=runs/idlm \
      --mode=distill

Questions come from ``distill.source``: ``general`` (64 everyday questions shipped in
``blockdiff_jax/data/prompts/general_questions.txt``, written for this purpose and
disjoint from every config's sample prompts), ``docstrings`` (what a public function of
the standard library does, as ``data/sft.py`` builds them), both (``general,docstrings``),
or a text file with one question per line. Prompts are
rendered exactly as the SFT pipeline renders them (the model's chat template), so the
training rows hold the very contexts the answers were generated from.

A run resumes: each batch's answers are appended to ``answers.jsonl.partial`` (its first
line records the settings: model, checkpoint step, questions, decoding), and a rerun
with the same settings decodes only the batches not yet there, in the same batches, so
the file equals an uninterrupted run's. Different settings are refused rather than mixed.
"""

import hashlib
import itertools
import json
import numbers
import os
import sys
import time
from typing import Callable, Sequence

import ml_collections
import numpy as np

from blockdiff_jax.data import sft
from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import ar as ar_lib
from blockdiff_jax.sampling import layout

ANSWERS = os.path.join("distill", "answers.jsonl")
# Not *.jsonl: the SFT pipeline reads every .jsonl file of distill/ (sft.distilled_files).
PARTIAL = ANSWERS + ".partial"
GENERAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                       "prompts", "general_questions.txt")


def default_distill_config() -> ml_collections.ConfigDict:
  """Defaults of the ``distill`` section (``--mode=distill``)."""
  d = ml_collections.ConfigDict()
  # Comma-separated: general (everyday questions shipped with the package) | docstrings
  # (questions about the standard library's functions) | text files, a question a line.
  d.source = "general"
  d.num_prompts = 192  # Questions answered (the first ones of the source, in order).
  d.max_new_tokens = 64  # Tokens per answer at most (answers cut there end without EOS).
  # Rows decoded together (greedy rows never interact); one of them pins the shape.
  d.batch_size = 16
  d.max_len = 192  # Context limit of question + answer; longer questions are skipped.
  return d


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid ``distill`` field."""
  d = config.get("distill")
  if d is None:
    return
  # batch_size >= 2: greedy_answers keeps one row for the longest question (the shape pin);
  # refused here, before the model loads, rather than after.
  for name, least in (("num_prompts", 1), ("max_new_tokens", 1), ("batch_size", 2),
                      ("max_len", 1)):
    value = d[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
      raise ValueError(f"distill.{name} must be an integer >= {least}, got {value!r}")
  for part in d.source.split(","):
    if part.strip() not in ("general", "docstrings") and not os.path.isfile(part.strip()):
      raise ValueError("distill.source entries must be 'general', 'docstrings' or text files, "
                       f"got {part.strip()!r}")


def _one_source(source: str, limit: int) -> list[str]:
  if source == "docstrings":
    # Every 5th function, so the questions spread over more modules than the first few.
    pairs = itertools.islice(sft.docstring_pairs(), 0, None, 5)
    return [prompt for prompt, _ in itertools.islice(pairs, limit)]
  path = GENERAL if source == "general" else source
  # utf-8-sig: an editor's byte-order mark must not start the first question.
  with open(path, encoding="utf-8-sig") as f:
    return [line.strip() for line in f if line.strip()][:limit]


def questions(source: str, limit: int) -> list[str]:
  """The first ``limit`` questions of the comma-separated sources, in order."""
  out = []
  for part in source.split(","):
    out += _one_source(part.strip(), limit - len(out))
    if len(out) >= limit:
      break
  return out


def _drop_split_character(tokenizer: tokenizers.Tokenizer, tokens: np.ndarray,
                          text: str) -> str:
  """``text`` (the decode of ``tokens``) without the U+FFFD of a character cut short.

  A cut inside a multi-byte character decodes to U+FFFD: one for a byte-level BPE
  (SmolLM2, Qwen) or the byte tokenizer, one per byte for SentencePiece byte fallback.
  SFT would encode that as EF BF BD and train text the model never wrote. The last
  tokens (a character has at most 4 bytes, so at most 3 are left dangling) are dropped
  for as long as what they decoded to is U+FFFD alone.
  """
  for j in range(1, min(3, len(tokens)) + 1):
    head = tokenizer.decode(tokens[:len(tokens) - j])
    if not text.startswith(head) or text[len(head):].strip("\ufffd"):
      break
    text = head
  return text


def greedy_answers(model, params, tokenizer: tokenizers.Tokenizer, prompts: Sequence[str],
                   max_new_tokens: int, max_len: int, batch_size: int,
                   token_shift: bool = True, log=sys.stdout, block_size: int = 1,
                   skip: int = 0, on_batch: Callable[[list], None] | None = None
                   ) -> list[tuple[str, str, bool]]:
  """(question, greedy answer, it ended with EOS) for every question that fits ``max_len``.

  An answer cut at ``max_new_tokens`` (no EOS) loses the U+FFFD its decode gives for a
  character the cut split (``_drop_split_character``).

  ``block_size`` is the model's diffusion block size: without ``token_shift`` the AR
  decoder gives the prompt its trained block-causal attention with it (with the shift
  every token is its own block and it is not used).

  ``skip`` (a multiple of ``batch_size - 1``, or all): the answers of that many fitting
  questions are already known; they are neither decoded nor returned, and the rest are
  decoded in the batches a whole run would use. ``on_batch`` gets each batch's answers.

  Every batch has the same shape and the same longest prompt (its last row is always
  the longest question, and short batches are padded with repeats), so the AR decoder
  compiles once. Prints progress with rate and ETA to ``log``.
  """
  if batch_size < 2:
    raise ValueError(f"distill.batch_size must be >= 2 (one row pins the shape), got "
                     f"{batch_size}")
  heads = [sft.render(tokenizer, (q, ""))[0] for q in prompts]
  keep = [i for i, h in enumerate(heads) if len(h) + max_new_tokens <= max_len]
  if not keep:
    raise ValueError(f"no question fits distill.max_len={max_len} with "
                     f"distill.max_new_tokens={max_new_tokens}")
  longest = heads[max(keep, key=lambda i: len(heads[i]))]
  options = layout.DecodeOptions(block_size=block_size, mask_id=tokenizer.mask_id,
                                 eos_id=tokenizer.eos_id, token_shift=token_shift)
  pairs, t0, done = [], time.time(), 0
  per_batch = batch_size - 1
  if not 0 <= skip <= len(keep) or (skip % per_batch and skip != len(keep)):
    raise ValueError(f"skip={skip} must be a multiple of distill.batch_size - 1 = "
                     f"{per_batch} in [0, {len(keep)}], or {len(keep)}")
  for start in range(skip, len(keep), per_batch):
    idx = keep[start:start + per_batch]
    ids = [heads[i] for i in idx] + [heads[idx[0]]] * (per_batch - len(idx)) + [longest]
    canvas = layout.generation_canvas(ids, max_new_tokens, 1, tokenizer.mask_id, max_len,
                                      width=max_len)
    out = ar_lib.decode_ar(model, params, canvas, options)
    tokens = np.asarray(out["tokens"])
    batch = []
    for row, i in enumerate(idx):
      gen = tokens[row, np.flatnonzero(canvas.maskable[row])]
      eos = np.flatnonzero(gen == tokenizer.eos_id)
      text = tokenizer.decode(gen[:eos[0] if eos.size else len(gen)])
      if not eos.size:
        text = _drop_split_character(tokenizer, gen, text)
      batch.append((prompts[i], text, bool(eos.size)))
    pairs += batch
    if on_batch is not None:
      on_batch(batch)
    done += len(idx)
    rate = done / (time.time() - t0)
    print(f"[distill {skip + done}/{len(keep)}] {rate:.2f} answers/s ETA "
          f"{(len(keep) - skip - done) / rate:.0f} s", file=log, flush=True)
  return pairs


def _line(q: str, a: str, ended: bool) -> str:
  return json.dumps({"prompt": q, "response": a, "finished": ended}) + "\n"


def _starting_weights(config: ml_collections.ConfigDict) -> str:
  """Where ``load_for_inference`` takes the weights of a workdir without a checkpoint."""
  source = config.get("init_from")
  if source is not None and source.get("workdir"):  # Wins over init.pretrained.
    return f"init_from.workdir={source.workdir!r} step {source.get('step', -1)}"
  init = config.get("init")
  return f"init.pretrained={(init.get('pretrained') or '') if init is not None else ''!r}"


def settings(config: ml_collections.ConfigDict, step, prompts: Sequence[str],
             contexts: Sequence[np.ndarray] = ()) -> dict:
  """What an answers file depends on: the model, its step, the questions, the decoding.

  ``contexts`` are the questions as rendered for the model (``sft.render``'s prompt ids):
  the tokenizer and its chat template live in the workdir, not in ``config.model``, so an
  edited template would otherwise resume a file answered from other contexts.
  ``weights`` names the starting weights when there is no checkpoint (``step`` None):
  a base and an instruct model of one architecture have the same ``config.model``.
  """
  d = config.distill
  digest = lambda x: hashlib.sha256(json.dumps(x, sort_keys=True, default=str)
                                    .encode()).hexdigest()[:16]
  return {"model": digest(config.model.to_dict()), "step": step,
          "questions": digest(list(prompts)), "num_questions": len(prompts),
          "contexts": digest([[int(t) for t in c] for c in contexts]),
          "weights": None if step is not None else _starting_weights(config),
          "max_new_tokens": d.max_new_tokens, "max_len": d.max_len,
          "batch_size": d.batch_size,
          "token_shift": bool(config.diffusion.get("token_shift", False)),
          "block_size": config.diffusion.block_size}


# Settings that older partial files lack: (the check's name, what may have changed unseen).
_NEWER_SETTINGS = {"contexts": ("prompt-context", "chat template"),
                   "weights": ("starting-weights", "starting weights")}


def read_partial(path: str, want: dict, per_batch: int, total: int) -> list[tuple]:
  """The answers of whole batches in a partial file written with settings ``want``.

  A torn last line (a run killed mid-write) and a batch cut short are dropped, so the
  resumed run decodes whole batches, as an uninterrupted run does.

  Raises:
    ValueError: the file holds answers written with other settings (naming each one
      that differs); a file without answers is not worth refusing over.
  """
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  try:
    have = json.loads(lines[0])["distill_settings"]
  except (ValueError, KeyError, TypeError):
    raise ValueError(f"{path} is not a distill partial file (no settings line); delete "
                     "it to start over") from None
  newer = [k for k in _NEWER_SETTINGS if k in want and k not in have]
  if newer and have == {k: v for k, v in want.items() if k not in newer}:
    # Written before these settings were recorded: resumable only if they did not change
    # since, which nothing recorded can tell (weights None: a checkpoint's, nothing to tell).
    for k in newer:
      if want[k] is not None:
        check, what = _NEWER_SETTINGS[k]
        print(f"warning: {path} predates the {check} check; resuming it as the other "
              f"settings match (delete it if the {what} changed)", file=sys.stderr)
    have = want
  if have != want:
    if len(lines) <= 2:  # No whole answer line: nothing would be mixed.
      return []
    diff = ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now"
                     for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
    raise ValueError(f"{path} was written with other settings ({diff}); delete it to start "
                     "over, or restore the settings to resume it")
  pairs = []
  for line in lines[1:-1]:  # The last piece follows the final newline (or is torn).
    try:
      r = json.loads(line)
      pairs.append((r["prompt"], r["response"], r["finished"]))
    except (ValueError, KeyError, TypeError):
      break
  return pairs if len(pairs) == total else pairs[:len(pairs) - len(pairs) % per_batch]


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``--mode=distill``: writes ``<workdir>/distill/answers.jsonl``; returns its path.

  Resumes from ``answers.jsonl.partial`` when an earlier run with the same settings left
  one (see the module docstring).
  """
  from blockdiff_jax.checkpoint import inference  # pylint: disable=g-import-not-at-top
  validate(config)
  d = config.distill
  # Questions first: an empty source is named before the model loads (greedy_answers
  # would blame distill.max_len for it).
  prompts = questions(d.source, d.num_prompts)
  if not prompts:
    raise ValueError(f"distill.source={d.source!r} holds no questions (blank lines are "
                     "skipped)")
  config, model, tokenizer, params, step = inference.load_for_inference(
      workdir, config, return_step=True)
  path = os.path.join(workdir, ANSWERS)
  partial = os.path.join(workdir, PARTIAL)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  heads = [sft.render(tokenizer, (q, ""))[0] for q in prompts]
  want = settings(config, step, prompts, heads)
  total = sum(len(h) + d.max_new_tokens <= d.max_len for h in heads)
  done = (read_partial(partial, want, d.batch_size - 1, total)
          if os.path.exists(partial) else [])
  with open(partial + ".tmp", "w", encoding="utf-8") as f:  # Header and whole batches only.
    f.write(json.dumps({"distill_settings": want}) + "\n")
    f.writelines(_line(*p) for p in done)
  os.replace(partial + ".tmp", partial)
  if done:
    print(f"resuming {partial}: {len(done)} of {total} answers there", flush=True)

  def append(batch):
    with open(partial, "a", encoding="utf-8") as f:
      f.write("".join(_line(*p) for p in batch))
      f.flush()
      os.fsync(f.fileno())

  t0 = time.time()
  with inference.inference_context(config):
    pairs = done + greedy_answers(model, params, tokenizer, prompts, d.max_new_tokens,
                                  d.max_len, d.batch_size,
                                  config.diffusion.get("token_shift", False),
                                  block_size=config.diffusion.block_size, skip=len(done),
                                  on_batch=append)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(_line(*p) for p in pairs)
  os.replace(tmp, path)  # A crash never leaves a half-written file behind.
  os.remove(partial)
  cut = sum(not ended for _, _, ended in pairs)
  print(f"wrote {len(pairs)} answers ({cut} cut at distill.max_new_tokens, "
        f"{len(prompts) - len(pairs)} questions too long) to {path} in "
        f"{time.time() - t0:.0f} s", flush=True)
  return path
