"""Output paths, incremental writes and flag checks of small experiment scripts.

decode_peak_memory, long_context_cache, summary_copy_probe, tiny_run_metrics,
expert_parallel_comm, summary_attention_cost and xla_compile_flags; the measurements
themselves are stubbed (each test runs in well under a second of compute).
"""

import json
import os
import sys

import pytest

from conftest import load_experiment


def _strict_json(path) -> dict:
  """``path`` parsed, failing on NaN / Infinity tokens (not JSON, though Python writes them)."""

  def refuse(token):
    raise AssertionError(f"{path} holds the non-JSON token {token}")

  with open(path, encoding="utf-8") as f:
    return json.loads(f.read(), parse_constant=refuse)


# ------------------------------------------------------------------ bare --out names


def _peak_rows(length, full_peak, hier_peak):
  mib = 2**20
  return [{"length": length, "cache": "full", "held_bytes": full_peak * mib // 2,
           "temp_bytes": full_peak * mib // 2, "peak_bytes": full_peak * mib, "compile_s": 1.0},
          {"length": length, "cache": "hier (per layer)", "held_bytes": hier_peak * mib // 2,
           "temp_bytes": hier_peak * mib // 2, "peak_bytes": hier_peak * mib,
           "compile_s": 1.0}]


def test_decode_peak_memory_writes_to_a_bare_out_name(tmp_path, monkeypatch):
  """``--out name`` (no folder) made os.makedirs("") raise after the first length had
  compiled; the table's percentage is the hierarchical peak over the full one."""
  mod = load_experiment("decode_peak_memory")
  monkeypatch.chdir(tmp_path)
  result = {"config": "configs/smollm2.py", "device": "cpu", "machine": "x", "jax": "0",
            "command": "python x", "query": 32, "seconds": 3.0,
            "hierarchy": {"window": 2, "chunk": 256, "rank": 6, "sinks": 1},
            "rows": _peak_rows(2048, 200, 50)}
  mod.write(result, "dpm")
  assert _strict_json(tmp_path / "dpm.json")["rows"][1]["peak_bytes"] == 50 * 2**20
  md = (tmp_path / "dpm.md").read_text()
  assert "| 2048 | hier (per layer) | 25.0 | 25.0 | 50.0 | 25.0% |" in md


def test_long_context_cache_writes_to_a_bare_out_name(tmp_path, monkeypatch):
  """Its first save() (right after the model loads) crashed on ``--out name``."""
  mod = load_experiment("long_context_cache")
  monkeypatch.chdir(tmp_path)
  result = {"config": "configs/smollm2.py", "device": "cpu", "jax": "0", "command": "x",
            "hierarchies": ["W2/c64/r4/s1"], "fidelity": [], "retrieval": [], "errors": [],
            "seconds": 60.0,
            "memory": [{"length": 4096, "cache": "full", "bytes": 4 * 2**20, "fraction": 1.0},
                       {"length": 4096, "cache": "W2/c64/r4/s1", "bytes": 2**20,
                        "fraction": 0.25}]}
  mod.write(result, "lcc", final=False)
  assert _strict_json(tmp_path / "lcc.json")["memory"][1]["fraction"] == 0.25
  assert "| 4096 | 4.0 MiB (100.0%) | 1.0 MiB (25.0%) |" in (tmp_path / "lcc.md").read_text()


# ------------------------------------------------------------------ summary_copy_probe


def test_summary_copy_probe_write_creates_the_out_folder(tmp_path):
  """A new folder in --out failed the first write, after the first model had trained."""
  mod = load_experiment("summary_copy_probe")
  args = vars(mod.parse(["--slots", "0", "--steps", "2", "--out", "unused"]))
  args = {k: v for k, v in args.items() if not k.endswith("_list")}
  point = {"step": 2, "loss": 1.0, "digit_acc": 0.5, "exact": 0.25,
           "by_position": [0.5, 0.5, 0.5, 0.5]}
  results = {"args": args, "command": "x", "machine": "cpu",
             "runs": [{"slots": 0, "seed": 0, "curve": [point], "seconds": 1.0,
                       "final": point}]}
  out = tmp_path / "new" / "deeper" / "probe"
  mod.write(results, str(out))
  assert _strict_json(str(out) + ".json")["runs"][0]["final"]["exact"] == 0.25
  assert "| full attention | 0 | 0.500 |" in (tmp_path / "new" / "deeper" / "probe.md").read_text()


def test_summary_copy_probe_default_out_is_the_checkouts_results(tmp_path, monkeypatch):
  """The default --out was relative to the working directory: started anywhere but the
  checkout's root, the first write failed after the first model had trained."""
  mod = load_experiment("summary_copy_probe")
  monkeypatch.chdir(tmp_path)
  here = os.path.dirname(os.path.abspath(mod.__file__))
  assert mod.parse([]).out == os.path.join(here, "results", "summary_copy_probe")


@pytest.mark.parametrize("argv, flag", [
    (["--key_len", "0"], "--key_len"),   # No digit scored: NaN digits, every key "right".
    (["--key_len", "-2"], "--key_len"),
    (["--window", "0", "--slots", "0,2"], "--window"),  # Failed after the slots=0 model.
])
def test_summary_copy_probe_refuses_bad_flags_by_name(argv, flag, capsys):
  mod = load_experiment("summary_copy_probe")
  with pytest.raises(SystemExit):
    mod.parse(argv)
  assert flag in capsys.readouterr().err


# ------------------------------------------------------------------ tiny_run_metrics


def test_tiny_run_metrics_creates_the_out_folder_before_the_run(tmp_path, monkeypatch):
  """``--out new/dir/x.json`` failed to open after both training runs had finished."""
  mod = load_experiment("tiny_run_metrics")
  ran = []
  monkeypatch.setattr(mod, "run", lambda steps: ran.append(steps) or {
      "nomesh": [{"step": 2, "loss": 1.25}], "mesh": [{"step": 2, "loss": 1.25}]})
  out = tmp_path / "new" / "metrics.json"
  monkeypatch.setattr(sys, "argv", ["tiny_run_metrics.py", "--out", str(out), "--steps", "2"])
  mod.main()
  assert ran == [2]
  assert _strict_json(out) == {"nomesh": [{"step": 2, "loss": 1.25}],
                               "mesh": [{"step": 2, "loss": 1.25}]}


# ------------------------------------------------------------------ dotted --out prefixes


def _ep_result(total):
  kinds = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
  row = {"bytes": {k: 0.0 for k in kinds}, "total": total, "compile_s": 1.0,
         "ratio_vs_gather": 1.0, "small_shape_time_s": 1e-3, "time_ratio_vs_gather": 1.0}
  row["bytes"]["all-reduce"] = total
  return {"date": "2026-01-01", "machine": "2 devices", "jax": "0", "command": "x",
          "shapes": {}, "timing_shapes": {"tokens_per_device": 16, "d_model": 32, "iters": 1},
          "modes": {"gather": row}}


def test_expert_parallel_comm_appends_suffixes_to_a_dotted_out(tmp_path):
  """``--out r/cap1.25`` wrote r/cap1.json (Path.with_suffix), and ``--out r/cap1.5``
  then overwrote it."""
  mod = load_experiment("expert_parallel_comm")
  mod.write(_ep_result(2.0**20), str(tmp_path / "cap1.25"))
  mod.write(_ep_result(3 * 2.0**20), str(tmp_path / "cap1.5"))
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "cap1.25.json", "cap1.25.md", "cap1.5.json", "cap1.5.md"]
  assert _strict_json(tmp_path / "cap1.25.json")["modes"]["gather"]["total"] == 2.0**20
  assert "| gather | 0.0 | 0.0 | 0.0 | 3.0 |" in (tmp_path / "cap1.5.md").read_text()


