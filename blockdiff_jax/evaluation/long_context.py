"""Long-context evaluation of a decoder KV cache: fidelity against the full cache, retrieval.

Two measurements, for any model and any ``hierarchical_cache.Hierarchy``:

* ``cache_fidelity``: the text's first ``prefix`` tokens are cached (full, and
  hierarchical), then the next ``query`` tokens run as one causal forward against each
  cache, teacher-forced. The KL(full || hierarchical) of the next-token
  distributions at those positions, and how often the argmax changes, say what the
  compression costs the model (the query tokens' own K/V are exact in both, as in
  decoding, where only committed context is compressed).
* ``retrieval``: passkey / key-value prompts (``data/long_context.py``) answered by greedy
  AR decoding or by the block decoder with the cache under test, scored by exact match
  of the answer.
"""

import dataclasses
import numbers
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax.data import long_context
from blockdiff_jax.sampling import ar
from blockdiff_jax.sampling import decoder as decoder_lib
from blockdiff_jax.sampling import hierarchical_cache
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import logits as logits_lib

Array = Any


def _causal_meta(start: int, n: int) -> masks.TokenMeta:
  pos = jnp.arange(start, start + n, dtype=jnp.int32)[None]
  return masks.make_meta(pos, 1, masks.CLEAN)


@dataclasses.dataclass(frozen=True)
class Fidelity:
  """Next-token fidelity of a compressed cache against the full one.

  Attributes:
    kl: mean KL(full || compressed) of the next-token distributions, in nats.
    kl_max: the largest KL over the query positions.
    top1_agreement: fraction of query positions whose argmax is unchanged.
    compressed_fraction: share of the cached positions held as rank-r factors (the
      exact sink chunks are not counted).
  """

  kl: float
  kl_max: float
  top1_agreement: float
  compressed_fraction: float


def cache_fidelity(model, params, tokens: np.ndarray, prefix: int,
                   hierarchies: Sequence[hierarchical_cache.Hierarchy]) -> list[Fidelity]:
  """KL of next-token distributions with each hierarchy's cache against the full cache.

  Args:
    model: a ``Transformer`` (or a ``logits.LogitsFn``) with causal (AR) semantics.
    params: its parameters.
    tokens: int [T] token ids; positions [0, prefix) are cached, the rest are queries.
    prefix: cached positions.
    hierarchies: caches (form "rank") to compare with the full one.

  Returns:
    One ``Fidelity`` per hierarchy.

  Raises:
    ValueError: for a summary-token model or a hierarchy of form "summary" (neither is
      read through a causal forward; measure them with ``retrieval(decoder="block")``).
  """
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 1:  # A [1, T] batch would read as one token: "prefix=.. of 1".
    raise ValueError(f"cache_fidelity needs one sequence of token ids [T], got shape "
                     f"{tokens.shape}")
  if isinstance(prefix, bool) or not isinstance(prefix, numbers.Integral):
    # 32.0 passes the range check, then fails as a slice index inside jit.
    raise ValueError(f"cache_fidelity: prefix must be an integer, got {prefix!r}")
  query = len(tokens) - prefix
  if prefix < 1 or query < 1:
    raise ValueError(f"cache_fidelity needs 0 < prefix < len(tokens), got prefix={prefix} "
                     f"of {len(tokens)}")
  fn = logits_lib.as_logits_fn(model)
  if getattr(getattr(fn, "summary", None), "num_slots", 0):
    # The causal metadata gives every token its own block, so a summary model would read
    # only its last window_blocks *tokens* through either cache (and no slots): both
    # caches agree and the KL reads 0 whatever the compression costs.
    raise ValueError("cache_fidelity runs a causal (one block per token) forward, which a "
                     "model with summary tokens (model.summary.num_slots > 0) cannot read "
                     "its context through; measure it with retrieval(decoder='block')")
  for hy in hierarchies:
    # The summary form keeps no bank: a model without summary slots (the only kind
    # measured here) reads nothing older than the ring, so the KL would price dropped
    # context while compressed_fraction (factorised positions) read 0.
    hierarchical_cache.check_one_token_decoder(hy, "cache_fidelity's causal forward")
  spec = fn.kv_spec
  ids = jnp.asarray(tokens)[None]
  prefill = jax.jit(lambda p, t: fn(p, t, _causal_meta(0, prefix), None, None)[1])
  k, v = prefill(params, ids[:, :prefix])
  valid = jnp.ones((1, prefix), bool)

  @jax.jit
  def logp(p, cache):
    logits = fn(p, ids[:, prefix:], _causal_meta(prefix, query), cache.attention_view(),
                None)[0]
    return jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)

  full = hierarchical_cache.empty_cache(spec, 1, prefix, 1).prefill(k, v, valid)
  ref = logp(params, full)
  out = []
  for hy in hierarchies:
    cache = hierarchical_cache.empty_cache(spec, 1, prefix, 1, hierarchy=hy)
    cache = jax.jit(lambda c, k, v: c.prefill(k, v, valid))(cache, k, v)
    got = logp(params, cache)
    # p log(p / q) is 0 where p = 0: a token the model rules out (-inf logit) would
    # else give exp(-inf) * (-inf - -inf) = NaN. Where only q = 0 it stays +inf.
    kl = jnp.sum(jnp.where(ref > -jnp.inf, jnp.exp(ref) * (ref - got), 0.0), axis=-1)
    agree = jnp.argmax(ref, -1) == jnp.argmax(got, -1)
    # A ring that holds the whole prefix compresses nothing: empty_cache then returns
    # the full KVCache, which has no ``compressed``.
    chunks = (int(cache.compressed[0])
              if isinstance(cache, hierarchical_cache.HierarchicalKVCache) else 0)
    factorised = (chunks - min(chunks, hy.sinks)) * hy.chunk if hy.form == "rank" else 0
    out.append(Fidelity(kl=max(float(jnp.mean(kl)), 0.0), kl_max=float(jnp.max(kl)),
                        top1_agreement=float(jnp.mean(agree)),
                        compressed_fraction=min(factorised, prefix) / prefix))
  return out


