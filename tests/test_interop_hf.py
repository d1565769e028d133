"""Hugging Face import/export against transformers on tiny random models of each architecture.

transformers and torch are test-only dependencies (the `test` extra; torch==2.13.0 by hand).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import torch
import transformers

from blockdiff_jax.interop import architectures
from blockdiff_jax.interop import causal_lm
from blockdiff_jax.interop import hf
from blockdiff_jax.interop import safetensors_io
from blockdiff_jax.model import transformer
from blockdiff_jax.sampling import ar
from blockdiff_jax.sampling import layout
from conftest import randomized_hf_model

ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe")
VOCAB = 97


def build_hf(kind: str, seed: int = 0):
  """A tiny random transformers model; norms and biases are random too (not 1 / 0)."""
  torch.manual_seed(seed)
  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
  if kind == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        tie_word_embeddings=True, **common))
  elif kind == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        tie_word_embeddings=False, **common))
  elif kind == "qwen3":
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        tie_word_embeddings=True, **common))
  elif kind == "qwen2_moe":
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=24, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True, **common))
  else:
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[0], **common))
  return randomized_hf_model(model)


@pytest.fixture(scope="module", params=ARCHS)
def hf_model(request, tmp_path_factory):
  model = build_hf(request.param)
  folder = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(folder)
  return request.param, model, folder


def hf_logits(model, tokens, valid):
  with torch.no_grad():
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    return model(torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(np.int64)),
                 position_ids=torch.tensor(positions)).logits.float().numpy()


def prompts():
  """Three left-padded prompts of different lengths (the first unpadded)."""
  rng = np.random.RandomState(1)
  tokens = rng.randint(0, VOCAB, (3, 12)).astype(np.int64)
  valid = np.ones((3, 12), bool)
  valid[1, :4] = False
  valid[2, :9] = False
  return tokens, valid


def import_folder(folder, **kwargs):
  overrides = hf.read_overrides(folder)
  cfg = hf.transformer_config(overrides, moe_impl="dense", **kwargs)
  return overrides, cfg, hf.load_params(folder, cfg)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_transformers(hf_model, scan_layers):
  _, model, folder = hf_model
  _, cfg, params = import_folder(folder, scan_layers=scan_layers)
  tokens, valid = prompts()
  ours = causal_lm.logits(cfg, params, tokens, valid)
  ref = hf_logits(model, tokens, valid)
  np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_params_tree_is_the_init_tree(hf_model):
  import flax  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import flops  # pylint: disable=g-import-not-at-top
  _, _, folder = hf_model
  for scan in (False, True):
    _, cfg, params = import_folder(folder, scan_layers=scan)
    want = flax.traverse_util.flatten_dict(flops.param_shapes(cfg))
    got = flax.traverse_util.flatten_dict(params)
    assert set(got) == set(want)
    assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)


def test_greedy_32_tokens_match_generate(hf_model):
  _, model, folder = hf_model
  _, cfg, params = import_folder(folder, scan_layers=True)
  prompt = [5, 17, 42, 8, 61]
  ours = causal_lm.greedy(cfg, params, prompt, 32)
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                         max_new_tokens=32, min_new_tokens=32, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
  assert ours == out[0, 5:].tolist()


def ar_greedy(cfg, params, rows, steps, block_size=1):
  """The project's jit AR decoder (token shift, KV cache) on an imported causal LM."""
  # The imported model has no MASK row: id vocab_size only marks canvas slots.
  opts = layout.DecodeOptions(block_size=block_size, mask_id=cfg.vocab_size, eos_id=-1,
                              stop_at_eos=False, token_shift=True)
  canvas = layout.generation_canvas([np.asarray(r) for r in rows], steps, block_size,
                                    cfg.vocab_size, max_len=10_000)
  out = ar.decode_ar(transformer.Transformer(cfg), params, canvas, opts)
  return [out["tokens"][i, len(r):len(r) + steps].tolist() for i, r in enumerate(rows)]


