"""Plain LoRA runs load for inference with their adapters folded into the weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_init_pretrained import _shifted_config, _tiny_folder
from blockdiff_jax import masks
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.model import lora
from blockdiff_jax.train import trainer


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """A tiny pretrained model fine-tuned 3 steps with plain rank-4 LoRA (fastdllm objective)."""
  tmp = tmp_path_factory.mktemp("lora_run")
  c = _shifted_config(_tiny_folder(tmp), "fastdllm", block_size=8, sft=False, lora_rank=4)
  c.model.lora.alpha = 8.0
  c.train.learning_rate = 3e-2
  c.train.steps = 3
  c.train.checkpoint_every = 3
  workdir = str(tmp / "run")
  trainer.run(c, workdir)
  return c, workdir


def _logits(model, params, length=24):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, length)), jnp.int32)
  meta = masks.make_meta(jnp.broadcast_to(jnp.arange(length), (2, length)), 1, masks.CLEAN)
  return np.asarray(model.apply({"params": params}, tokens, meta)[0])


def _has_adapters(params) -> bool:
  return any(lora.is_lora_path(tuple(k.key for k in path))
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def test_load_for_inference_folds_plain_adapters(lora_run):
  _, workdir = lora_run
  config, model, _, params = inference.load_for_inference(workdir)
  kept_config, kept_model, _, kept = inference.load_for_inference(workdir, merge_lora=False)
  assert config.model.lora.rank == 0 and model.cfg.lora is None and not _has_adapters(params)
  assert kept_config.model.lora.rank == 4 and _has_adapters(kept)
  trained_b = max(float(jnp.abs(v).max()) for p, v in jax.tree_util.tree_flatten_with_path(kept)[0]
                  if p[-1].key == "lora_b")
  assert trained_b > 1e-3  # The adapters trained, so folding has something to keep.
  np.testing.assert_allclose(_logits(model, params), _logits(kept_model, kept),
                             atol=1e-4, rtol=1e-4)


def test_a_config_without_the_runs_adapters_is_refused(lora_run):
  c, workdir = lora_run
  c = c.copy_and_resolve_references()
  c.model.lora.rank = 0
  with pytest.raises(ValueError, match="would be dropped"):
    inference.load_for_inference(workdir, c)


@pytest.mark.parametrize("given,trained,message", [
    ("causal", "bidirectional", "diffusion.block_attention='auto'"),
    ("bidirectional", None, None),  # The run's 'auto' is bidirectional for fastdllm: same mask.
])
def test_a_config_with_other_block_attention_is_refused(lora_run, given, trained, message):
  """block_attention changes no shape, so only the saved config can tell the runs apart."""
  c, workdir = lora_run
  c = c.copy_and_resolve_references()
  c.diffusion.block_attention = given
  if message is None:
    assert inference.load_for_inference(workdir, c)[1].cfg.mask_spec.causal_noisy is False
    return
  with pytest.raises(ValueError, match=f"trained with {trained} attention.*{message}.*"
                     "makes it causal; pass --config.diffusion.block_attention=auto"):
    inference.load_for_inference(workdir, c)
