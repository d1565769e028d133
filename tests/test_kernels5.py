"""Arguments of the Pallas ops that failed obscurely or were silently misread.

Each case is checked against the op's plain reference, or must be refused with a
ValueError naming the argument (where a TypeError or a tracer error named nothing).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import INTERPRET
from pallas_kernels import block_attention as ba
from pallas_kernels import decode_attention as da
from pallas_kernels import gmm as gmm_lib

pytestmark = pytest.mark.usefixtures("full_precision_matmuls")

SMALL_DECODE = da.DecodeBlockSizes(block_m=16, block_k=16, num_splits=2)


def _decode_inputs():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 3, 4, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 40, 2, 16)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 40, 2, 16)), jnp.float32)
  q_pos = jnp.array([[9, 10, 11], [20, 21, 22]], jnp.int32)
  kv_pos = jnp.where(jnp.arange(40) % 7 == 3, -1, jnp.arange(40))
  kv_pos = jnp.broadcast_to(kv_pos, (2, 40)).astype(jnp.int32)
  return q, k, v, q_pos, kv_pos


def test_decode_attention_takes_a_concrete_jax_block_size():
  """A jax scalar block size (e.g. read from a config pytree) failed inside the
  kernel trace with a TracerBoolConversionError; its value is concrete, so it is
  used like the Python int."""
  q, k, v, q_pos, kv_pos = _decode_inputs()
  want = da.reference_attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos,
                                block_size=4)
  for block_size in (jnp.array(4), jnp.int32(4), 4.0):
    got = da.decode_attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos,
                              block_size=block_size, block_sizes=SMALL_DECODE,
                              interpret=INTERPRET)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)


def test_decode_attention_refuses_traced_or_fractional_block_size_by_name():
  """A traced block size raised a TracerBoolConversionError from ``block_size < 1``;
  a fractional one (from ``/``) cut the positions into blocks of 2 and 3."""
  q, k, v, q_pos, kv_pos = _decode_inputs()
  run = lambda bsz: da.decode_attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos,
                                        block_size=bsz, interpret=INTERPRET)
  with pytest.raises(ValueError, match="block_size must be a static integer.*traced"):
    jax.jit(run)(4)
  for bad in (2.5, None, "4", jnp.array([4])):
    with pytest.raises(ValueError, match="decode_attention: block_size must be an integer"):
      run(bad)
  with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
    run(0)


def test_split_plan_of_an_empty_cache_has_no_split():
  """``split_plan`` divided by zero for a cache of 0 slots (or 0 kv heads), which
  ``decode_attention`` itself accepts (its queries output zeros)."""
  layout = da.split_plan((2, 4, 8, 16), (2, 0, 2, 16))
  assert layout.num_splits == 0 and layout.padded_length == 0
  assert da.split_plan((2, 4, 8, 16), (2, 64, 0, 16)).padded_length >= 64
  q, k, v, _, _ = _decode_inputs()
  out = da.decode_attention(q, k[:, :0], v[:, :0], interpret=INTERPRET)
  np.testing.assert_array_equal(out, da.reference_attention(q, k[:, :0], v[:, :0]))


@pytest.mark.parametrize("cls,field", [(ba.AttentionBlockSizes, "block_q"),
                                       (ba.AttentionBlockSizes, "block_k_bwd"),
                                       (da.DecodeBlockSizes, "block_k"),
                                       (gmm_lib.GmmBlockSizes, "block_n")])
@pytest.mark.parametrize("value", [64.0, None, "64"])
def test_block_sizes_refuse_non_integer_tiles_by_name(cls, field, value):
  """A float or None tile raised ``TypeError: unsupported operand type(s) for &``."""
  with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be a power of two "
                                       rf">= 16, got {value}"):
    cls(**{field: value})
  assert getattr(cls(**{field: np.int64(32)}), field) == 32  # numpy ints are fine


def test_decode_block_sizes_refuse_a_float_split_count():
  """``num_splits=2.0`` made the chunk a float: ``pad_width must be of integral type``."""
  with pytest.raises(ValueError, match=r"num_splits must be an integer >= 1, got 2\.0"):
    da.DecodeBlockSizes(num_splits=2.0)
  q, k, v, _, _ = _decode_inputs()
  got = da.decode_attention(q, k, v, block_sizes=da.DecodeBlockSizes(
      block_m=16, block_k=16, num_splits=np.int64(2)), interpret=INTERPRET)
  np.testing.assert_allclose(got, da.reference_attention(q, k, v), atol=2e-6, rtol=2e-6)


def test_decode_reference_refuses_kv_positions_without_q_positions():
  """The reference replaced lone kv_positions by zeros: its empty slots (negative
  positions) became visible, where the op refuses the call."""
  q, k, v, _, kv_pos = _decode_inputs()
  for kw in (dict(kv_positions=kv_pos), dict(q_positions=kv_pos[:, :3])):
    with pytest.raises(ValueError, match="give both q_positions and kv_positions"):
      da.reference_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match="give both q_positions and kv_positions"):
      da.decode_attention(q, k, v, interpret=INTERPRET, **kw)