@pytest.mark.parametrize("block_size", [1, 4])
def test_token_shift_ar_decoder_matches_full_forward_greedy(hf_model, block_size):
  # Prompts of different lengths share one batch; the block size of the canvas must not
  # matter (a shifted model decodes token-causally).
  _, _, folder = hf_model
  _, cfg, params = import_folder(folder, scan_layers=True)
  rows = [[5, 17, 42, 8, 61], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
  got = ar_greedy(cfg, params, rows, 24, block_size)
  for i, r in enumerate(rows):
    assert got[i] == causal_lm.greedy(cfg, params, r, 24), f"row {i}"


def test_round_trip_and_export_loads_in_transformers(hf_model, tmp_path):
  kind, model, folder = hf_model
  overrides, cfg, params = import_folder(folder, scan_layers=True)
  out = str(tmp_path / "export")
  hf.export(out, params, cfg, overrides, max_shard_bytes=20_000)  # Sharded, with an index.
  assert os.path.isfile(os.path.join(out, safetensors_io.INDEX_FILENAME))
  overrides2, cfg2, params2 = import_folder(out, scan_layers=True)
  assert {k: v for k, v in overrides2.items()} == overrides
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert reloaded.config.model_type == kind
  # The source's context length (128), not a default.
  assert reloaded.config.max_position_embeddings == model.config.max_position_embeddings == 128
  tokens, valid = prompts()
  np.testing.assert_allclose(hf_logits(reloaded, tokens, valid)[valid],
                             causal_lm.logits(cfg2, params2, tokens, valid)[valid],
                             atol=1e-4, rtol=0)
  for name, p in model.state_dict().items():  # Exactly the source tensors.
    if name in reloaded.state_dict():
      np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), p.numpy(), err_msg=name)


def test_fused_expert_tensors_import_like_per_expert_ones(tmp_path):
  """transformers >= 5 may store experts fused: gate_up_proj [E, 2F, D], down_proj [E, D, F]."""
  folder = str(tmp_path / "moe")
  build_hf("qwen3_moe").save_pretrained(folder)
  _, cfg, per_expert = import_folder(folder, scan_layers=True)

  def fuse(tensors):
    for layer in range(3):
      p = f"model.layers.{layer}.mlp.experts."
      if p + "0.gate_proj.weight" not in tensors:
        continue
      take = lambda proj: np.stack([tensors.pop(f"{p}{j}.{proj}.weight") for j in range(4)])
      gate, up, down = take("gate_proj"), take("up_proj"), take("down_proj")
      tensors[p + "gate_up_proj"] = np.concatenate([gate, up], axis=1)
      tensors[p + "down_proj"] = down

  _rewrite(folder, fuse)
  assert any(n.endswith("gate_up_proj") for n in safetensors_io.Checkpoint(folder).names)
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(np.testing.assert_array_equal, per_expert, hf.load_params(folder, cfg))


# --- errors -------------------------------------------------------------------------------


@pytest.fixture
def llama_folder(tmp_path):
  folder = str(tmp_path / "llama")
  build_hf("llama").save_pretrained(folder)
  return folder


def _rewrite(folder, edit):
  path = os.path.join(folder, "model.safetensors")
  sf = safetensors_io.SafetensorsFile(path)
  tensors = {n: sf.read(n) for n in sf.tensors}
  edit(tensors)
  safetensors_io.write(path, tensors)


def _edit_config(folder, **changes):
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    c = json.load(f)
  c.update(changes)
  with open(path, "w") as f:
    json.dump(c, f)


