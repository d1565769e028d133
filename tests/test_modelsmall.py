"""Hardening (modelsmall): the causal-LM wrapper's degenerate inputs, ``serve.max_len``
validation and sparse upcycling of params that do not match their config.

References: the wrapper's own logits (perplexity by hand), the engine's context rule
(a prompt token plus a new one) and the dense params' kernel shapes.
"""

import dataclasses
import math

import jax
import numpy as np
import pytest

from blockdiff_jax.interop import causal_lm
from blockdiff_jax.model import build
from blockdiff_jax.model import transformer
from blockdiff_jax.model import upcycle
from blockdiff_jax.serving import config as serve_config

CFG = transformer.TransformerConfig(vocab_size=40, d_model=32, num_layers=1, num_heads=4,
                                    num_kv_heads=2, head_dim=8, mlp_dim=48)


@pytest.fixture(scope="module")
def params():
  return build.init_params(transformer.Transformer(CFG), 0)


# --- causal_lm ------------------------------------------------------------------------------

@pytest.mark.parametrize("ids", [[7], [], [[1, 2, 3]]])
def test_perplexity_needs_one_sequence_of_two_tokens(params, ids):
  """One token has no next token to score: exp(mean of nothing) was a silent NaN."""
  with pytest.raises(ValueError, match="perplexity: ids must be one sequence of >= 2"):
    causal_lm.perplexity(CFG, params, ids)


def test_perplexity_of_two_tokens_is_the_next_token_probability(params):
  ids = [3, 11]
  lp = jax.nn.log_softmax(causal_lm.logits(CFG, params, np.array([ids]))[0, 0])
  assert causal_lm.perplexity(CFG, params, ids) == pytest.approx(
      math.exp(-float(lp[11])), rel=1e-5)


def test_greedy_refuses_an_empty_prompt_and_negative_steps(params):
  """An empty prompt's first token was the argmax at a padding position, returned as a
  prediction."""
  with pytest.raises(ValueError, match="greedy: prompt is empty"):
    causal_lm.greedy(CFG, params, [], 2)
  with pytest.raises(ValueError, match="greedy: steps must be >= 0, got -1"):
    causal_lm.greedy(CFG, params, [1, 2], -1)


# --- serve config ---------------------------------------------------------------------------

@pytest.mark.parametrize("max_len,ok", [(0, True), (1, False), (2, True)])
def test_serve_max_len_one_is_refused_naming_it(max_len, ok):
  """max_len=1 passed validation; the engine refused it only after the model loaded, as
  "max_len must be >= 2" without the section."""
  s = serve_config.default_serve_config()
  s.max_len = max_len
  if ok:
    serve_config.validate(s)
  else:
    with pytest.raises(ValueError, match="serve.max_len must be 0 .* or >= 2, got 1"):
      serve_config.validate(s)


# --- upcycle --------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("mlp_dim", 64), ("d_model", 16)])
def test_upcycle_refuses_params_of_other_dims_naming_the_field(params, field, value):
  """The experts' width came from cfg.mlp_dim, not the params: a mismatch upcycled
  silently and failed at the MoE model's first forward on a parameter shape."""
  other = dataclasses.replace(CFG, **{field: value})
  with pytest.raises(ValueError, match=f"kernel of 'layer_0'.*model.{field}={value}"):
    upcycle.upcycle(params, other, 4, 2)
  up, up_cfg = upcycle.upcycle(params, CFG, 4, 2)  # The params' own config upcycles.
  assert up["layer_0"]["moe"]["wi_gate"].shape == (4, 32, 48)
  assert up_cfg.moe.expert_dim == 48


def test_upcycle_of_a_moe_model_names_the_field(params):
  up, up_cfg = upcycle.upcycle(params, CFG, 4, 2)
  with pytest.raises(ValueError, match=r"already MoE \(model.moe.num_experts=4\)"):
    upcycle.upcycle(up, up_cfg, 4, 2)
