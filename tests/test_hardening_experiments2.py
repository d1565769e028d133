"""Experiment scripts, second pass: flags refused before the work, ratios against the
same run's baseline, one failing cell kept as a row, and strict JSON."""

import contextlib
import json
import math
import os
import sys
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


class _Tok:
  mask_id, eos_id = 3, 2

  def encode(self, text: str) -> list[int]:
    return [ord(c) for c in text]


# ------------------------------------------------------------------ decode_speed


def _run_decode_speed(tmp_path, monkeypatch, argv, rates: dict, fail: set = frozenset()):
  """decode_speed.main() on a stubbed model: (trained workdirs, JSON path).

  ``rates``: policy name -> tokens/s its stubbed decode reports; a policy in ``fail``
  raises. AR reports unique_experts NaN, as ``generation.generate`` does for AR.
  """
  mod = load_experiment("decode_speed")
  config = mod._load_config(os.path.join(mod._ROOT, "configs", "synthetic.py"))  # pylint: disable=protected-access
  trained = []

  def generate(model, params, tok, prompts, options, max_new, max_len, ar=False, warmup=True):
    name = "ar" if ar else type(options.policy).__name__.lower()
    if name in fail:
      raise RuntimeError(f"XLA fails {name}")
    rows = [{"completion": "", "steps_per_block": [] if ar else [2]} for _ in prompts]
    return rows, {"tpf": 1.0, "tokens_per_s": rates[name], "forwards": 4, "mean_row_nfe": 4.0,
                  "max_row_nfe": 4, "generated_tokens": 4, "wall_s": 0.5,
                  "unique_experts": float("nan") if ar else 2.0}

  monkeypatch.setattr(mod, "trainer", types.SimpleNamespace(
      run=lambda c, workdir: trained.append(workdir)))
  monkeypatch.setattr(mod, "inference", types.SimpleNamespace(
      load_for_inference=lambda workdir: (config, None, _Tok(), None)))
  monkeypatch.setattr(mod, "sample", types.SimpleNamespace(generate=generate))
  # matplotlib is slow to import; raising=False: the old script plotted inline.
  monkeypatch.setattr(mod, "plot", lambda runs, path: None, raising=False)
  out = tmp_path / "ds"
  monkeypatch.setattr(sys, "argv", ["decode_speed.py", f"--workdir={tmp_path / 'run'}",
                                    f"--out={out}", "--n=2"] + argv)
  mod.main()
  return trained, str(out) + ".json"


@pytest.mark.parametrize("policies, names", [
    ("threshold:0.9,margn:0.5", "margn:0.5"),     # A typo in a policy name.
    ("threshold:0.9x", "'threshold:0.9x'"),       # A value that is no number.
    ("threshold:1.5", "threshold:1.5"),           # A value the policy refuses.
])
def test_decode_speed_refuses_a_bad_policy_before_training(tmp_path, monkeypatch, capsys,
                                                           policies, names):
  """The old script trained (minutes to hours), decoded AR and the policies before the bad
  entry, then raised and wrote nothing."""
  trained = []
  with pytest.raises(SystemExit):
    trained, _ = _run_decode_speed(tmp_path, monkeypatch, [f"--policies={policies}"],
                                   rates={"ar": 1.0, "lefttoright": 1.0, "threshold": 1.0})
  err = capsys.readouterr().err
  assert "--policies" in err and names in err
  assert not trained and not (tmp_path / "ds.json").exists()


def test_decode_speed_keeps_the_sweep_past_a_failing_policy_and_writes_strict_json(
    tmp_path, monkeypatch):
  trained, path = _run_decode_speed(
      tmp_path, monkeypatch, ["--policies=threshold:0.9,topk:2,margin:0.5"],
      rates={"ar": 40.0, "lefttoright": 50.0, "threshold": 100.0, "margin": 60.0},
      fail={"topk"})
  assert trained == [str(tmp_path / "run")]
  runs = {r["policy"]: r for r in _strict_json(path)["runs"]}
  assert list(runs) == ["ar", "l2r", "threshold", "topk", "margin"]
  assert runs["ar"]["unique_experts"] is None  # NaN in the old file.
  assert runs["topk"]["error"] == "RuntimeError: XLA fails topk"
  for name in ("l2r", "threshold", "margin"):  # Each against AR's tokens/s in this run.
    assert runs[name]["speedup_vs_ar"] == pytest.approx(
        runs[name]["tokens_per_s"] / runs["ar"]["tokens_per_s"])
  text = (tmp_path / "ds.md").read_text()
  assert "| topk | 2 | not run: RuntimeError: XLA fails topk |" in text
  assert "| threshold | 0.9 | 0.0% | 1.00 | 2.00 | 4 | 4.0 | 100 | 2.50 | 0.0 |" in text