def test_unsupported_architecture_names_it_and_the_supported_list(llama_folder):
  _edit_config(llama_folder, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
  with pytest.raises(architectures.UnsupportedArchitectureError,
                     match=r"GPTNeoXForCausalLM.*llama, qwen2, qwen3, qwen3_moe, qwen2_moe"):
    hf.read_overrides(llama_folder)


@pytest.mark.parametrize("overrides,match", [
    ({"moe.num_experts": 4, "qk_norm": False}, "qwen3_moe always normalizes q and k"),
    ({"qk_norm": True, "qkv_bias": True, "_model_type": "qwen2"}, "qk_norm has no qwen2"),
    ({"moe.num_experts": 4, "moe.shared_expert_dim": 8, "qk_norm": False},
     "needs moe.shared_expert_gate"),
])
def test_export_refuses_a_model_hugging_face_would_compute_differently(overrides, match):
  with pytest.raises(architectures.UnsupportedArchitectureError, match=match):
    architectures.hf_config(overrides)


@pytest.fixture
def count_reads(monkeypatch):
  reads = []
  original = safetensors_io.SafetensorsFile.read
  monkeypatch.setattr(safetensors_io.SafetensorsFile, "read",
                      lambda self, name, index=None: reads.append(name) or original(
                          self, name, index))
  return reads


def test_missing_tensor_named_and_nothing_read(llama_folder, count_reads):
  name = "model.layers.2.mlp.down_proj.weight"  # The last layer: checked before any read.
  _rewrite(llama_folder, lambda t: t.pop(name))
  count_reads.clear()
  with pytest.raises(hf.CheckpointMismatchError, match=f"missing tensor '{name}'"):
    import_folder(llama_folder)
  assert not count_reads


def test_unexpected_tensor_named(llama_folder):
  _rewrite(llama_folder, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(3,
                                                                                   np.float32)}))
  with pytest.raises(hf.CheckpointMismatchError,
                     match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
    import_folder(llama_folder)


def test_wrong_shape_names_parameter_and_both_shapes(llama_folder, count_reads):
  _edit_config(llama_folder, intermediate_size=40)
  count_reads.clear()
  with pytest.raises(hf.CheckpointMismatchError,
                     match=r"tensor 'model.layers.0.mlp.(gate|up|down)_proj.weight' has shape "
                           r"\((48, 32|32, 48)\) but parameter "
                           r"layer_0/mlp/(gate|up|down)/DenseGeneral_0/kernel needs \((40, 32|32, 40)\)"):
    import_folder(llama_folder)
  assert not count_reads


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_safetensors_names_the_file(llama_folder, cut):
  path = os.path.join(llama_folder, "model.safetensors")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(cut if cut > 0 else size + cut)
  with pytest.raises(safetensors_io.CorruptCheckpointError, match="model.safetensors"):
    import_folder(llama_folder)


def test_shard_missing_from_index_names_it(llama_folder, tmp_path):
  overrides, cfg, params = import_folder(llama_folder)
  out = str(tmp_path / "sharded")
  hf.export(out, params, cfg, overrides, max_shard_bytes=10_000)
  os.remove(os.path.join(out, "model-00002-of-" + sorted(os.listdir(out))[-2][-17:]))
  with pytest.raises(safetensors_io.CorruptCheckpointError, match="model-00002-of-"):
    import_folder(out)


# --- sharded read on a simulated mesh -----------------------------------------------------

_MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from blockdiff_jax.interop import hf, safetensors_io
    folder = sys.argv[1]
    reads = []
    original = safetensors_io.SafetensorsFile.read
    def counting(self, name, index=None):
      out = original(self, name, index)
      reads.append((name, out.size, int(np.prod(self.shape(name)))))
      return out
    safetensors_io.SafetensorsFile.read = counting
    overrides = hf.read_overrides(folder)
    cfg = hf.transformer_config(overrides, moe_impl="dense", scan_layers=True)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    def spec(path, x):
      names = [getattr(k, "key", str(k)) for k in path]
      if names[-1] == "embedding":
        return P(None, "model")  # Vocab 97 is odd: split the width.
      if names[-1] == "kernel" and names[-3] in ("query", "key", "value"):
        return P(None, None, "model", None)  # [layers, D, heads, Dh]: heads split.
      if names[-1] == "kernel" and names[-3] == "out":
        return P(None, "model", None, "data")
      if names[-1] in ("wi_gate", "wi_up", "wo"):
        return P(None, "model")  # Experts split.
      return P()
    reference = hf.load_params(folder, cfg)
    reads.clear()
    shardings = jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec(p, x)), reference)
    sharded = hf.load_params(folder, cfg, shardings)
    same = all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), reference, sharded)))
    layouts = jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, sharded, shardings))
    split = [r for r in reads if "embed_tokens" in r[0] or "q_proj" in r[0]]
    print(json.dumps({"same": same, "layouts": all(layouts), "devices": len(jax.devices()),
                      "split_reads": len(split), "max_fraction": max(r[1] / r[2] for r in split),
                      "expert_reads": sum("experts" in r[0] for r in reads)}))
""")


def test_sharded_load_reads_only_each_devices_shard(tmp_path):
  folder = str(tmp_path / "moe")
  build_hf("qwen3_moe").save_pretrained(folder)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, folder], env=env,
                       capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result == {**result, "same": True, "layouts": True, "devices": 4}
  assert result["split_reads"] > 0
  # Embedding [V, D/2], q [.., H/2, ..]: each read is at most half a tensor.
  assert result["max_fraction"] <= 0.5
  # Experts split in 2: each of 4 devices reads 2 of the 4 experts' 3 tensors in each of the
  # 2 MoE layers (a full read per device would be 96).
  assert result["expert_reads"] == 4 * 2 * 3 * 2