def answer_matches(completion: str, answer: str) -> bool:
  """The completion starts with the answer, then ends, or ends the answer as the prompts
  do (closing punctuation, whitespace), with no more of a key or number after it.

  ``data.long_context.exact_match``: one rule for ``retrieval`` and ``score``.
  """
  return long_context.exact_match(completion, answer)


def char_accuracy(completion: str, answer: str) -> float:
  """Fraction of the answer's characters the completion has at the same offset.

  Partial credit for a retrieval learned in part (3 of 5 digits of a pass key):
  progress that exact match shows only once whole answers come out right.

  Raises:
    ValueError: for an empty answer (it has no character to get right).
  """
  if not answer:  # Else a bare ZeroDivisionError, ending char_rate over all the rows.
    raise ValueError(f"char_accuracy: the answer is empty (completion {completion!r}); "
                     "there is no character to score")
  text = long_context.clean_completion(completion).strip(" \"'")
  return sum(a == b for a, b in zip(text, answer)) / len(answer)


DECODERS = ("ar", "block")


def accuracy(rows: Sequence[dict], **where) -> tuple[float, int]:
  """(exact-match rate, count) of the ``retrieval`` rows whose fields equal ``where``.

  NaN and 0 when no row matches, e.g. ``accuracy(rows, task="passkey", length=1024)``.
  """
  hits = [r["hit"] for r in rows if all(r[k] == v for k, v in where.items())]
  return (sum(hits) / len(hits), len(hits)) if hits else (float("nan"), 0)


def char_rate(rows: Sequence[dict], **where) -> float:
  """Mean ``char_accuracy`` of the ``retrieval`` rows whose fields equal ``where`` (NaN
  when none match), the partial-credit companion of ``accuracy``."""
  got = [char_accuracy(r["completion"], r["answer"]) for r in rows
         if all(r[k] == v for k, v in where.items())]
  return sum(got) / len(got) if got else float("nan")


