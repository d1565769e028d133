"""Serving fixes (reviewer12): every bit of a 64-bit request seed reaches the sampler, a
pool keeps its own compiled programs when the shared cache evicts them, and the engine's
stop-string search decodes a bounded tail per forward.

References: ``jax.random.key`` for seeds below 2**32 (unchanged keys), the pool's own
tokens at the unchanged seed, JAX's lowering events (no new program), and the stop
string found by ``str.find`` on the whole text.
"""

import jax
import numpy as np
import pytest

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import keys
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import policies
from blockdiff_jax.serving import engine as engine_lib
from blockdiff_jax.serving import pool as pool_lib
from conftest import FakeSlotPool
from conftest import JaxEventCounter
from conftest import LOWERING_EVENT


def _data(key):
  return np.asarray(jax.random.key_data(key)).tolist()


@pytest.mark.parametrize("seed", [0, 5, 2**31, 2**32 - 1])
def test_seeds_below_2_32_keep_their_key(seed):
  assert _data(keys.seed_key(seed)) == _data(jax.random.key(seed))


@pytest.mark.parametrize("a,b", [(5, 2**32 + 5), (-1, 2**32 - 1), (0, 2**32), (7, -2**63 + 7)])
def test_seeds_equal_in_their_low_bits_get_distinct_keys(a, b):
  # jax.random.key keeps the low 32 bits: these pairs drew identical samples.
  assert _data(jax.random.key(a)) == _data(jax.random.key(b))
  assert _data(keys.seed_key(a)) != _data(keys.seed_key(b))


# --- the slot pool (the tiny model) ---------------------------------------------------------

@pytest.fixture(scope="module")
def sampled_pool(tiny_decoder):
  """A 2-slot AR pool of the tiny model sampling at temperature 1, warmed up."""
  model, tok, params = tiny_decoder
  opts = layout.DecodeOptions(block_size=4, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              sampling=policies.Sampling(temperature=1.0))
  pool = pool_lib.SlotPool(model, params, pool_lib.Decoder(opts, "ar"), 2, 24, 8)
  pool.warmup()
  return pool, tok


def _generate(pool, prompt, seeds, max_tokens=12):
  slots = [pool.admit(prompt, max_tokens, s) for s in seeds]
  view = pool.advance()
  while not all(view.done[s] for s in slots):
    view = pool.advance()
  out = [view.tokens[s, len(prompt):len(prompt) + max_tokens].tolist() for s in slots]
  for s in slots:
    pool.release(s)
  return out


def test_the_pool_samples_every_seed_bit(sampled_pool):
  pool, tok = sampled_pool
  prompt = np.array([tok.bos_id, 104, 105], np.int32)
  low, high = _generate(pool, prompt, [5, 2**32 + 5])
  assert low != high  # Before: the same 12 tokens.
  assert _generate(pool, prompt, [5])[0] == low  # The seed's own draw, as before.


def test_a_pool_keeps_its_programs_when_the_shared_cache_drops_them(sampled_pool):
  pool, tok = sampled_pool
  prompt = np.array([tok.bos_id, 104], np.int32)
  _generate(pool, prompt, [1])
  pool_lib.JIT_CACHE.clear()  # As an LRU eviction by other pools' programs.
  lowered = JaxEventCounter(LOWERING_EVENT)
  lowered.active = True
  _generate(pool, prompt, [2])
  lowered.active = False
  assert lowered.count == 0 and len(pool_lib.JIT_CACHE) == 0


# --- the engine's stop search -----------------------------------------------------------------

TOK = tokenizers.ByteTokenizer()
BLOCK, MAX_LEN = 8, 512
PROMPT = np.array([TOK.bos_id, ord("a")], np.int32)


class _TextPool(FakeSlotPool):
  """Each forward makes the next ``STEP`` bytes of ``TEXT`` final in every busy row."""

  TEXT = b""
  STEP = 1

  def advance(self):
    view = pool_lib.HostView(done=np.zeros(self.slots, bool),
                             final=np.zeros(self.slots, np.int32),
                             nfe=np.zeros(self.slots, np.int32),
                             tokens=np.zeros((self.slots, self.width), np.int32))
    for slot, row in self.rows.items():
      if self.occupied[slot]:
        row[2] = min(row[2] + self.STEP, row[1])
        start, n = row[0], row[2]
        view.tokens[slot, start:start + n] = np.frombuffer(self.TEXT[:n], np.uint8)
        view.final[slot], view.nfe[slot], view.done[slot] = start + n, n, n >= row[1]
    return view


class _CountingTokenizer(tokenizers.ByteTokenizer):
  decoded: list

  def decode(self, ids):
    self.decoded.append(len(ids))
    return super().decode(ids)


@pytest.mark.parametrize("step", [1, 3, 7])
@pytest.mark.parametrize("stop,text", [
    ("STOP", "x" * 300 + "STOP" + "y" * 50),
    ("é!", "ab" * 100 + "é!" + "cd"),  # Two bytes: split over forwards at step 1.
    ("zz", "z" + "y" * 200),  # No match: the whole text is searched, a tail at a time.
], ids=["ascii", "utf8", "none"])
def test_the_stop_search_decodes_a_tail_and_finds_the_stop(monkeypatch, step, stop, text):
  raw = text.encode()
  monkeypatch.setattr(_TextPool, "TEXT", raw)
  monkeypatch.setattr(_TextPool, "STEP", step)
  monkeypatch.setattr(pool_lib, "SlotPool", _TextPool)
  tok = _CountingTokenizer()
  tok.decoded = []
  eng = engine_lib.Engine(None, None, tok, BLOCK, MAX_LEN, slots=1, max_pools=1).start()
  try:
    opts = layout.DecodeOptions(block_size=BLOCK, mask_id=TOK.mask_id, eos_id=TOK.eos_id)
    result = eng.submit(engine_lib.Request(PROMPT, len(raw), opts, stop=(stop,))).result(
        timeout=60)
  finally:
    eng.shutdown(drain=False)
  got = TOK.decode(result.token_ids)
  at = text.find(stop)
  if at < 0:
    assert result.finish_reason == "length" and got == text
  else:
    # Stopped at the first forward whose final tokens complete the stop string.
    end = len(text[:at + len(stop)].encode())
    assert result.finish_reason == "stop"
    assert len(result.token_ids) == min(-(-end // step) * step, len(raw))
    assert got.startswith(text[:at + len(stop)])
  # Each search decodes at most the new tokens and a window before them.
  assert tok.decoded and max(tok.decoded) <= 4 * len(stop) + 8 + step