def test_decode_speed_measures_the_policies_when_ar_fails(tmp_path, monkeypatch):
  """AR raising (an XLA error, out of memory) ended the old run with nothing written; now
  the policies are measured and written without a speed-up, and the exit status fails."""
  with pytest.raises(SystemExit, match="AR baseline failed"):
    _run_decode_speed(tmp_path, monkeypatch, ["--policies=threshold:0.9"],
                      rates={"lefttoright": 50.0, "threshold": 100.0}, fail={"ar"})
  runs = {r["policy"]: r for r in _strict_json(tmp_path / "ds.json")["runs"]}
  assert runs["ar"]["error"] == "RuntimeError: XLA fails ar"
  assert runs["threshold"]["tokens_per_s"] == 100.0
  assert all(runs[n]["speedup_vs_ar"] is None and runs[n]["accuracy_drop_points"] is None
             for n in ("l2r", "threshold"))
  assert "| threshold | 0.9 | 0.0% | 1.00 | 2.00 | 4 | 4.0 | 100 | - | - |" in (
      tmp_path / "ds.md").read_text()


# ------------------------------------------------------------------ compare_decoders


def _run_compare_decoders(tmp_path, monkeypatch, argv, ar_text: str):
  """compare_decoders.main() with stubbed decoders: (folders loaded, JSON path).

  AR answers ``ar_text`` then EOS, every other decoder "ab" then EOS, each in 0.5 s (the
  EOS counts as a generated token, as in ``generation.generate``).
  """
  mod = load_experiment("compare_decoders")
  config = config_lib.base_config()
  loaded = []

  def run_decoder(model, params, tok, cfg, prompts, fields, max_new, max_len, block):
    text = ar_text if fields["policy"] == "ar" else "ab"
    return [{"completion": text, "generated_tokens": len(text) + 1, "nfe": 1}
            for _ in prompts], 0.5

  monkeypatch.setattr(mod, "_load_config", lambda path: config)
  monkeypatch.setattr(mod, "sample", types.SimpleNamespace(read_prompts=lambda s: ["p1"]))
  monkeypatch.setattr(mod, "inference", types.SimpleNamespace(
      load_for_inference=lambda workdir, c: loaded.append(workdir) or (c, None, _Tok(), None),
      inference_context=lambda c: contextlib.nullcontext()))
  monkeypatch.setattr(mod, "run_decoder", run_decoder)
  monkeypatch.setattr(mod, "plot", lambda results, path: None)
  out = tmp_path / "cd"
  monkeypatch.setattr(sys, "argv", ["compare_decoders.py", f"--workdir={tmp_path}",
                                    f"--out={out}"] + argv)
  mod.main()
  return loaded, str(out) + ".json"


def test_compare_decoders_has_no_token_accuracy_against_an_empty_ar_answer(tmp_path,
                                                                           monkeypatch):
  """AR answering EOS first leaves no AR tokens to agree with: the old table gave every
  decoder, AR itself included, token accuracy 0.000 (hits / max(0, 1))."""
  _, path = _run_compare_decoders(tmp_path, monkeypatch, [], ar_text="")
  rows = {r["decoder"]: r for r in _strict_json(path)["results"]}
  assert len(rows) == 4 and all(r["token_accuracy"] is None for r in rows.values())
  assert rows["ar"]["exact_match"] == 1.0 and rows["left-to-right"]["exact_match"] == 0.0
  for r in rows.values():  # The speed-ups still stand: EOS is a decoded token.
    assert r["tokens_per_s"] == pytest.approx(r["generated_tokens"] / r["wall_s"])
    assert r["speedup_vs_ar"] == pytest.approx(r["tokens_per_s"] / rows["ar"]["tokens_per_s"])
  assert "| ar | 1.00 | 2.0 | 1.00x | - | 1.00 |" in (tmp_path / "cd.md").read_text()


@pytest.mark.parametrize("flag", ["--strides=1,2", "--strides=2,x", "--max_new_tokens=0"])
def test_compare_decoders_refuses_bad_flags_before_loading(tmp_path, monkeypatch, capsys,
                                                           flag):
  """A stride below 2 used to load SmolLM2 and then fail every ISD row."""
  loaded = []
  with pytest.raises(SystemExit):
    loaded, _ = _run_compare_decoders(tmp_path, monkeypatch, [flag], ar_text="ab")
  assert flag.split("=")[0] in capsys.readouterr().err
  assert not loaded


