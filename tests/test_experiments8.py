"""Experiment scripts, eighth pass: the GPU-session benchmarks refuse bad sizes before
compiling and write every row as it is measured (strict JSON), the suffix probe refuses
k = 0 / an empty span, pretrained_smollm2 cleans its temporary model folders, and
decoder_equivalence checks its baseline before the run and compares every row."""

import contextlib
import json
import math
import os
import sys
import types

import pytest

from conftest import load_experiment
from test_hardening_experiments3 import fake_smollm2_decode


def _strict_json(path) -> dict:
  """``path`` parsed, failing on NaN / Infinity tokens (not JSON, though Python writes them)."""

  def refuse(token):
    raise AssertionError(f"{path} holds the non-JSON token {token}")

  with open(path, encoding="utf-8") as f:
    return json.loads(f.read(), parse_constant=refuse)


def _refused(fn, capsys, *flag_names):
  """Runs ``fn``; it must exit through argparse naming every one of ``flag_names``."""
  with pytest.raises(SystemExit) as e:
    fn()
  assert e.value.code == 2
  err = capsys.readouterr().err
  for name in flag_names:
    assert name in err, err


# ------------------------------------------------------------------ bench_decode_attention


@pytest.mark.parametrize("argv, names", [
    (["--cache_lens", "0", "64"], ["--cache_lens"]),
    (["--batches", "-1"], ["--batches"]),
    (["--iters", "0"], ["--iters"]),
    (["--heads", "6", "--kv_heads", "4"], ["--heads=6", "--kv_heads=4"]),
    (["--cache_lens", "16", "--block", "32"], ["--block=32", "--cache_lens"]),
    (["--warmup", "-1"], ["--warmup"]),
])
def test_bench_decode_attention_refuses_bad_flags_before_compiling(argv, names, capsys,
                                                                   monkeypatch):
  mod = load_experiment("bench_decode_attention")
  monkeypatch.setattr(mod, "bench", lambda *a: pytest.fail("benchmarked a bad flag"))
  _refused(lambda: mod.main(argv + ["--out", "/nonexistent/x"]), capsys, *names)


def test_bench_decode_attention_keeps_rows_of_a_run_cut_short(tmp_path, monkeypatch):
  """The GPU session gives this step 90 s: a run killed in its last (longest) config
  used to leave no file at all. A NaN error is written as null, not NaN."""
  mod = load_experiment("bench_decode_attention")

  def bench(args, on_gpu):
    yield dict(batch=1, cache=64, ms_xla=2.0, max_abs_err_vs_xla=math.nan)
    raise KeyboardInterrupt  # The step's timeout.

  monkeypatch.setattr(mod, "bench", bench)
  with pytest.raises(KeyboardInterrupt):
    mod.main(["--quick", "--out", str(tmp_path / "b")])
  result = _strict_json(tmp_path / "b.json")
  assert result["rows"] == [dict(batch=1, cache=64, ms_xla=2.0, max_abs_err_vs_xla=None)]
  assert result["meta"]["command"] == "python experiments/bench_decode_attention.py --quick"
  assert "| 1 | 64 | 2 | - |" in (tmp_path / "b.md").read_text()


def test_bench_decode_attention_keeps_going_past_a_failing_config(tmp_path, monkeypatch):
  """An out-of-memory config (131k cache) is an error row; the other configs still run
  and the exit status says some failed."""
  mod = load_experiment("bench_decode_attention")

  def bench_one(args, on_gpu, batch, cache, dtype, splitk, one, first):
    if cache == 128:
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return dict(batch=batch, cache=cache, ms_xla=1.0, gbps_xla=0.5)

  monkeypatch.setattr(mod, "_bench_one", bench_one)
  with pytest.raises(SystemExit, match="some configs failed"):
    mod.main(["--cache_lens", "64", "128", "256", "--batches", "1", "--block", "32",
              "--heads", "2", "--kv_heads", "1", "--head_dim", "8", "--out", str(tmp_path / "b")])
  rows = _strict_json(tmp_path / "b.json")["rows"]
  assert [r["cache"] for r in rows] == [64, 128, 256]
  assert "out of memory" in rows[1]["error"] and rows[2]["ms_xla"] == 1.0
  assert "RESOURCE_EXHAUSTED" in (tmp_path / "b.md").read_text()