def test_summary_attention_cost_writes_each_row_under_a_dotted_out(tmp_path, monkeypatch):
  """Rows were written only at the end (a killed or out-of-memory 131k row lost every
  earlier one), and ``--out r/s1.5`` wrote r/s1.json."""
  mod = load_experiment("summary_attention_cost")
  calls = []

  def measure(n, kind, args):
    del args
    calls.append((n, kind))
    if len(calls) == 3:
      raise MemoryError("the third row does not fit")
    return {"n": n, "kind": kind, "block_size": 32, "logits_per_head": float(n) * n,
            "hlo_flops": float(n) ** 2, "compile_s": 0.1}

  monkeypatch.setattr(mod, "measure", measure)
  out = tmp_path / "s1.5"
  with pytest.raises(MemoryError):
    mod.main(["--lengths", "1024", "2048", "--out", str(out)])
  result = _strict_json(tmp_path / "s1.5.json")
  assert [(r["n"], r["kind"]) for r in result["rows"]] == [(1024, "full"), (1024, "summary")]
  assert result["fits"]["full"]["hlo_flops"] is None  # One length so far: no slope.
  assert "| 1024 | summary | 32 |" in (tmp_path / "s1.5.md").read_text()
  assert not (tmp_path / "s1.json").exists()


# ------------------------------------------------------------------ xla_compile_flags


