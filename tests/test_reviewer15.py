"""reviewer15's findings: an export given its import's overrides writes the exported
model's own architecture, greedy pass@k is refused, the routing sweep routes at the MoE
layer's precision, and an exported tokenizer keeps the model's context length.

References: transformers' logits of the exported folder against ours (the export must
compute what we compute), and the config fields as set by hand.
"""

import dataclasses
import json
import os

import jax
import jax.extend  # pylint: disable=unused-import
import numpy as np
import pytest
import torch
import transformers

from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import causal_lm
from blockdiff_jax.interop import hf
from blockdiff_jax.model import build
from blockdiff_jax.model import transformer
from blockdiff_jax.model import upcycle
from test_interop_hf import build_hf
from test_interop_hf import hf_logits
from test_interop_hf import import_folder
from test_interop_hf import prompts


def _reloaded_logits(out):
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens, valid = prompts()
  return model, hf_logits(model, tokens, valid)[valid]


def _ours(cfg, params):
  tokens, valid = prompts()
  return causal_lm.logits(cfg, params, tokens, valid)[valid]


def test_an_untied_reexport_of_a_tied_import_keeps_its_head_and_eps(tmp_path):
  folder = str(tmp_path / "llama")
  build_hf("llama").save_pretrained(folder)  # Tied embeddings, rms_norm_eps 1e-6.
  overrides, cfg, params = import_folder(folder)
  cfg2 = dataclasses.replace(cfg, tie_embeddings=False, norm_eps=1e-5)
  params2 = build.init_params(transformer.Transformer(cfg2), 3)  # A head of its own.
  out = str(tmp_path / "export")
  hf.export(out, params2, cfg2, overrides)
  model, theirs = _reloaded_logits(out)
  # Before: tie_word_embeddings true and eps 1e-6 from the import; transformers tied the
  # trained head away.
  assert not model.config.tie_word_embeddings and model.config.rms_norm_eps == 1e-5
  np.testing.assert_allclose(theirs, _ours(cfg2, params2), atol=1e-4, rtol=0)


def test_an_upcycled_dense_import_exports_as_an_moe(tmp_path):
  folder = str(tmp_path / "qwen3")
  build_hf("qwen3").save_pretrained(folder)
  overrides, cfg, params = import_folder(folder)
  params2, cfg2 = upcycle.upcycle(params, cfg, num_experts=4, top_k=2, seed=1,
                                  router_std=0.5)
  cfg2 = dataclasses.replace(cfg2, moe=dataclasses.replace(cfg2.moe, impl="dense"))
  out = str(tmp_path / "export")
  hf.export(out, params2, cfg2, overrides)
  model, theirs = _reloaded_logits(out)
  # Before: Qwen3ForCausalLM with expert tensors it ignored (random dense MLPs loaded).
  assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 4
  np.testing.assert_allclose(theirs, _ours(cfg2, params2), atol=1e-4, rtol=0)


def test_an_upcycled_model_no_hf_class_computes_is_refused(tmp_path):
  folder = str(tmp_path / "qwen2")
  build_hf("qwen2").save_pretrained(folder)  # q/k/v biases: no shared-expert-free MoE has them.
  overrides, cfg, params = import_folder(folder)
  params2, cfg2 = upcycle.upcycle(params, cfg, num_experts=4, top_k=2)
  with pytest.raises(architectures.UnsupportedArchitectureError):
    hf.export(str(tmp_path / "export"), params2, cfg2, overrides)
  assert not os.path.exists(os.path.join(tmp_path, "export", "config.json"))


def test_a_plain_reexport_keeps_the_imports_model_type_and_length(tmp_path):
  folder = str(tmp_path / "llama")
  build_hf("llama").save_pretrained(folder)
  overrides, cfg, params = import_folder(folder)
  out = str(tmp_path / "export")
  hf.export(out, params, cfg, overrides)
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    written = json.load(f)
  assert written["model_type"] == "llama" and written["max_position_embeddings"] == 128
  jax.tree.map(np.testing.assert_array_equal, params, import_folder(out)[2])


def test_an_exported_tokenizer_keeps_the_models_context_length(tmp_path):
  from blockdiff_jax.interop import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from test_interop_pretrained import _folder_with_unmasked_tokenizer  # pylint: disable=g-import-not-at-top
  src = str(tmp_path / "tok")
  _folder_with_unmasked_tokenizer(src)
  tok = tokenizer_lib.PretrainedTokenizer.from_folder(src)
  folder = str(tmp_path / "llama")
  build_hf("llama").save_pretrained(folder)  # max_position_embeddings 128.
  overrides, cfg, params = import_folder(folder)
  out = str(tmp_path / "export")
  hf.export(out, params, cfg, overrides, tokenizer=tok)
  # 8192 whatever the model's length (Qwen's 32k: transformers warned and truncated there).
  assert transformers.AutoTokenizer.from_pretrained(out).model_max_length == 128


# --- greedy pass@k ---------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,refused", [(0.0, True), (0.8, False)])
def test_greedy_pass_at_k_is_refused_before_the_model_loads(tmp_path, monkeypatch,
                                                            temperature, refused):
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  loaded = []
  monkeypatch.setattr(evaluate.inference, "load_for_inference",
                      lambda *a: loaded.append(1) or (_ for _ in ()).throw(RuntimeError("loaded")))
  c = config_lib.base_config()
  c.eval.tasks, c.eval.samples_per_problem, c.eval.ks = "humaneval", 4, "1,4"
  c.sample.temperature = temperature
  with pytest.raises((ValueError, RuntimeError)) as e:
    evaluate.run(c, str(tmp_path))
  if refused:
    assert e.type is ValueError and "sample.temperature" in str(e.value) and not loaded
  else:
    assert str(e.value) == "loaded"  # Validation passed; the model load came next.


# --- the routing sweep's router precision -------------------------------------------------------

def _dot_precisions(jaxpr, out):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append((tuple(v.aval.shape for v in eqn.invars), eqn.params["precision"]))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      _dot_precisions(sub, out)
  return out


def test_the_routing_sweep_routes_at_the_layers_precision(tiny_moe):
  from blockdiff_jax import masks  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.evaluation import routing_sweep  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model, params = tiny_moe
  fn = routing_sweep.make_apply_with_block_stats(model)
  meta = masks.make_meta(jnp.arange(8)[None], 1, masks.CLEAN)
  jaxpr = jax.make_jaxpr(fn)(params, jnp.zeros((1, 8), jnp.int32), meta).jaxpr
  # Tokens [1, 8, 16] times a router [16, 4].
  router = [p for shapes, p in _dot_precisions(jaxpr, []) if shapes == ((1, 8, 16), (16, 4))]
  # The layer's router and the sweep's recount of it: on GPUs a default-precision fp32
  # dot is TF32, so the sweep counted experts of a routing the layer did not run.
  assert len(router) == 2
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  assert all(p == highest for p in router), router