# ------------------------------------------------------------------ bench_kernels


@pytest.mark.parametrize("argv, names", [
    (["--tokens", "0"], ["--tokens"]),
    (["--experts", "1"], ["--experts=1"]),
    (["--top_k", "0"], ["--top_k=0"]),
    (["--seq_lens", "256", "-4"], ["--seq_lens"]),
    (["--heads", "3", "--kv_heads", "2"], ["--heads=3", "--kv_heads=2"]),
    (["--iters", "0"], ["--iters=0"]),
])
def test_bench_kernels_refuses_bad_flags_before_compiling(argv, names, capsys, monkeypatch):
  mod = load_experiment("bench_kernels")
  monkeypatch.setattr(mod, "bench_gmm", lambda *a: pytest.fail("benchmarked a bad flag"))
  _refused(lambda: mod.main(argv + ["--out", "/nonexistent/x"]), capsys, *names)


def test_bench_kernels_keeps_rows_of_a_run_cut_short(tmp_path, monkeypatch):
  """The GMM rows were written only after every attention case had run."""
  mod = load_experiment("bench_kernels")

  def bench_gmm(args, on_gpu):
    yield dict(tokens=256, m=512, ms_ragged_fwd=3.0, tflops_ragged_fwd=math.inf)

  def bench_attention(args, on_gpu):
    raise KeyboardInterrupt  # Killed in the first attention case.
    yield  # pylint: disable=unreachable

  monkeypatch.setattr(mod, "bench_gmm", bench_gmm)
  monkeypatch.setattr(mod, "bench_attention", bench_attention)
  with pytest.raises(KeyboardInterrupt):
    mod.main(["--quick", "--out", str(tmp_path / "k")])
  result = _strict_json(tmp_path / "k.json")
  assert result["gmm"] == [dict(tokens=256, m=512, ms_ragged_fwd=3.0, tflops_ragged_fwd=None)]
  assert result["attention"] == [] and "--out" not in result["meta"]["command"]
  text = (tmp_path / "k.md").read_text()
  assert "| 256 | 512 | - | - | - | - | 3 |" in text and "inf" not in text


# ------------------------------------------------------------------ fastdllm_suffix_probe


@pytest.mark.parametrize("flags, names", [
    (["--keeps=0,4"], ["--keeps='0,4'"]),
    (["--keeps=2,x"], ["--keeps='2,x'"]),
    (["--span=0"], ["--span=0"]),
    (["--batch=0"], ["--batch=0"]),
])
def test_suffix_probe_refuses_bad_flags_before_loading(flags, names, capsys, monkeypatch):
  """k = 0 compared the prediction with answer token -1 as "token k-1"; --span=0 masked
  nothing, so the probed position became 0. Both gave numbers, silently wrong."""
  mod = load_experiment("fastdllm_suffix_probe")
  monkeypatch.setattr(mod.checkpoints, "load_config",
                      lambda workdir: pytest.fail("loaded the run for a bad flag"))
  monkeypatch.setattr(sys, "argv", ["fastdllm_suffix_probe.py", "--workdir=/nowhere"] + flags)
  _refused(mod.main, capsys, *names)


def test_suffix_probe_with_no_rows_writes_strict_json(tmp_path, monkeypatch, capsys):
  """No answer long enough: the rates were NaN (np.mean of nothing) in the JSON."""
  mod = load_experiment("fastdllm_suffix_probe")
  config = types.SimpleNamespace(diffusion=types.SimpleNamespace(block_size=4),
                                 data=types.SimpleNamespace(seq_len=16))
  monkeypatch.setattr(mod.checkpoints, "load_config", lambda workdir: config)
  monkeypatch.setattr(mod, "inference", types.SimpleNamespace(
      load_for_inference=lambda *a, **k: (config, None, None, None, 3),
      inference_context=lambda config: contextlib.nullcontext()))
  monkeypatch.setattr(mod, "heldout_answers", lambda config, workdir, n: [("q", "a")])
  monkeypatch.setattr(mod, "build_rows", lambda *a: ([], []))
  monkeypatch.setattr(mod, "build", types.SimpleNamespace(make_apply=lambda model: None))
  monkeypatch.setattr(mod, "_HERE", str(tmp_path))
  (tmp_path / "results").mkdir()
  monkeypatch.setattr(sys, "argv", ["fastdllm_suffix_probe.py", "--workdir=/w", "--tag=t"])
  mod.main()
  summary = _strict_json(tmp_path / "results" / "fastdllm_suffix_probe_t.json")["summary"]
  assert summary["suffix"] == {"rows": 0, "reference": None, "repeats_previous": None,
                               "ar_reference": None}
  assert "| suffix | 0 | - | - | - |" in (tmp_path / "results" /
                                          "fastdllm_suffix_probe_t.md").read_text()
  assert "no probe rows" in capsys.readouterr().err


