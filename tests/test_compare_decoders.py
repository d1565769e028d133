"""experiments/compare_decoders.py: every decoder on one gated-LoRA model, ISD lossless."""

import jax.numpy as jnp
import numpy as np

from conftest import load_experiment
from test_lora import _perturb
from blockdiff_jax import config as config_lib
from blockdiff_jax import masks
from blockdiff_jax.model import build


def _module():
  return load_experiment("compare_decoders")


def _gated_model():
  c = config_lib.base_config()
  c.model.moe.num_experts = 0
  c.model.d_model, c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 32, 2, 1, 16
  c.diffusion.token_shift = True
  c.diffusion.block_size = 8
  model, tok = build.build_model(c)  # Without adapters, to learn the MASK id.
  c.model.lora.rank = 4
  c.model.lora.mask_id = tok.mask_id
  model, tok = build.build_model(c)
  return c, model, tok, _perturb(build.init_params(model, 0))


def test_every_decoder_runs_and_gated_isd_is_lossless():
  cd = _module()
  c, model, tok, params = _gated_model()
  assert cd.is_gated(model) and not cd.is_gated(cd.ungated(model))
  table = cd.decoders([2, 4], token_shift=True, gated=True, block_size=8)
  names = [name for name, _, _ in table]
  assert names[:4] == ["ar", "isd N=2", "isd N=4", "isd N=4 ungated"]
  assert any("fast-dllm" in n for n in names) and "llada2.1 editing" in names
  assert "left-to-right" in names
  prompts = ["hello world", "def f(x):\n  return"]
  results = {}
  for name, fields, all_tokens in table:
    m = cd.ungated(model) if all_tokens else model
    rows, wall = cd.run_decoder(m, params, tok, c, prompts, fields, 8, 64, 8)
    assert wall > 0 and all(r["generated_tokens"] > 0 and r["nfe"] > 0 for r in rows), name
    results[name] = rows
  ar_rows = results["ar"]
  for name in ("isd N=2", "isd N=4"):
    acc, exact = cd.agreement(results[name], ar_rows, tok)
    assert (acc, exact) == (1.0, 1.0), name
  # Without the gate the verifier is the adapted model: its clean-position logits differ
  # from the base model's, so the check that makes ISD lossless is gone.
  ids = tok.encode("hello world")
  tokens = jnp.asarray([ids], jnp.int32)
  meta = masks.make_meta(jnp.arange(len(ids))[None], 1, masks.CLEAN)
  gated = model.apply({"params": params}, tokens, meta)[0]
  plain = cd.ungated(model).apply({"params": params}, tokens, meta)[0]
  assert np.abs(np.asarray(gated) - np.asarray(plain)).max() > 1e-3
