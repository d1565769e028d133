"""Data fixes: SFT padding in the answer's block, SFT tail segments, JSONL splits by text,
and atomic BPE tokenizer files."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import masks
from blockdiff_jax.data import config as data_config_lib
from blockdiff_jax.data import corpora
from blockdiff_jax.data import sft
from blockdiff_jax.data import tokenizers
from blockdiff_jax.diffusion import autoregressive
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.diffusion import introspective
from blockdiff_jax.diffusion import losses
from blockdiff_jax.model import moe
from blockdiff_jax.model import transformer

EOS = 2


def test_unscored_padding_is_still_masked_to_the_end_of_the_eos_block():
  # The brief's repro: head 3, answer 3 + EOS ends at 7 inside the first 8-token block.
  rows, kept = sft.pack_kept([(np.arange(3), np.array([10, 11, 12, EOS]))], 16, 8, EOS,
                             score_padding=False, block=8)
  assert kept == [0]
  assert rows["tokens"][0].tolist() == [0, 1, 2, 10, 11, 12, EOS] + [EOS] * 9
  # Hand-built: the answer, its EOS and the padding up to 8 are scored (so masked by the
  # objectives); the next block is padding the answer's block never attends to.
  assert rows["loss_mask"][0].tolist() == [0] * 3 + [1] * 5 + [0] * 8
  # Every position of the answer's block may be masked under BD3-LM: none stays clean.
  maskable = np.asarray(losses.maskable({k: jnp.asarray(v) for k, v in rows.items()}))[0]
  assert maskable[3:8].all() and not maskable[8:].any()


@pytest.mark.parametrize("block,want_scored", [(4, 4), (2, 4), (1, 3), (8, 8)])
def test_unscored_padding_stops_at_the_end_of_the_objectives_block(block, want_scored):
  # Head 1, answer 1 + EOS: n = 3. Padded to 8; scored to the end of the block of EOS.
  rows, _ = sft.pack_kept([(np.array([5]), np.array([10, EOS]))], 8, 8, EOS,
                          score_padding=False, block=block)
  want = [0.0] + [1.0] * (want_scored - 1) + [0.0] * (8 - want_scored)
  assert rows["loss_mask"][0].tolist() == want
  # score_padding=True is unchanged: all the example's padding is scored.
  rows, _ = sft.pack_kept([(np.array([5]), np.array([10, EOS]))], 8, 8, EOS, block=block)
  assert rows["loss_mask"][0].tolist() == [0.0] + [1.0] * 7


def test_block_must_divide_the_multiple():
  with pytest.raises(ValueError, match="block=3"):
    sft.pack_kept([(np.array([5]), np.array([10, EOS]))], 8, 8, EOS, block=3)
  with pytest.raises(ValueError, match="block"):
    sft.pack_kept([(np.array([5]), np.array([10, EOS]))], 8, 8, EOS, block=0)


def _examples():
  return [(np.array([1, 5]), np.array([10, 11, EOS])),
          (np.array([1, 6, 7]), np.array([12, 13, 14, 15, EOS]))]


def test_packed_row_tail_is_padding_segment():
  rows, kept = sft.pack_kept(_examples(), 32, 8, EOS)
  assert kept == [0, 1]
  # Hand-built: example 0 fills block 0, example 1 block 1, the rest is the row's tail.
  assert rows["segment_ids"][0].tolist() == [0] * 8 + [1] * 8 + [-1] * 16
  assert not rows["loss_mask"][0][16:].any()
  # A full row has no tail.
  rows, _ = sft.pack_kept(_examples(), 16, 8, EOS)
  assert rows["segment_ids"][0].tolist() == [0] * 8 + [1] * 8


def _tiny_model(moe_cfg=None):
  cfg = transformer.TransformerConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2,
                                      num_kv_heads=1, head_dim=8, mlp_dim=16, moe=moe_cfg)
  model = transformer.Transformer(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32),
                                        masks.training_meta(8, 8, 1))["params"])
  return (lambda p, t, m, **kw: model.apply({"params": p}, t, m, **kw)), params


OBJECTIVES = {
    "bd3": losses.BlockDiffusionObjective(block_size=8, mask_id=31),
    "fastdllm": fastdllm.FastDLLMObjective(block_size=8, mask_id=31),
    "ar": autoregressive.AutoregressiveObjective(mask_id=31),
    "introspective": introspective.IntrospectiveObjective(stride=4, mask_id=31),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_scores_the_same_with_a_padding_tail(name):
  """Rows ending in -1 segments: same loss and metrics as the old tail segment (the tail
  has loss 0 and its own segment either way), and finite gradients."""
  obj = OBJECTIVES[name]
  loss_fn, _ = diffusion_config.loss_functions(obj)
  apply_fn, params = _tiny_model()
  rows, _ = sft.pack_kept(_examples(), 32, 8, EOS)
  new = {k: jnp.asarray(v) for k, v in rows.items()}
  old_seg = np.where(rows["segment_ids"] < 0, 2, rows["segment_ids"])  # HEAD's tail id.
  old = {**new, "segment_ids": jnp.asarray(old_seg)}
  run = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(apply_fn, p, b, jax.random.key(4),
                                                        obj), has_aux=True))
  (loss_new, m_new), g_new = run(params, new)
  (loss_old, m_old), _ = run(params, old)
  assert np.isfinite(float(loss_new)) and float(loss_new) > 0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(g_new))
  np.testing.assert_allclose(float(loss_new), float(loss_old), rtol=1e-6)
  for key in m_old:
    np.testing.assert_allclose(np.asarray(m_new[key]), np.asarray(m_old[key]), rtol=1e-6,
                               err_msg=key)


def test_moe_router_statistics_skip_the_padding_tail():
  moe_cfg = moe.MoEConfig(num_experts=4, top_k=2, expert_dim=8, impl="dense")
  apply_fn, params = _tiny_model(moe_cfg)
  rows, _ = sft.pack_kept(_examples(), 32, 8, EOS)
  used = int(np.sum(rows["segment_ids"][0] >= 0))
  assert used == 16

  def stats(tokens, seg):
    length = tokens.shape[1]
    meta = masks.training_meta(length, 8, 1, jnp.asarray(seg))
    _, aux = apply_fn(params, jnp.concatenate([tokens, tokens], 1), meta)
    return {k: float(v) for k, v in aux["metrics"].items()}

  full = stats(jnp.asarray(rows["tokens"]), rows["segment_ids"])
  cut = stats(jnp.asarray(rows["tokens"][:, :used]), rows["segment_ids"][:, :used])
  for key in ("load_balance_loss", "router_z_loss"):
    np.testing.assert_allclose(full[key], cut[key], rtol=1e-5, err_msg=key)


def _write_jsonl(path, texts):
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def _splits(paths, fraction=0.5):
  return {s: [d.text for d in corpora.file_documents(paths, s, fraction)]
          for s in corpora.SPLITS}


def test_identical_jsonl_texts_share_a_split(tmp_path):
  texts = [f"document {i}" for i in range(12)]
  lines = [texts[(7 * j) % 12] for j in range(48)]  # Each text on 4 scattered lines.
  _write_jsonl(tmp_path / "a.jsonl", lines)
  _write_jsonl(tmp_path / "b.jsonl", texts[:5])
  got = _splits(f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}")
  assert got["train"] and got["validation"]
  assert not set(got["train"]) & set(got["validation"])
  assert sorted(got["train"] + got["validation"]) == sorted(lines + texts[:5])
  # File order kept within a split.
  want = [t for t in lines + texts[:5] if t in set(got["validation"])]
  assert got["validation"] == want


def test_inserting_a_jsonl_line_moves_no_other_document(tmp_path):
  texts = [f"line of text number {i}" for i in range(40)]
  _write_jsonl(tmp_path / "before.jsonl", texts)
  _write_jsonl(tmp_path / "after.jsonl", ["a new first line"] + texts)
  before = _splits(str(tmp_path / "before.jsonl"))
  after = _splits(str(tmp_path / "after.jsonl"))
  for split in corpora.SPLITS:
    assert [t for t in after[split] if t != "a new first line"] == before[split]


def _bpe_config(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 20, encoding="utf-8")
  d = data_config_lib.default_data_config()
  d.corpus, d.paths, d.tokenizer = "files", str(corpus), "bpe"
  d.bpe_vocab_size, d.validation_fraction = 280, 0.0
  return d


def test_interrupted_tokenizer_write_leaves_no_file_and_the_next_run_retrains(
    tmp_path, monkeypatch):
  d, workdir = _bpe_config(tmp_path), str(tmp_path / "run")
  real_save = tokenizers.BPETokenizer.save

  def half_save(self, path):
    whole = self.hf_tokenizer.to_str()
    with open(path, "w", encoding="utf-8") as f:
      f.write(whole[:len(whole) // 2])
    raise KeyboardInterrupt("killed mid-write")

  monkeypatch.setattr(tokenizers.BPETokenizer, "save", half_save)
  with pytest.raises(KeyboardInterrupt):
    tokenizers.get_tokenizer(d, workdir)
  assert not os.path.exists(os.path.join(workdir, tokenizers.TOKENIZER_FILENAME))
  monkeypatch.setattr(tokenizers.BPETokenizer, "save", real_save)
  tok = tokenizers.get_tokenizer(d, workdir)
  text = "the lazy fox"
  assert tok.decode(tok.encode(text)) == text
  # The file it left is whole: the next run reuses it, and no temporary file is left.
  again = tokenizers.get_tokenizer(d, workdir)
  assert again.encode(text).tolist() == tok.encode(text).tolist()
  assert sorted(os.listdir(workdir)) == sorted(
      [tokenizers.TOKENIZER_FILENAME, tokenizers.TOKENIZER_REQUEST_FILENAME])


@pytest.mark.parametrize("objective,attention,refused", [
    ("bd3", "auto", True), ("fastdllm", "bidirectional", True), ("bd3", "causal", False),
    ("introspective", "auto", False), ("ar", "auto", False)])
def test_unscored_padding_is_refused_where_blocks_are_bidirectional(objective, attention,
                                                                    refused):
  # The pipeline packs with block 1 (the response and its EOS): in a bidirectional block
  # the clean EOS padding after them would show the denoiser where the answer stops.
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.data.corpus, c.data.sft_score_padding = "sft", False
  c.diffusion.objective, c.diffusion.block_attention = objective, attention
  c.data.sft_block_multiple = c.data.seq_len
  if refused:
    with pytest.raises(ValueError, match="sft_score_padding=False"):
      data_config.validate(c)
  else:
    data_config.validate(c)