# ------------------------------------------------------------------ pretrained_smollm2


def test_pretrained_smollm2_removes_its_converted_model(tmp_path, monkeypatch):
  """The GGUF converted to an fp32 HF folder (~0.5 GB) stayed in /tmp after every run."""
  mod = load_experiment("pretrained_smollm2")
  caches = []

  def measure_import(cache, label):
    caches.append(cache)
    assert os.path.isdir(cache)  # Alive while it is used.
    return {"phase": label, "wall_s": 1.0, "tracemalloc_peak_mb": 2.0, "max_rss_mb": 3.0,
            "rss_before_load_mb": 1.0}

  monkeypatch.setattr(mod, "measure_import", measure_import)
  monkeypatch.setattr(mod, "measure_decode", fake_smollm2_decode)
  monkeypatch.setattr(sys, "argv", ["pretrained_smollm2.py", "--new_tokens=4",
                                    "--threads=1,2", f"--out={tmp_path / 'p'}"])
  mod.main()
  assert len(caches) == 2 and caches[0] == caches[1]
  assert not os.path.exists(caches[0])
  assert _strict_json(tmp_path / "p.json")["decode"]["torch_thread_counts"] == [1, 2]


@pytest.mark.parametrize("flags, names", [
    (["--threads=0,2"], ["--threads='0,2'"]),
    (["--threads=two"], ["--threads='two'"]),
    (["--new_tokens=0"], ["--new_tokens=0"]),
])
def test_pretrained_smollm2_refuses_bad_flags_before_importing(flags, names, capsys,
                                                               monkeypatch):
  mod = load_experiment("pretrained_smollm2")
  monkeypatch.setattr(mod, "measure_import",
                      lambda *a: pytest.fail("imported the model for a bad flag"))
  monkeypatch.setattr(sys, "argv", ["pretrained_smollm2.py"] + flags)
  _refused(mod.main, capsys, *names)


# ------------------------------------------------------------------ decoder_equivalence


def test_decoder_equivalence_checks_the_baseline_before_training(tmp_path, monkeypatch,
                                                                  capsys):
  """A missing --baseline was opened only after training and decoding every case."""
  mod = load_experiment("decoder_equivalence")
  monkeypatch.setattr(mod, "trainer", types.SimpleNamespace(
      run=lambda *a: pytest.fail("trained before checking the baseline")))
  monkeypatch.setattr(sys, "argv", ["decoder_equivalence.py", f"--workdir={tmp_path / 'r'}",
                                    f"--baseline={tmp_path / 'none.json'}"])
  _refused(mod.main, capsys, "--baseline=", "none.json", "--write_baseline")


def test_decoder_equivalence_a_shorter_baseline_is_not_equivalent():
  """zip() stopped at the shorter row list: a baseline with fewer rows (or none) passed."""
  mod = load_experiment("decoder_equivalence")
  row = {"tokens": [1, 2], "nfe": 2, "steps": [2], "edits": None}
  new = {"cases": {n: {"rows": [row, row], "forwards": 2} for n, _, _ in mod.CASES}}
  base = {"cases": {n: {"rows": [row], "forwards": 2} for n, _, _ in mod.CASES}}
  base["cases"]["ar"]["rows"] = []
  table = mod._compare(base, new)  # pylint: disable=protected-access
  assert not any(mod._ok(r) for r in table)  # pylint: disable=protected-access
  assert all(not r["tokens_identical"] for r in table)
  same = mod._compare(new, new)  # pylint: disable=protected-access
  assert all(mod._ok(r) for r in same)  # pylint: disable=protected-access
