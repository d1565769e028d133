"""experiments/fastdllm_task_probe.py: mask patterns, commit order, and the teacher-forced
predictions against the decoder's own layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_experiment
from blockdiff_jax import masks
from blockdiff_jax.model import build

BLOCK = 8
MASK = 3


def _module():
  return load_experiment("fastdllm_task_probe")


def _example(mod, start, n_answer, length, seed=0):
  """A row of ``length`` tokens: prompt [0, start), answer, EOS, EOS padding (loss 1)."""
  toks = np.random.default_rng(seed).integers(4, 60, length).astype(np.int32)
  toks[start + n_answer:] = 1  # EOS id 1.
  loss = (np.arange(length) >= start).astype(np.float32)
  return mod.Example("q", "a", toks, loss, start, n_answer)


def test_pattern_masks_follow_their_definitions():
  mod = _module()
  ex = _example(mod, start=5, n_answer=3, length=16)  # Answer 5..7, EOS 8, padding 9..15.
  m, e, t = mod.pattern_masks(ex, "all masked")
  assert m.shape == (1, 16) and list(t) == [5, 6, 7, 8] and e.all()
  assert list(np.flatnonzero(m[0])) == list(range(5, 16))
  m, e, t = mod.pattern_masks(ex, "left to right")
  assert [list(np.flatnonzero(r)) for r in m] == [list(range(k, 16)) for k in (5, 6, 7, 8)]
  assert e.all()
  pm, e, t = mod.pattern_masks(ex, "prefix only")
  assert (pm == m).all()
  assert [list(np.flatnonzero(r)) for r in e] == [list(range(k + 1)) for k in (5, 6, 7, 8)]
  m, e, t = mod.pattern_masks(ex, "right to left")
  assert [list(np.flatnonzero(r)) for r in m] == [
      list(range(5, k + 1)) + list(range(9, 16)) for k in (5, 6, 7, 8)]
  m, e, t = mod.pattern_masks(ex, "cloze")
  assert [list(np.flatnonzero(r)) for r in m] == [[5], [6], [7], [8]] and e.all()
  assert [ex.place(k) for k in t] == [3, 2, 1, 0]
  with pytest.raises(ValueError, match="pattern must be one of"):
    mod.pattern_masks(ex, "random")


def test_commit_order_reads_the_decoded_answer():
  mod = _module()
  fill = lambda pos, tok, fwd: {"position": pos, "token": tok, "forward": fwd}
  # A 3-token answer: EOS first (forward 1), then the last token, then the others.
  fills = [fill(3, 1, 1), fill(4, 1, 1), fill(2, 9, 2), fill(0, 7, 3), fill(1, 8, 3)]
  o = mod.commit_order(fills, eos_id=1)
  assert o["forward_by_place"] == {3: 3, 2: 3, 1: 2, 0: 1}
  assert o["last_before_first"] and o["eos_before_last"] and not o["one_forward"]
  one = mod.commit_order([fill(0, 7, 1), fill(1, 1, 1)], eos_id=1)
  assert one["one_forward"] and not one["last_before_first"]
  assert mod.commit_order([fill(0, 7, 1)], eos_id=1) is None  # Never ends.
  assert mod.commit_order([fill(0, 1, 1)], eos_id=1) is None  # Empty answer.
  assert mod.commit_order([fill(0, 7, 1), fill(2, 1, 1)], eos_id=1) is None  # A gap.
  # Editing rewrote position 1 into EOS at forward 4: the answer ends there, and each
  # place keeps the forward that filled it.
  edit = {"position": 1, "token": 1, "forward": 4, "kind": "edit"}
  edited = mod.commit_order([fill(0, 7, 1), fill(1, 8, 2), edit, fill(2, 1, 3)], eos_id=1)
  assert edited["forward_by_place"] == {1: 1, 0: 2}
  acc = mod.accuracy_by_place([{2: True, 1: False, 0: True}, {1: True, 0: True}])
  assert acc == {0: [2, 2], 1: [1, 2], 2: [1, 1]}
  rows = [o, one, None]
  assert mod.share(rows, "eos_before_last") == (1, 2)


@pytest.mark.parametrize("shared,step,spec,quick,want", [
    ([40, 80], 0, "all", False, (80, [0, 40, 80])),
    ([40, 80], 0, "all", True, (80, [0, 80])),
    ([40, 80], 40, "", False, (40, [40])),
    ([40, 80], 0, "0,40", False, (80, [0, 40, 80])),
])
def test_pick_steps_adds_the_probed_step(shared, step, spec, quick, want):
  assert _module().pick_steps(shared, step, spec, quick) == want


@pytest.mark.parametrize("shared,step,spec,message", [
    ([40, 80], 60, "all", r"--step=60: both runs need a checkpoint"),
    ([], 0, "all", r"--step=0: both runs need a checkpoint there; they share \[\]"),
    ([40, 80], 0, "40,60", r"no checkpoint of both runs at \[60\]"),
    ([40, 80], 0, "all,40", r"must be 'all' or comma-separated"),
])
def test_pick_steps_names_what_is_missing(shared, step, spec, message):
  with pytest.raises(SystemExit, match=message):
    _module().pick_steps(shared, step, spec, False)


def test_runs_from_other_weights_or_data_are_refused():
  import ml_collections  # pylint: disable=g-import-not-at-top
  mod = _module()
  make = lambda pretrained, seed: ml_collections.ConfigDict(
      {"init": {"pretrained": pretrained},
       "data": {"sft_source": "synthetic", "synthetic_tasks": "add", "seed": seed,
                "synthetic_digits": 5}})
  mod.fastdllm_learning_curve.check_same_origin(make("a", 0), make("a", 0), mod.SAME_DATA)
  with pytest.raises(SystemExit, match="start from different weights"):
    mod.fastdllm_learning_curve.check_same_origin(make("a", 0), make("b", 0), mod.SAME_DATA)
  with pytest.raises(SystemExit, match="the runs differ in data.seed: 0 and 1"):
    mod.fastdllm_learning_curve.check_same_origin(make("a", 0), make("a", 1), mod.SAME_DATA)


def _decoder_layout_argmax(model, params, toks, masked, exists, k):
  """Token k predicted as the decoder predicts it: for a block's first token the clean
  forward over the blocks before it, else the noisy block (masked where ``masked``; slots
  that do not ``exist`` are padding) after the clean prefix, read at k-1."""
  lo = k // BLOCK * BLOCK
  pos = jnp.arange(lo + BLOCK, dtype=jnp.int32)[None]
  seg = jnp.asarray(np.where(exists[:lo + BLOCK], 0, -1))[None]
  if k == lo:
    logits, _ = model.apply({"params": params}, jnp.asarray(toks[:lo])[None],
                            masks.make_meta(pos[:, :lo], BLOCK, masks.CLEAN, seg[:, :lo]))
  else:
    noisy = np.where(masked[lo:lo + BLOCK], MASK, toks[lo:lo + BLOCK])
    inp = np.concatenate([toks[:lo], noisy])
    meta = masks.make_meta(pos[:, :lo], BLOCK, masks.CLEAN, seg[:, :lo]).concat(
        masks.make_meta(pos[:, lo:], BLOCK, masks.NOISY, seg[:, lo:]))
    logits, _ = model.apply({"params": params}, jnp.asarray(inp)[None], meta)
  row = logits[0, k - 1].at[MASK].set(-jnp.inf)
  return int(jnp.argmax(row))


@pytest.mark.parametrize("pattern", ["all masked", "left to right", "prefix only",
                                     "right to left", "cloze"])
@pytest.mark.parametrize("start,n_answer", [(5, 4), (3, 2), (8, 3)])
def test_teacher_forced_predictions_equal_the_decoder_layout(tiny_decoder, pattern, start, n_answer):
  """The probe's training-layout forward predicts each answer token exactly as a forward
  in the decoding layout with the same tokens masked (answers crossing a block boundary
  and starting on one included)."""
  mod = _module()
  model, _, params = tiny_decoder
  ex = _example(mod, start, n_answer, length=3 * BLOCK, seed=start)
  apply_fn = jax.jit(build.make_apply(model))
  got = mod.block_predictions(apply_fn, params, ex, BLOCK, MASK, pattern)
  m, exists, targets = mod.pattern_masks(ex, pattern)
  for r, k in enumerate(targets):
    row = 0 if len(m) == 1 else r
    want = _decoder_layout_argmax(model, params, ex.tokens, m[row], exists[row], k)
    assert got[ex.place(k)] == want, (pattern, k)
  correct = mod.block_correct(apply_fn, params, ex, BLOCK, MASK, pattern)
  assert correct == {ex.place(k): got[ex.place(k)] == int(ex.tokens[k]) for k in targets}


@pytest.mark.parametrize("start,n_answer", [(5, 4), (8, 3)])
def test_ar_predictions_are_the_next_token_of_a_causal_prefix(tiny_decoder, start, n_answer):
  """Token k of the AR column is the argmax of a forward over tokens[:k] alone."""
  mod = _module()
  model, _, params = tiny_decoder
  ex = _example(mod, start, n_answer, length=3 * BLOCK, seed=start)
  got = mod.ar_predictions(jax.jit(build.make_apply(model)), params, ex, MASK)
  # tokens[:k] then 0s to a fixed width (one compile): a causal forward's output at k-1
  # sees only tokens[:k], so the 0s stand in for the later tokens it must not see.
  width = len(ex.tokens)
  apply = jax.jit(lambda toks: model.apply(
      {"params": params}, toks[None],
      masks.make_meta(jnp.arange(width, dtype=jnp.int32)[None], 1, masks.CLEAN))[0][0])
  for k in range(start, start + n_answer + 1):
    prefix = np.zeros((width,), np.int32)
    prefix[:k] = ex.tokens[:k]
    logits = apply(jnp.asarray(prefix))
    assert got[ex.place(k)] == int(jnp.argmax(logits[k - 1].at[MASK].set(-jnp.inf)))
  ok = mod.ar_correct(jax.jit(build.make_apply(model)), params, ex, MASK)
  assert ok == {ex.place(k): got[ex.place(k)] == int(ex.tokens[k])
                for k in range(start, start + n_answer + 1)}


def test_markdown_reads_its_own_json_back(tmp_path):
  """The tables come out the same from the payload as written and as read back."""
  import json  # pylint: disable=g-import-not-at-top
  mod = _module()
  tf = {c: {1: [3, 4], 0: [4, 4], 2: [1, 3]} for c in mod.PATTERNS + (mod.AR_COLUMN,)}
  order = mod.commit_order([{"position": 0, "token": 7, "forward": 1},
                            {"position": 1, "token": 8, "forward": 2},
                            {"position": 2, "token": 1, "forward": 1}], eos_id=1)
  order["correct"] = True
  payload = {"env": {"command": "x.py", "backend": "cpu", "jax": "0", "cpus": 2,
                     "machine": "m", "load_avg": [0, 0, 0], "total_s": 60.0},
             "meta": {"task": "add", "step": 20, "block_run": "a", "ar_run": "b",
                      "questions": ["q"] * 4, "block_size": 8, "sub_block_size": 4},
             "teacher_forced": tf, "curve": [{"step": 0, "teacher_forced": tf},
                                             {"step": 20, "teacher_forced": tf}],
             "decoded": [{"decoder": "threshold 0.9", "exact_match": [1, 4], "tpf": 1.5}],
             "commit_order": [order, None]}
  text = mod.markdown(payload)
  # Results written before diffusion.block_attention existed had bidirectional blocks.
  assert "bidirectional attention inside a block" in text
  assert "| 2 from end | 0.33 (1/3) |" in text and "| EOS | 1.00 (4/4) |" in text
  assert "| 20 | 0.75 (3/4) / 0.57 (4/7) |" in text
  assert "EOS committed before the last answer token: 1.00 (1/1)" in text
  back = json.loads(json.dumps(payload))
  assert mod.markdown(back) == text
  assert "each pair gives the same figures" not in text
  payload["meta"]["block_attention"] = "causal"
  causal = mod.markdown(payload)
  assert "causal attention inside a block" in causal
  assert "`right to left` reads what `all masked` reads" in causal
  mod.plot(tf, payload["curve"], "add", 20, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 0


def test_block_attention_names_the_runs_mask(tiny_decoder):
  import dataclasses  # pylint: disable=g-import-not-at-top
  mod = _module()
  model = tiny_decoder[0]
  assert mod.fastdllm_threshold_sweep.block_attention(model) == "bidirectional"
  for spec, name in ((masks.MaskSpec(causal_noisy=True, causal_clean=True), "causal"),
                     (masks.MaskSpec(causal_noisy=True), "causal noisy blocks")):
    other = model.clone(cfg=dataclasses.replace(model.cfg, mask_spec=spec))
    assert mod.fastdllm_threshold_sweep.block_attention(other) == name
