"""Introspective strided decoding (I-DLM): one causal forward verifies drafts and proposes more.

For a token-shifted model (the logits at position i predict token i+1) and stride N, each
forward of a row holds ``2N-1`` slots at positions ``pos, pos+1, ...``:

    [pending token | N-1 drafts (or MASK on a cold start) | N-1 MASK slots]

with plain causal attention over the row's committed cache and these slots. The logits of
slot j-1 are the verifier distribution p_j of position pos+j: they see only committed
text, the pending token and drafts 1..j-1, so they are the AR model's own distribution
whenever those drafts were accepted. Drafts are checked left to right:

* greedy: draft j is accepted while it equals argmax p_j;
* sampling: accepted with probability min(1, p_j(d)/q_j(d)), where q_j is the distribution
  the draft was drawn from; at the first rejection the emitted token is drawn from
  norm(max(0, p_j - q_j)) -- so every emitted token is distributed as AR sampling's.

After ``a`` accepted drafts the forward emits ``a + 1`` tokens: the drafts and one more
(argmax/sample of p_{a+1}; when every draft was accepted this is the bonus token p_N).
New drafts come from MASK slots: after a cold start from the draft slots (MASKs standing
for the positions after the emitted token), after a fully accepted forward from the MASK
slots (standing for the positions after the bonus). After a rejection the next forward
starts cold from the emitted token; when no running row has drafts, that forward runs
only its first N slots, since nothing reads the rest (``DecodeOptions.narrow_window``).
Only the pending token's and the accepted drafts' K/V are committed to the cache;
rejected drafts and MASK slots never enter it. Each row advances by its own count inside
one ``lax.while_loop`` (no host sync per step).

The prefill forward runs the prompt followed by N-1 MASK slots: it fills the cache,
emits the first token from the last prompt position and proposes the first drafts (a
cold start), so it is counted like any other forward (as the AR decoder counts its own).

Lossless: if the model's outputs at clean positions are those of an AR model (a plain AR
model, or one with gated LoRA active only at MASK slots), greedy ISD emits exactly the AR
model's greedy text, and sampled ISD has the AR model's output distribution.
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
class ISDState:
  """The ISD loop state (per row unless noted).

  Attributes:
    tokens: [B, W] the canvas: prompt, emitted tokens, MASK elsewhere.
    pos: [B] position of the pending token (emitted, its K/V not yet cached).
    drafts: [B, N-1] draft tokens of positions pos+1.. (meaningful when ``warm``).
    draft_probs: [B, N-1, V] the distributions the drafts were drawn from (sampling;
      [B, N-1, 1] when greedy).
    warm: [B] the drafts are real (False after a rejection: a cold start follows).
    cache: committed K/V.
    done: [B] rows that stopped.
    nfe: [B] forwards while the row was active (the prefill included).
    accepted: [B] accepted drafts written to the canvas (drafts accepted after the row's
      EOS or end are not counted).
    forwards: () forwards of the batch (the prefill included).
    narrow_forwards: () forwards after the prefill that ran N slots instead of 2N-1 (every
      running row cold).
    step: () loop iterations (folds the PRNG key).
    length: [B] slots < length exist.
    rng: sampling key, or [B] keys (one per row; see ``keys``).
  """

  tokens: Array
  pos: Array
  drafts: Array
  draft_probs: Array
  warm: Array
  cache: kv_cache.KVCache | hierarchical_cache.HierarchicalKVCache
  done: Array
  nfe: Array
  accepted: Array
  forwards: Array
  narrow_forwards: Array
  step: Array
  length: Array
  rng: Array

  @property
  def final(self) -> Array:
    """[B] slots < final hold final tokens (prompt and emitted)."""
    return jnp.where(self.done, self.length, jnp.minimum(self.pos + 1, self.length))


@dataclasses.dataclass(frozen=True)
class _Key:
  """Static arguments of one compiled ISD decoder (``prompt_max``: the prefill width)."""

  logits_fn: Any
  options: layout.DecodeOptions
  stride: int
  prompt_max: int
  width: int


def decode_isd(model, params, canvas: layout.Canvas, options: layout.DecodeOptions,
               stride: int, rng: Array | None = None) -> dict:
  """ISD continuation of a generation canvas (``layout.generation_canvas``).

  Args:
    model: a ``Transformer`` or a logits function (``logits.LogitsFn``) of a token-shifted
      model (``options.token_shift`` must be set).
    params: its parameters.
    canvas: the input; each row's maskable slots are the contiguous run after its prompt.
    options: decoding options (ids, ``sampling``: greedy, or temperature/top-k/top-p,
      ``stop_at_eos``); block size and policy are not used.
    stride: N >= 2: a forward verifies up to N-1 drafts and proposes N-1 new ones.
    rng: sampling key, or [B] keys (one per row: a row's draws then do not depend on
      its batch mates); typed or raw ``PRNGKey`` data (``keys.normalize``); default key 0.

  Returns:
    dict with ``tokens`` [B, S], ``nfe`` [B] (forwards while the row was active, the
    prefill included), ``accepted`` [B] (accepted drafts), ``forwards`` and
    ``narrow_forwards`` (forwards of N slots: no running row had drafts).
  """
  check_setup(options, stride)
  tokens = np.asarray(canvas.tokens)
  prompt_len = np.argmax(canvas.maskable, axis=1).astype(np.int32)
  for i in range(tokens.shape[0]):
    run = canvas.maskable[i, prompt_len[i]:canvas.length[i]]
    if not run.all() or canvas.maskable[i, canvas.length[i]:].any() or not run.size:
      raise ValueError(f"row {i}: ISD needs one contiguous span after the prompt")
    if not prompt_len[i]:
      # The first token would be read from the logits of slot -1, i.e. of some other slot.
      raise ValueError(f"row {i}: ISD's token-shifted model predicts token i from the output "
                       "at i-1, so the prompt cannot be empty (start it with a token such as "
                       "<|bos|>)")
  b, s = tokens.shape
  # Slack for the last forward's slots, which may run past a row's end.
  width = s + 2 * stride
  padded = np.full((b, width), options.mask_id, np.int32)
  padded[:, :s] = tokens
  # The prefill width is bucketed: one program serves many longest-prompt lengths (the
  # slots past a row's prompt are hidden, so the width changes no output).
  key = _Key(logits_lib.as_logits_fn(model), options, stride,
             jit_cache.bucket(int(prompt_len.max()), s), width)
  fn = JIT_CACHE.get(key, lambda k: jax.jit(
      lambda *a: _decode(k.logits_fn, k.options, k.stride, k.prompt_max, *a)))
  rng = keys.normalize(rng, b)
  out = jax.device_get(fn(params, jnp.asarray(padded), jnp.asarray(prompt_len),
                          jnp.asarray(canvas.length, jnp.int32), rng))
  out["tokens"] = out["tokens"][:, :s]
  out["prefill_passes"] = 1
  out["commit_passes"] = 0
  return out


def check_setup(options: layout.DecodeOptions, stride: int) -> None:
  """Raises ValueError unless ``options`` (token-shifted) and ``stride`` (>= 2) fit ISD."""
  if not options.token_shift:
    raise ValueError("ISD needs a token-shifted model (diffusion.token_shift=True): its "
                     "verifier is the logits of the previous position")
  if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 2:
    raise ValueError(f"sample.isd_stride must be an integer >= 2, got {stride!r}")


def _probs(opt: layout.DecodeOptions, logits: Array) -> Array:
  """The sampling distribution of logits (MASK excluded; filtered as ``opt.sampling``)."""
  logits = logits.at[..., opt.mask_id].set(_NEG)
  return jax.nn.softmax(opt.sampling.filter_logits(logits), axis=-1)


def _greedy(opt: layout.DecodeOptions, logits: Array) -> Array:
  """The greedy token of logits (MASK excluded), taken as AR's proposal takes it.

  The argmax of the logits, not of their softmax: softmax rounds two logits closer than
  about 3e-8 to the same probability, whose argmax is then the lower id, so greedy ISD
  would part from greedy AR.
  """
  return jnp.argmax(logits.at[..., opt.mask_id].set(_NEG), axis=-1).astype(jnp.int32)


def _draw(opt: layout.DecodeOptions, probs: Array, logits: Array, key: Array) -> Array:
  """A token drawn from ``probs`` (sampling), or the greedy token of ``logits``."""
  if opt.sampling.temperature > 0:
    return keys.per_row(lambda k, p: jax.random.categorical(
        k, jnp.log(jnp.maximum(p, 1e-38)), axis=-1).astype(jnp.int32), key, probs)
  return _greedy(opt, logits)


def _causal_meta(pos: Array, valid: Array) -> masks.TokenMeta:
  # A causal LM: every position is its own block of the clean stream.
  return masks.make_meta(pos, 1, masks.CLEAN, jnp.where(valid, 0, -1))


def _decode(logits_fn, opt: layout.DecodeOptions, n: int, pmax: int, params, tokens,
            prompt_len, length, rng):
  st = init(logits_fn, opt, n, pmax, params, tokens, prompt_len, length, rng)
  out = jax.lax.while_loop(lambda st: jnp.any(~st.done),
                           lambda st: step(logits_fn, opt, n, params, st), st)
  return {"tokens": out.tokens, "nfe": out.nfe, "accepted": out.accepted,
          "forwards": out.forwards, "narrow_forwards": out.narrow_forwards}


def init(logits_fn, opt: layout.DecodeOptions, n: int, pmax: int, params, tokens,
         prompt_len, length, rng) -> ISDState:
  """The prefill forward: caches the prompts, emits the first tokens, drafts the next.

  Args:
    logits_fn, params: the model (see ``logits``).
    opt: decoding options; n: the stride.
    pmax: static prefill width (>= every prompt length).
    tokens: [B, W] canvas (with ``2n`` slots of slack); prompt_len, length: [B].
    rng: sampling key.
  """
  logits_lib.check_no_summary_tokens(logits_fn, "ISD")
  b, w = tokens.shape
  greedy = opt.sampling.temperature == 0
  slot = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
  rows = jnp.arange(b)

  # Prefill: [prompt, N-1 MASK] at each row's own positions (a cold start).
  pw = pmax + n - 1
  ppos = slot[:, :pw]
  pvalid = ppos < (prompt_len + n - 1)[:, None]
  # Id 0 past the MASK slots keeps those (unseen) slots finite.
  inp = jnp.where(ppos < prompt_len[:, None], tokens[:, :pw], jnp.where(pvalid, opt.mask_id, 0))
  logits, (k, v), _ = logits_fn(params, inp, _causal_meta(ppos, pvalid), None, None)
  at = prompt_len[:, None] - 1 + jnp.arange(n)[None]  # Last prompt slot, then the MASKs.
  logits = jnp.take_along_axis(logits, at[:, :, None], axis=1)
  hierarchical_cache.check_one_token_decoder(opt.kv_hierarchy, "ISD")
  cache = hierarchical_cache.empty_cache(logits_fn.kv_spec, b, w, 1, block_ids=slot,
                                         hierarchy=opt.kv_hierarchy)
  cache = cache.prefill(k, v, ppos < prompt_len[:, None])
  probs = _probs(opt, logits)
  key0 = keys.step_key(rng, 0, jnp.zeros((b,), jnp.int32))
  first = _draw(opt, probs[:, 0], logits[:, 0], keys.fold(key0, 0))
  drafts = _draw(opt, probs[:, 1:], logits[:, 1:], keys.fold(key0, 1))
  tokens = tokens.at[rows, prompt_len].set(first)
  done = (first == opt.eos_id) if opt.stop_at_eos else jnp.zeros((b,), bool)
  done = done | (prompt_len + 1 >= length)
  return ISDState(
      tokens=tokens, pos=prompt_len, drafts=drafts,
      draft_probs=probs[:, 1:] if not greedy else jnp.zeros((b, n - 1, 1)),
      warm=jnp.ones((b,), bool), cache=cache, done=done, nfe=jnp.ones((b,), jnp.int32),
      accepted=jnp.zeros((b,), jnp.int32), forwards=jnp.int32(1),
      narrow_forwards=jnp.int32(0), step=jnp.int32(1),
      length=length, rng=rng)


def step(logits_fn, opt: layout.DecodeOptions, n: int, params, st: ISDState) -> ISDState:
  """One forward: every running row verifies its drafts, emits, and drafts anew."""
  b, w = st.tokens.shape
  greedy = opt.sampling.temperature == 0
  rows = jnp.arange(b)
  length = st.length
  key = keys.step_key(st.rng, st.step, st.nfe)
  active = ~st.done
  # Finished rows idle at a position that stays inside the buffer.
  pos = jnp.where(active, st.pos, jnp.minimum(st.pos, w - 2 * n))
  spos = pos[:, None] + jnp.arange(2 * n - 1, dtype=jnp.int32)[None]
  pending = st.tokens[rows, pos]
  draft_in = jnp.where(st.warm[:, None], st.drafts, opt.mask_id)
  inp = jnp.concatenate([pending[:, None], draft_in,
                         jnp.full((b, n - 1), opt.mask_id, jnp.int32)], axis=1)

  def forward(width: int):
    # Causal slots: the first ``width`` of them compute the same with or without the rest.
    logits, (k, v), _ = logits_fn(params, inp[:, :width],
                                  _causal_meta(spos[:, :width], jnp.ones((b, width), bool)),
                                  st.cache.attention_view(), None)
    logits = jnp.pad(logits, ((0, 0), (0, 2 * n - 1 - width), (0, 0)))
    return logits, k[:, :, :n], v[:, :, :n]

  # With no running row warm, nothing is verified and no MASK-slot draft is read: the
  # pending token and its N-1 MASK slots are the whole forward (N slots, as the prefill).
  if opt.narrow_window:
    narrow = ~jnp.any(st.warm & active)
    logits, k, v = jax.lax.cond(narrow, lambda: forward(n), lambda: forward(2 * n - 1))
  else:
    narrow = jnp.bool_(False)
    logits, k, v = forward(2 * n - 1)
  p = _probs(opt, logits)  # p[:, j-1] is the verifier of position pos + j.

  # Verify drafts 1..N-1 left to right.
  p_draft = jnp.take_along_axis(p[:, :n - 1], st.drafts[:, :, None], axis=-1)[..., 0]
  if greedy:
    ok = st.drafts == _greedy(opt, logits[:, :n - 1])
  else:
    q_draft = jnp.take_along_axis(st.draft_probs, st.drafts[:, :, None], axis=-1)[..., 0]
    u = keys.uniform(keys.fold(key, 0), (b, n - 1))
    ok = u * q_draft < p_draft  # u < min(1, p/q), without dividing by a tiny q.
  ok = ok & st.warm[:, None]
  a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # Accepted drafts.

  # The token after the accepted drafts: p_{a+1}, or the residual after a rejection.
  p_next = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]
  logits_next = jnp.take_along_axis(logits, a[:, None, None], axis=1)[:, 0]
  if not greedy:
    rejected = st.warm & (a < n - 1)
    q_next = jnp.take_along_axis(st.draft_probs, jnp.minimum(a, n - 2)[:, None, None],
                                 axis=1)[:, 0]
    resid = jnp.maximum(p_next - q_next, 0.0)
    resid = resid / jnp.maximum(jnp.sum(resid, -1, keepdims=True), 1e-30)
    p_next = jnp.where(rejected[:, None], resid, p_next)
  nxt = _draw(opt, p_next, logits_next, keys.fold(key, 1))

  # Emitted tokens e_0..e_a at positions pos+1..pos+a+1, cut after an EOS and at the end.
  j = jnp.arange(n, dtype=jnp.int32)[None]
  cand = jnp.concatenate([st.drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
  emitted = jnp.where(j < a[:, None], cand, nxt[:, None])
  keep = j <= a[:, None]
  if opt.stop_at_eos:
    is_eos = (emitted == opt.eos_id) & keep
    first_eos = jnp.min(jnp.where(is_eos, j, n), axis=1)
    keep = keep & (j <= first_eos[:, None])
  else:
    first_eos = jnp.full((b,), n, jnp.int32)
  epos = pos[:, None] + 1 + j
  keep = keep & (epos < length[:, None]) & active[:, None]
  tokens = st.tokens.at[rows[:, None], jnp.where(keep, epos, w)].set(emitted, mode="drop")
  count = jnp.sum(keep, axis=1)  # Tokens written this forward.

  # Commit the pending token and the accepted drafts; nothing else enters the cache.
  cslot = jnp.arange(w, dtype=jnp.int32)[None]
  exists = (cslot >= pos[:, None]) & (cslot <= (pos + a)[:, None])
  cache = st.cache.commit(k[:, :, :n], v[:, :, :n], pos, active, exists)

  # Next drafts: cold start -> the draft slots' outputs; all accepted -> the MASK slots'.
  from_mask = st.warm & (a == n - 1)
  src = jnp.where(from_mask[:, None], jnp.arange(n, 2 * n - 1)[None],
                  jnp.arange(1, n)[None])
  q_new = jnp.take_along_axis(p, src[:, :, None], axis=1)
  new_drafts = _draw(opt, q_new, jnp.take_along_axis(logits, src[:, :, None], axis=1),
                     keys.fold(key, 2))
  ended = (first_eos <= a) | (pos + 1 + a + 1 >= length)
  return st.replace(
      tokens=tokens, pos=jnp.where(active, pos + a + 1, st.pos),
      drafts=jnp.where(active[:, None], new_drafts, st.drafts),
      draft_probs=(jnp.where(active[:, None, None], q_new, st.draft_probs)
                   if not greedy else st.draft_probs),
      warm=jnp.where(active, ~st.warm | from_mask, st.warm), cache=cache,
      done=st.done | (active & ended), nfe=st.nfe + active.astype(jnp.int32),
      # Written drafts: an EOS or the row's end can cut the run inside the accepted
      # drafts, and then every written token is a draft (count - 1 would miss one).
      accepted=st.accepted + jnp.where(active, jnp.minimum(a, count), 0),
      forwards=st.forwards + 1, narrow_forwards=st.narrow_forwards + narrow.astype(jnp.int32),
      step=st.step + 1)
