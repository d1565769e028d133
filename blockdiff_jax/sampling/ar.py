"""Autoregressive decoding of a block-diffusion model: one token per forward, KV cache.

How a block-diffusion model decodes AR: every new position q is its own one-token noisy
block. Block ids are metadata, not a function the model fixes, so the prompt keeps its
trained block ids (``position // block_size``, block-causal clean attention) and each
generated position q gets block id q, which is larger than every prompt block id. Then
the mask does the rest: the MASK at q (NOISY, block q) sees every clean token before it,
and the clean copy of a generated token (block q) sees the prompt and the generated
tokens up to itself -- causal attention. Each forward holds two tokens,
``[token q-1 as CLEAN ; MASK at q as NOISY]``: it commits q-1's K/V to the cache and
predicts q in the same pass, so NFE = generated tokens (the prefill forward predicts the
first one and is counted; nothing else is).

A token-shifted model (``DecodeOptions.token_shift``: a pretrained AR model, whose logits
at position i predict token i+1) decodes as any causal LM: every position is its own
block (token-causal attention, the prompt included), and each forward holds only
``[token q-1 as CLEAN]``, whose logits predict q.
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from blockdiff_jax import masks
from blockdiff_jax.sampling import jit_cache
from blockdiff_jax.sampling import keys
from blockdiff_jax.sampling import hierarchical_cache
from blockdiff_jax.sampling import kv_cache
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import logits as logits_lib

Array = Any
_NEG = -1e30

JIT_CACHE = jit_cache.JitCache(maxsize=64)


@flax.struct.dataclass
class ARState:
  """The AR loop state (per row unless noted).

  Attributes:
    tokens: [B, S] the canvas.
    prompt_len: [B] prompt tokens of each row.
    length: [B] slots < length exist.
    cache: committed K/V.
    done: [B] rows that stopped.
    nfe: [B] forwards while the row was active.
    forwards: () forwards of the batch (the prefill included).
    rng: sampling key, or [B] keys (one per row; see ``keys``).
  """

  tokens: Array
  prompt_len: Array
  length: Array
  cache: kv_cache.KVCache | hierarchical_cache.HierarchicalKVCache
  done: Array
  nfe: Array
  forwards: Array
  rng: Array

  @property
  def final(self) -> Array:
    """[B] slots < final hold final tokens (prompt and generated)."""
    return jnp.where(self.done, self.length,
                     jnp.minimum(self.prompt_len + self.nfe, self.length))


@dataclasses.dataclass(frozen=True)
class _Key:
  """Static arguments of one compiled AR decoder (``prompt_max``: the prefill width)."""

  logits_fn: Any
  options: layout.DecodeOptions
  prompt_max: int


def decode_ar(model, params, canvas: layout.Canvas, options: layout.DecodeOptions,
              rng: Array | None = None) -> dict:
  """Greedy/sampled AR continuation of a generation canvas (``layout.generation_canvas``).

  Only plain continuation is supported: each row's maskable slots must be the
  contiguous run after its prompt.

  Args:
    model: a ``Transformer`` or a logits function (``logits.LogitsFn``).
    params: its parameters.
    canvas: the input.
    options: decoding options (block size, ids, sampling, ``stop_at_eos``).
    rng: sampling key, or [B] keys (one per row: a row's draws then do not depend on
      its batch mates); typed or raw ``PRNGKey`` data (``keys.normalize``); default key 0.

  Returns:
    dict with ``tokens`` [B, S], ``nfe`` [B] (forwards while the row was active, the
    prefill included since it predicts the first token) and ``forwards``.
  """
  tokens = np.asarray(canvas.tokens)
  prompt_len = np.argmax(canvas.maskable, axis=1).astype(np.int32)
  for i in range(tokens.shape[0]):
    run = canvas.maskable[i, prompt_len[i]:canvas.length[i]]
    if not run.all() or canvas.maskable[i, canvas.length[i]:].any() or not run.size:
      raise ValueError(f"row {i}: AR decoding needs one contiguous span after the prompt")
    if options.token_shift and not prompt_len[i]:
      # The first token would be read from the logits of slot -1, i.e. of some other slot.
      raise ValueError(f"row {i}: a token-shifted model predicts token i from the output at "
                       "i-1, so the prompt cannot be empty (start it with a token such as "
                       "<|bos|>)")
  # The prefill width is bucketed: one program serves many longest-prompt lengths (the
  # slots past a row's prompt are hidden, so the width changes no output).
  key = _Key(logits_lib.as_logits_fn(model), options,
             jit_cache.bucket(int(prompt_len.max()), tokens.shape[1]))
  fn = JIT_CACHE.get(key, lambda k: jax.jit(
      lambda *a: _decode_ar(k.logits_fn, k.options, k.prompt_max, *a)))
  rng = keys.normalize(rng, tokens.shape[0])
  out = fn(params, jnp.asarray(tokens), jnp.asarray(prompt_len),
           jnp.asarray(canvas.length, jnp.int32), rng)
  out = jax.device_get(out)
  out["prefill_passes"] = 1
  out["commit_passes"] = 0
  return out


def _block_ids(pos, prompt_len, block_size, token_shift):
  if token_shift:
    return pos  # A causal LM: every token is its own block.
  return jnp.where(pos < prompt_len[:, None], pos // block_size, pos)


def _decode_ar(logits_fn, opt: layout.DecodeOptions, pmax: int, params, tokens, prompt_len,
               length, rng):
  st = init(logits_fn, opt, pmax, params, tokens, prompt_len, length, rng)
  out = jax.lax.while_loop(lambda st: jnp.any(~st.done),
                           lambda st: step(logits_fn, opt, params, st), st)
  return {"tokens": out.tokens, "nfe": out.nfe, "forwards": out.forwards}


def _meta(opt: layout.DecodeOptions, pos, prompt_len, stream, valid):
  m = masks.make_meta(pos, opt.block_size, stream, jnp.where(valid, 0, -1))
  return dataclasses.replace(m, block_ids=_block_ids(pos, prompt_len, opt.block_size,
                                                     opt.token_shift))


def _pick(opt: layout.DecodeOptions, logits, key):
  logits = logits.at[..., opt.mask_id].set(_NEG)
  return keys.per_row(lambda k, lg: opt.sampling.propose(lg, k)[0], key, logits)


def init(logits_fn, opt: layout.DecodeOptions, pmax: int, params, tokens, prompt_len,
         length, rng) -> ARState:
  """The prefill forward: caches the prompts and writes each row's first token.

  Args:
    logits_fn, params: the model (see ``logits``).
    opt: decoding options.
    pmax: static prefill width (>= every prompt length).
    tokens: [B, S] canvas; prompt_len, length: [B].
    rng: sampling key.
  """
  logits_lib.check_no_summary_tokens(logits_fn, "AR")
  b, s = tokens.shape
  bk = opt.block_size
  slot = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  ppos = slot[:, :pmax]
  pmeta = _meta(opt, ppos, prompt_len, masks.CLEAN, ppos < prompt_len[:, None])
  if opt.token_shift:
    # Prefill: the prompt; the logits of each row's last prompt token predict its first.
    # Slots past a row's prompt are hidden; id 0 keeps them finite for a model that has
    # no MASK row (mask_id = vocab_size).
    inp = jnp.where(ppos < prompt_len[:, None], tokens[:, :pmax], 0)
    logits, (k, v), _ = logits_fn(params, inp, pmeta, None, None)
    logits = jnp.take_along_axis(logits, (prompt_len - 1)[:, None, None], axis=1)
  else:
    # Prefill: the prompt (clean) and the MASK of the first new position (noisy).
    m = pmeta.concat(_meta(opt, prompt_len[:, None], prompt_len, masks.NOISY,
                           jnp.ones((b, 1), bool)))
    inp = jnp.concatenate([tokens[:, :pmax], jnp.full((b, 1), opt.mask_id, jnp.int32)], 1)
    logits, (k, v), _ = logits_fn(params, inp, m, None, (pmax, 1))
  hierarchical_cache.check_one_token_decoder(opt.kv_hierarchy, "AR")
  cache = hierarchical_cache.empty_cache(
      logits_fn.kv_spec, b, s, bk, block_ids=_block_ids(slot, prompt_len, bk, opt.token_shift),
      hierarchy=opt.kv_hierarchy)
  cache = cache.prefill(k[:, :, :pmax], v[:, :, :pmax], ppos < prompt_len[:, None])
  first = _pick(opt, logits[:, 0], keys.step_key(rng, 0, jnp.zeros((b,), jnp.int32)))
  tokens = jax.vmap(lambda row, t, q: row.at[q].set(t))(tokens, first, prompt_len)
  done = (first == opt.eos_id) if opt.stop_at_eos else jnp.zeros((b,), bool)
  done = done | (prompt_len + 1 >= length)
  return ARState(tokens=tokens, prompt_len=prompt_len, length=length, cache=cache,
                 done=done, nfe=jnp.ones((b,), jnp.int32), forwards=jnp.int32(1), rng=rng)


def step(logits_fn, opt: layout.DecodeOptions, params, st: ARState) -> ARState:
  """One forward: every running row commits its last token and writes the next one."""
  b = st.tokens.shape[0]
  # Row-wise next position: prompt_len + q, i.e. q tokens generated so far (a running
  # row's nfe; rows may have started at different forwards).
  pos = jnp.minimum(st.prompt_len + st.nfe, st.length - 1)  # Finished rows idle.
  last = jnp.take_along_axis(st.tokens, (pos - 1)[:, None], axis=1)
  m = _meta(opt, (pos - 1)[:, None], st.prompt_len, masks.CLEAN, jnp.ones((b, 1), bool))
  if opt.token_shift:  # [q-1]: its logits predict q.
    inp, head = last, (0, 1)
  else:  # [q-1 ; MASK at q]: the MASK's logits predict q.
    m = m.concat(_meta(opt, pos[:, None], st.prompt_len, masks.NOISY,
                       jnp.ones((b, 1), bool)))
    inp = jnp.concatenate([last, jnp.full((b, 1), opt.mask_id, jnp.int32)], axis=1)
    head = (1, 1)
  logits, (k, v), _ = logits_fn(params, inp, m, st.cache.attention_view(), head)
  cache = st.cache.commit(k[:, :, :1], v[:, :, :1], pos - 1, jnp.ones((b,), bool))
  tok = _pick(opt, logits[:, 0], keys.step_key(st.rng, st.forwards, st.nfe))
  active = ~st.done
  new_tokens = jax.vmap(lambda row, t, p: row.at[p].set(t))(st.tokens, tok, pos)
  ended = pos + 1 >= st.length
  if opt.stop_at_eos:
    ended = ended | (tok == opt.eos_id)
  return st.replace(tokens=jnp.where(active[:, None], new_tokens, st.tokens), cache=cache,
                    done=st.done | (active & ended), nfe=st.nfe + active.astype(jnp.int32),
                    forwards=st.forwards + 1)
