"""reviewer13's findings: validation runs in the train step's micro-batches, only the
primary process sets corrupt checkpoints aside, and packed SFT statistics are computed once.

References: the one-forward evaluation of the same batch and noise (a dense model: its
metrics do not depend on the split), the rows each traced forward sees, the folders on
disk, and a count of the tokenizer's calls.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.data import pipeline
from blockdiff_jax.data import tokenizers
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.diffusion import losses
from blockdiff_jax.model import build
from blockdiff_jax.train import step as step_lib
from conftest import small_model_config


@pytest.fixture(scope="module")
def dense():
  model, tok = build.build_model(_dense_config())
  return model, tok, build.init_params(model, 0)


def _dense_config():
  c = small_model_config(num_layers=1)
  c.model.moe.num_experts = 0
  return c


OBJECTIVES = {
    "bd3": lambda m: losses.BlockDiffusionObjective(block_size=4, mask_id=m),
    "fastdllm": lambda m: fastdllm.FastDLLMObjective(block_size=4, mask_id=m),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("micro", [2, 4])
def test_validation_in_micro_batches_matches_one_forward(dense, name, micro):
  model, tok, params = dense
  obj = OBJECTIVES[name](tok.mask_id)
  rng = np.random.default_rng(0)
  tokens = rng.integers(10, 200, (8, 16)).astype(np.int32)
  loss_mask = (rng.random((8, 16)) < 0.8).astype(np.float32)  # Rows score unequal counts.
  batch = {"tokens": tokens, "loss_mask": loss_mask,
           "segment_ids": np.zeros_like(tokens)}
  apply, rows_seen = build.make_apply(model), {1: [], micro: []}

  def recording(n):
    def recording_apply(*args, **kwargs):
      rows_seen[n].append(args[1].shape[0])  # (params, tokens, ...): at trace time.
      return apply(*args, **kwargs)
    return recording_apply

  key = jax.random.key(3)
  whole = jax.jit(step_lib.make_eval_step(recording(1), obj))(params, batch, key)
  split = jax.jit(step_lib.make_eval_step(recording(micro), obj, micro))(params, batch, key)
  # Never the whole batch at once (Fast-dLLM's forward holds each row and its complement).
  assert len(set(rows_seen[1])) == 1
  assert rows_seen[micro] and set(rows_seen[micro]) == {rows_seen[1][0] // micro}
  assert set(split) == set(whole)
  for k in whole:
    np.testing.assert_allclose(split[k], whole[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_the_sharded_eval_step_uses_the_runs_accumulation(monkeypatch):
  seen = []
  real = step_lib.make_eval_step

  def recording(apply_fn, obj, micro_batches=1):
    seen.append(micro_batches)
    return real(apply_fn, obj, micro_batches)

  monkeypatch.setattr(step_lib, "make_eval_step", recording)
  from blockdiff_jax.diffusion import config as diffusion_config  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  c = _dense_config()
  c.data.batch_size, c.train.grad_accum_steps = 4, 2
  mesh, _ = mesh_lib.mesh_of(c)
  model, tok = build.build_model(c)
  step_lib.make_sharded_train(c, mesh, model, diffusion_config.objective(c, tok.mask_id))
  assert seen == [2]


# --- corrupt checkpoints set aside by the primary process alone -------------------------------

def _state(offset: float):
  return {"w": jnp.arange(3.0) + offset}


@pytest.mark.parametrize("process", [0, 1])
def test_only_the_primary_moves_corrupt_steps_and_every_process_meets(tmp_path, monkeypatch,
                                                                      process):
  directory = os.path.join(tmp_path, "checkpoints")
  ckpt = checkpoints.Checkpointer(directory, keep=3, use_async=False)
  met = []
  try:
    ckpt.save(1, _state(1.0), {"pos": 1})
    ckpt.save(2, _state(2.0), {"pos": 2})
    real_restore = ckpt.manager.restore

    def restore(step, *args, **kwargs):
      if step == 2:
        raise ValueError("garbled chunk")  # Corruption: the restore falls back to 1.
      return real_restore(step, *args, **kwargs)

    ckpt.manager.restore = restore
    monkeypatch.setattr(jax, "process_index", lambda: process)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(checkpoints.multihost_utils, "sync_global_devices", met.append)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0.0))
    _, data = ckpt.restore(abstract)
    ckpt.manager.restore = real_restore
  finally:
    ckpt.close()
  assert data == {"pos": 1}
  assert met.count("blockdiff_jax_set_aside_newer") == 1  # Every process, whoever moves.
  moved = os.path.isdir(os.path.join(tmp_path, "corrupt_checkpoints"))
  assert moved == (process == 0)
  assert os.path.isdir(os.path.join(directory, "2")) == (process != 0)


# --- packed SFT statistics ---------------------------------------------------------------------

class _CountingTokenizer(tokenizers.ByteTokenizer):
  calls = 0

  def encode_batch(self, texts):
    type(self).calls += 1
    return super().encode_batch(texts)


def test_packed_sft_stats_are_computed_once(monkeypatch):
  monkeypatch.setattr(_CountingTokenizer, "calls", 0)
  tok = _CountingTokenizer()
  records = [(f"question {i}?", f"answer {i}") for i in range(6)]
  ds = pipeline.PackedSFTDataset(records, tok, 64, 2, 8, shuffle=False)
  before = _CountingTokenizer.calls
  first = [ds.bytes_per_token for _ in range(5)]
  # Each read re-tokenized up to 1,000 answers: the trainer reads it at every log line.
  assert _CountingTokenizer.calls - before == 1
  assert len(set(first)) == 1 and first[0] > 0


# --- long_context_retrieval's results, rewritten after each variant ----------------------------

def test_a_failed_rewrite_keeps_the_variants_already_written(tmp_path, monkeypatch):
  import json  # pylint: disable=g-import-not-at-top
  from conftest import load_experiment  # pylint: disable=g-import-not-at-top
  mod = load_experiment("long_context_retrieval")
  args = mod.parse_args(["--models", "full"])
  row = {"variant": "full", "task": "passkey", "length": 256, "depth": 0.5,
         "answer": "12345", "completion": "12345", "hit": True, "seconds": 0.1}
  result = {"device": "cpu", "jax": "x", "command": "c", "seconds": 1.0, "train_seconds": {},
            "settings": vars(args), "curricula": {}, "rows": [row],
            "variants": [{"name": "full"}], "errors": {}}
  out = str(tmp_path / "res")
  mod.write(result, out)
  real_dump = json.dump

  def killed_midway(obj, f, **kwargs):  # As a kill (or a full disk) during the dump.
    f.write('{"rows": [')
    raise KeyboardInterrupt
  monkeypatch.setattr(mod.json, "dump", killed_midway)
  with pytest.raises(KeyboardInterrupt):
    mod.write({**result, "rows": [row, dict(row, depth=1.0)]}, out)
  monkeypatch.setattr(mod.json, "dump", real_dump)
  with open(out + ".json", encoding="utf-8") as f:
    assert json.load(f)["rows"] == [row]  # Truncated to '{"rows": [' before.