# ------------------------------------------------------------------ summary_attention_cost


@pytest.mark.parametrize("argv, flag", [
    (["--lengths", "4096", "4096"], "--lengths"),  # One point twice: a fitted "slope".
    (["--lengths", "0"], "--lengths"),
    (["--quick", "--iters", "0"], "--iters"),       # statistics.median([]) after compiling.
])
def test_summary_attention_cost_refuses_bad_flags(argv, flag):
  mod = load_experiment("summary_attention_cost")
  with pytest.raises(ValueError, match=flag):
    mod._parse_args(argv)  # pylint: disable=protected-access


def test_summary_attention_cost_single_length_writes_every_file(tmp_path, monkeypatch):
  """One length has no fitted exponent (None); the plot's legend used to format it with
  :.2f and crash after the measurements, leaving no PNG."""
  mod = load_experiment("summary_attention_cost")
  monkeypatch.setattr(mod, "measure", lambda n, kind, args: {
      "n": n, "kind": kind, "block_size": 32, "logits_per_head": float(n) * n,
      "hlo_flops": float(n) ** 2, "forward_ms": 1e-3 * n})
  mod.main(["--lengths", "1024", "--out", str(tmp_path / "sac")])
  result = _strict_json(tmp_path / "sac.json")
  assert result["fits"]["full"]["hlo_flops"] is None
  assert (tmp_path / "sac.png").stat().st_size > 0
  # Two lengths: the slope is the exact log-log one.
  mod.main(["--lengths", "1024", "4096", "--out", str(tmp_path / "sac2")])
  fits = _strict_json(tmp_path / "sac2.json")["fits"]
  assert fits["full"]["hlo_flops"] == pytest.approx(
      math.log(4096.0 ** 2 / 1024.0 ** 2) / math.log(4.0))


# ------------------------------------------------------------------ shared writer


def test_write_outputs_writes_strict_json(tmp_path, monkeypatch):
  """Six scripts write through decode_window_speed.write_outputs; a threshold-sweep row
  whose answers are all empty has base NLL NaN, which the old file held as a bare NaN."""
  mod = load_experiment("decode_window_speed")
  monkeypatch.setattr(mod, "_HERE", str(tmp_path))
  row = {"decoder": "threshold 0.5", "base_nll": float("nan"), "x_ar": 1.25,
         "curve": [1.0, float("inf"), (2.0, -float("inf"))]}
  base = mod.write_outputs("fastdllm_threshold_sweep", "t", {"rows": [row]}, "text\n")
  assert base == str(tmp_path / "results" / "fastdllm_threshold_sweep_t")
  back = _strict_json(base + ".json")["rows"][0]
  assert back == {"decoder": "threshold 0.5", "base_nll": None, "x_ar": 1.25,
                  "curve": [1.0, None, [2.0, None]]}
  assert math.isnan(row["base_nll"])  # The caller's own values are left alone.


# ------------------------------------------------------------------ notebooks


def test_long_context_notebook_cost_cells_run_with_one_length(monkeypatch, capsys):
  """LONG_CONTEXT_MAX_N=1024 (its smallest length) leaves one point and no fitted exponent:
  the cost cell's round(None) and the plot's :.2f raised TypeError. The notebook's own
  settings, cost and plot cells run here (test_notebooks runs it only at 8k)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import nbformat  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(os.path.join(os.path.dirname(__file__), "..", "notebooks",
                                  "long_context.ipynb"), as_version=4)
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  settings = next(c for c in code if "LONG_CONTEXT_MAX_N" in c)
  cost = next(c for c in code if "fit_exponent" in c)
  figure = next(c for c in code if "ax.loglog" in c)
  monkeypatch.setenv("LONG_CONTEXT_MAX_N", "1024")
  namespace = {}
  for source in (settings, cost, figure):
    exec(compile(source, "long_context.ipynb", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["slopes"] == {"full": None, "summary": None}
  assert "fitted exponent of n: {'full': None, 'summary': None}" in capsys.readouterr().out
  matplotlib.pyplot.close("all")


# ------------------------------------------------------------------ committed results


def test_every_committed_result_file_is_strict_json():
  """Readers other than Python (jq, JSON.parse) refuse NaN; committed results must parse."""
  results = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "results")
  paths = sorted(p for p in os.listdir(results) if p.endswith(".json"))
  assert len(paths) > 50, paths
  for name in paths:
    _strict_json(os.path.join(results, name))
