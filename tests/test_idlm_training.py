"""I-DLM end to end: self-distillation, introspective training of gated LoRA, lossless ISD."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import one_layer_hf_folder
from test_init_pretrained import _config
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import sft
from blockdiff_jax.diffusion import introspective
from blockdiff_jax.interop import pretrained
from blockdiff_jax.model import build
from blockdiff_jax.model import lora
from blockdiff_jax.model import transformer
from blockdiff_jax.sampling import ar as ar_lib
from blockdiff_jax.sampling import distill
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import speedup
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import state as state_lib
from blockdiff_jax.train import step as step_lib
from blockdiff_jax import masks

QUESTIONS = ["what is a list", "sort three numbers", "why is the sky blue", "name a colour",
             "count to five", "say hello"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return one_layer_hf_folder(tmp_path_factory.mktemp("hf"))


def _idlm_config(folder, mask_id, steps=4):
  c = _config(folder)
  c.diffusion.token_shift = True
  c.diffusion.objective = "introspective"
  c.diffusion.isd_stride = 4
  c.model.lora.rank = 4
  c.model.lora.mask_id = mask_id
  c.train.trainable = "lora"
  c.train.learning_rate = 3e-2
  c.train.steps = steps
  c.train.checkpoint_every = steps
  c.data.corpus = "sft"
  c.data.sft_source = "distilled"
  c.data.sft_block_multiple = 4
  c.data.validation_fraction = 0.0
  c.distill.num_prompts = len(QUESTIONS)
  c.distill.max_new_tokens = 12
  c.distill.batch_size = 4
  c.distill.max_len = 160
  c.data.seq_len = 128
  c.data.batch_size = 2
  return c


def test_distill_train_then_isd_is_lossless(folder, tmp_path):
  """--mode=distill, --mode=train (introspective, gated LoRA), then ISD == AR greedy text."""
  pre = pretrained.load(folder, None)
  c = _idlm_config(folder, pre.mask_id)
  qfile = tmp_path / "q.txt"
  qfile.write_text("\n".join(QUESTIONS))
  c.distill.source = str(qfile)
  workdir = str(tmp_path / "run")
  path = distill.run(c, workdir)

  # Every distilled answer is the model's greedy AR continuation of the rendered question.
  _, model, tok, params = inference.load_for_inference(workdir, c)
  with open(path) as f:
    records = [json.loads(line) for line in f]
  assert [r["prompt"] for r in records] == QUESTIONS
  opts = layout.DecodeOptions(block_size=1, mask_id=tok.mask_id, eos_id=tok.eos_id,
                              token_shift=True)
  for r in records[:3]:
    head = sft.render(tok, (r["prompt"], ""))[0]
    canvas = layout.generation_canvas([head], 12, 1, tok.mask_id, 160)
    gen = ar_lib.decode_ar(model, params, canvas, opts)["tokens"][0, len(head):]
    eos = np.flatnonzero(gen == tok.eos_id)
    assert tok.decode(gen[:eos[0] if eos.size else len(gen)]) == r["response"]
    assert r["finished"] == bool(eos.size)  # Cut at max_new_tokens: no EOS in training.

  from blockdiff_jax.train import trainer  # pylint: disable=g-import-not-at-top
  metrics = trainer.run(c, workdir)
  assert np.isfinite(metrics["ce_noisy"]) and np.isfinite(metrics["ce_clean"])
  _, model, tok, params = inference.load_for_inference(workdir)
  assert model.cfg.mask_spec.causal_noisy and model.cfg.lora.gated
  flat = flax.traverse_util.flatten_dict(params)
  for path_, value in flax.traverse_util.flatten_dict(pre.params).items():
    np.testing.assert_array_equal(np.asarray(flat[path_]), np.asarray(value))  # Frozen.
  assert max(float(np.abs(np.asarray(v)).max()) for k, v in flat.items()
             if "lora_b" in k) > 1e-3  # The adapters trained.

  # At the stride the adapters trained for; other strides take the same path
  # (test_sampling_isd.py: strides 2, 3 and 8 against AR).
  prompts = ["<|bos|>" + q for q in QUESTIONS[:4]]
  rows, summary = speedup.compare_with_ar(model, params, tok, prompts, opts, 12, 160,
                                          speedup.Decoder("isd", c.diffusion.isd_stride))
  assert summary["identical"], [(r["completion"], r["ar_completion"]) for r in rows]
  assert summary["tpf"] >= 1.0 and summary["prompts"] == 4


def test_distilled_source_without_distill_names_the_fix(tmp_path):
  with pytest.raises(ValueError, match="--mode=distill"):
    sft.load_records("distilled", "train", 0.0, 10, workdir=str(tmp_path))


def _tiny_lora_model():
  cfg = transformer.TransformerConfig(
      vocab_size=16, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=48, lora=lora.LoraConfig(rank=2, gated=True, mask_id=15),
      mask_spec=masks.MaskSpec(causal_noisy=True))
  return transformer.Transformer(cfg)


@pytest.mark.parametrize("accum", [1, 2])
def test_frozen_base_gets_the_same_adapter_update_without_weight_gradients(accum):
  """stop_gradient on frozen weights: identical adapter updates, base untouched."""
  model = _tiny_lora_model()
  params = build.init_params(model, 0)
  # Non-zero B, so gradients reach A too.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if lora.is_lora_path(p) else x, params)
  apply_fn = build.make_apply(model)
  obj = introspective.IntrospectiveObjective(stride=4, mask_id=15)
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, 15, (4, 16)), jnp.int32),
           "loss_mask": jnp.ones((4, 16), jnp.float32)}
  tx = optax.chain(optax.masked(optax.sgd(0.1), optimizer.trainable_mask),
                   optax.masked(optax.set_to_zero(),
                                lambda p: jax.tree.map(lambda t: not t,
                                                       optimizer.trainable_mask(p))))
  out = []
  for mask_fn in (None, optimizer.trainable_mask):
    train_step = jax.jit(step_lib.make_train_step(apply_fn, obj, tx, lambda s: 0.1, accum,
                                                  trainable_mask=mask_fn))
    state, metrics = train_step(state_lib.create(params, tx, False), batch, jax.random.key(0))
    assert float(metrics["finite"]) == 1.0
    out.append(state.params)
  moved = []
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out[0]), jax.tree.leaves(out[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    before = np.asarray(flax.traverse_util.flatten_dict(params)[
        tuple(getattr(k, "key", k) for k in path)])
    if lora.is_lora_path(path):
      moved.append(np.abs(np.asarray(b) - before).max())
    else:
      np.testing.assert_array_equal(np.asarray(b), before)
  assert min(moved) > 0


def test_smollm2_idlm_config_adds_rank_r_adapters_on_every_projection():
  """The README's parameter count: SmolLM2 + r * (in + out) per adapted projection."""
  from conftest import load_config_file  # pylint: disable=g-import-not-at-top
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import flops  # pylint: disable=g-import-not-at-top
  c = load_config_file("smollm2_idlm")
  config_lib.validate(c)
  m = c.model
  total = flops.param_counts(config_lib.model_config(c))["total"]
  base = c.copy_and_resolve_references()
  base.model.lora.rank = 0
  base_total = flops.param_counts(config_lib.model_config(base))["total"]
  d, f, kv = m.d_model, m.mlp_dim, m.num_kv_heads * m.head_dim
  per_layer = m.lora.rank * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3)
  assert total - base_total == m.num_layers * per_layer == 9_768_960
  assert total == 144_284_544