def char_position_rates(rows: Sequence[dict], **where) -> list[float]:
  """Share of the matching rows with the answer's k-th character right, for each k.

  Shows which part of an answer a partial retrieval carries (the first digits of a pass
  key, or the last). Positions past a shorter answer's end are not counted; ``[]`` when
  no row matches.
  """
  hits: list[list[bool]] = []
  for r in rows:
    if not all(r[k] == v for k, v in where.items()):
      continue
    text = long_context.clean_completion(r["completion"]).strip(" \"'")
    for k, a in enumerate(r["answer"]):
      if k == len(hits):
        hits.append([])
      hits[k].append(k < len(text) and text[k] == a)
  return [sum(h) / len(h) for h in hits]


def prompt_ids(tokenizer, example: long_context.LongContextExample, wrap: bool) -> np.ndarray:
  """What the model reads: the raw prompt, or ``BOS prompt SEP`` (``wrap``, the layout
  ``data.pipeline.LongContextDataset`` trains on)."""
  if not wrap:
    return np.asarray(example.prompt_ids, np.int32)
  return np.concatenate([[tokenizer.bos_id], example.prompt_ids,
                         [tokenizer.sep_id]]).astype(np.int32)


def retrieval(model, params, tokenizer, examples: Sequence[long_context.LongContextExample],
              options: layout.DecodeOptions, max_new_tokens: int = 8,
              on_example: Callable[[int, dict], None] | None = None, decoder: str = "ar",
              wrap: bool = False, batch_size: int = 1, rng: Array | None = None) -> list[dict]:
  """Answers to long-context prompts decoded with ``options``' cache; one dict each.

  Examples of equal prompt length decode together, ``batch_size`` rows at a time (a
  batch's prompts share one length, so its cache is sized by that length alone).

  Args:
    model: a ``Transformer`` or a logits function.
    params: its parameters.
    tokenizer: the tokenizer the examples were built with.
    examples: from ``data.long_context``.
    options: decoding options (cache, policy, block size).
    max_new_tokens: answer tokens decoded at most.
    on_example: called as ``on_example(i, row)`` when example ``i`` is scored.
    decoder: "ar" (greedy one token per forward) or "block" (the block-diffusion
      decoder with ``options.policy``; summary-token models need it).
    wrap: read ``BOS prompt SEP`` instead of the raw prompt (see ``prompt_ids``).
    batch_size: rows per decode call.
    rng: sampling key (default key 0; read only when ``options`` samples). A batch
      draws with it folded with its first example's index, so batches never share noise.

  Returns:
    ``[{"task", "length", "depth", "answer", "completion", "hit", "seconds"}]`` in the
    order of ``examples``; ``seconds`` is the batch's wall time over its rows.
  """
  if decoder not in DECODERS:
    raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
  # An integer: 2.5 passes ">= 1", then fails as range()'s step naming no argument.
  if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or (
      batch_size < 1):
    raise ValueError(f"batch_size must be >= 1 (an integer), got {batch_size!r}")
  ids = [prompt_ids(tokenizer, ex, wrap) for ex in examples]
  groups: dict[int, list[int]] = {}
  for i, p in enumerate(ids):
    groups.setdefault(len(p), []).append(i)
  rows: list[dict | None] = [None] * len(examples)
  for n, members in groups.items():
    for at in range(0, len(members), batch_size):
      batch = members[at:at + batch_size]
      width = -(-(n + max_new_tokens) // options.block_size) * options.block_size
      cv = layout.generation_canvas([ids[i] for i in batch], max_new_tokens,
                                    options.block_size, tokenizer.mask_id, width)
      key = jax.random.fold_in(jax.random.key(0) if rng is None else rng, batch[0])
      t0 = time.perf_counter()
      if decoder == "ar":
        out = ar.decode_ar(model, params, cv, options, key)
      else:
        out = decoder_lib.decode(model, params, cv, options, key)
      seconds = (time.perf_counter() - t0) / len(batch)
      for r, i in enumerate(batch):
        ex = examples[i]
        gen = np.asarray(out["tokens"][r, n:cv.length[r]])
        cut = np.nonzero(gen == tokenizer.eos_id)[0]
        completion = tokenizer.decode(gen[:cut[0]] if cut.size else gen)
        rows[i] = {"task": ex.task, "length": ex.length, "depth": ex.depth,
                   "answer": ex.answer, "completion": completion,
                   "hit": answer_matches(completion, ex.answer), "seconds": seconds}
        if on_example is not None:
          on_example(i, rows[i])
  return rows