def test_xla_compile_flags_keeps_finished_repeats_when_a_worker_fails(tmp_path, monkeypatch):
  """A worker failing in repeat 2 (SystemExit) used to leave no file: the finished
  repeat's samples were lost."""
  mod = load_experiment("xla_compile_flags")
  monkeypatch.syspath_prepend(mod._HERE)  # pylint: disable=protected-access
  import decode_window_speed  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(decode_window_speed, "_HERE", str(tmp_path))
  calls = []

  def run_worker(flags, smollm2):
    del smollm2  # Not --quick: the real workers would load SmolLM2.
    calls.append(flags)
    if len(calls) > len(mod.FLAG_SETS):
      raise SystemExit("worker failed")
    return {"block_decode_compile_s": 2.0 if flags else 4.0, "isd_decode_compile_s": 1.0}

  monkeypatch.setattr(mod, "run_worker", run_worker)
  monkeypatch.setattr(sys, "argv", ["xla_compile_flags.py", "--repeats", "2", "--tag", "t"])
  with pytest.raises(SystemExit, match="worker failed"):
    mod.main()
  result = _strict_json(tmp_path / "results" / "xla_compile_flags_t.json")
  assert result["repeats"] == 1
  assert [len(v) for v in result["samples"].values()] == [1] * len(mod.FLAG_SETS)
  assert result["rows"][1]["block_decode_compile_s_ratio"] == 0.5


def test_expert_parallel_comm_counts_an_async_permute_by_its_data():
  """XLA spells an async permute ``(operand, result, u32[], u32[]) collective-permute-
  start``; the last array (a u32[] context scalar) was counted: 4 bytes for the permute."""
  mod = load_experiment("expert_parallel_comm")
  hlo = "\n".join([
      "cp-start = (f32[128,32]{0,1}, f32[128,32]{0,1}, u32[], u32[]) "
      "collective-permute-start(input), source_target_pairs={{0,1},{1,0}}",
      "cp-done = f32[128,32]{0,1} collective-permute-done(cp-start)",
      "%cs = (f32[], f32[], u32[], u32[]) collective-permute-start(%s), "
      "source_target_pairs={{0,1},{1,0}}",
      "%gs = (f32[2]{0}, f32[16]{0}) all-gather-start(%v), replica_groups=[1,8]<=[8]"])
  got = mod.collective_bytes(hlo, 8)
  assert got["collective-permute"] == 128 * 32 * 4 + 4  # Each result, received whole.
  assert got["all-gather"] == 16 * 4 * 7 / 8
