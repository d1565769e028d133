"""Hardening of the HumanEval harness (pass@k, sandbox scoring, infilling) and of loading
a trained workdir for inference."""

import fractions
import math
import re

import jax
import jax.numpy as jnp
import pytest

from conftest import load_config_file
from blockdiff_jax.checkpoint import checkpoints
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.checkpoint import initial
from blockdiff_jax.evaluation import humaneval
from blockdiff_jax.evaluation import infilling
from blockdiff_jax.evaluation import pass_at_k
from blockdiff_jax.evaluation import sandbox
from blockdiff_jax.model import build
from blockdiff_jax.train import optimizer
from blockdiff_jax.train import state as state_lib


# ---------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize("n", [1, 2, 7, 30, 200])
def test_pass_at_k_matches_the_exact_binomial_formula(n):
  """1 - C(n-c, k) / C(n, k) with exact fractions, for every c and k (c = 0 and c = n
  included); 200 samples exercises the numerically stable product."""
  for c in range(n + 1):
    for k in sorted({1, 2, n // 2 or 1, n}):
      if k > n:
        continue
      want = 1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k))
      assert pass_at_k.pass_at_k(n, c, k) == pytest.approx(float(want), abs=1e-12), (n, c, k)


# ---------------------------------------------------------------------------- sandbox

# Replaces the next definition (the tests' ``check``) by a function that asserts nothing.
_DANGLING_DECORATOR = "\n@lambda check: (lambda candidate: None)"
_LIMITS = sandbox.SandboxLimits(timeout_s=10.0)


@pytest.fixture(scope="module")
def problems():
  return humaneval.load_problems()


def test_a_dangling_decorator_in_a_completion_cannot_wrap_the_tests_check(problems):
  """HumanEval/64's tests start with ``def check``: a wrong completion ending in a
  decorator used to decorate it into a no-op and score as passed."""
  p = problems["HumanEval/64"]
  assert p["test"].lstrip().startswith("def check")
  samples = [{"task_id": "HumanEval/64", "completion": p["canonical_solution"]},
             {"task_id": "HumanEval/64", "completion": "    return -1\n"},
             {"task_id": "HumanEval/64", "completion": "    return -1" + _DANGLING_DECORATOR}]
  got = humaneval.score_samples(samples, {"HumanEval/64": p}, ks=(1,), workers=2,
                                limits=_LIMITS)
  assert [s["passed"] for s in got["samples"]] == [True, False, False]
  assert "SyntaxError" in got["samples"][2]["detail"]


def test_a_dangling_decorator_in_an_infill_cannot_wrap_the_tests_check(problems):
  """The hole is the body's last line, so the middle ends the code before the tests."""
  task = next(t for t in infilling.make_tasks({"HumanEval/64": problems["HumanEval/64"]})
              if t.suffix == "")
  got = infilling.score_infills(
      [task] * 2, [task.middle, "    return -1" + _DANGLING_DECORATOR], workers=2,
      limits=_LIMITS)
  assert [r["passed"] for r in got["results"]] == [True, False]


@pytest.mark.parametrize("rows,message", [
    pytest.param([{"task_id": "X/0", "prompt": "def f():\n"}],
                 r"problem 1 lacks \['test', 'entry_point'\]", id="missing_keys"),
    pytest.param([{"task_id": "X/0", "prompt": "def f():\n", "test": "", "entry_point": "f"},
                  ["X/1"]], r"problem 2 lacks \['task_id'", id="not_an_object"),
    pytest.param([{"task_id": "X/0", "prompt": "", "test": "", "entry_point": "f"}] * 2,
                 "task_id 'X/0' appears twice", id="duplicate"),
])
def test_a_malformed_problems_file_is_refused_before_scoring(tmp_path, capsys, rows,
                                                             message):
  """A problem without "test" used to score every sample an "error" and report pass@1
  = 0% with exit code 0; a missing --problems-file ended in a traceback."""
  problems = tmp_path / "problems.jsonl"
  humaneval.write_jsonl(str(problems), rows)
  samples = tmp_path / "samples.jsonl"
  humaneval.write_jsonl(str(samples), [{"task_id": "X/0", "completion": "  return 1\n"}])
  with pytest.raises(ValueError, match=f"{problems}: {message}"):
    humaneval.load_problems(str(problems))
  assert humaneval.main(["--samples", str(samples), "--problems-file", str(problems),
                         "--k", "1"]) == 2
  assert re.search(message, capsys.readouterr().err)
  assert not (tmp_path / "samples.jsonl_results.jsonl").exists()
  assert humaneval.main(["--samples", str(samples), "--problems-file",
                         str(tmp_path / "absent.jsonl"), "--k", "1"]) == 2
  assert "absent.jsonl" in capsys.readouterr().err


def test_infilling_kinds_named_twice_build_each_task_once(problems):
  """eval.infilling_kinds="single-line,single-line" used to build (and decode, and
  score) every single-line task twice, doubling the reported task count."""
  some = {t: problems[t] for t in ("HumanEval/0", "HumanEval/1", "HumanEval/2")}
  once = infilling.make_tasks(some, infilling.InfillOptions(kinds=(infilling.SINGLE_LINE,)))
  twice = infilling.make_tasks(some, infilling.InfillOptions(
      kinds=(infilling.SINGLE_LINE, infilling.SINGLE_LINE)))
  assert len(once) == 3 and twice == once


def test_infilling_kinds_given_as_one_string_is_refused_by_name():
  """A bare string used to be split into characters: "unknown kinds ['-', 'e', ...]"."""
  with pytest.raises(ValueError, match="kinds must be a tuple.*got the string 'single-line'"):
    infilling.InfillOptions(kinds="single-line")


@pytest.mark.parametrize("first", ["x = 1\n", "x = 1", "x = 1\r\n", "x = 1\r"])
def test_program_parts_run_in_order_and_keep_their_line_numbers(first):
  """Parts share globals, and a traceback names the line of the whole program (a part
  may end mid-line, or with a "\\r" whose "\\n" starts the next part)."""
  parts = (first, "\nassert x == 1\n\n\nassert x == 2\n")
  result = sandbox.run_program(parts, limits=_LIMITS)
  assert result.status == "failed" and "AssertionError" in result.detail
  whole = "".join(parts).replace("\r\n", "\n").replace("\r", "\n").split("\n")
  assert f"line {whole.index('assert x == 2') + 1}," in result.stderr
  assert sandbox.run_program(parts[:1] + ("\nassert x == 1\n",), limits=_LIMITS).passed


# ---------------------------------------------------------------------------- inference


def _config(top_k: int = 2, rope_theta: float = 10000.0):
  c = load_config_file("tiny")
  c.data.max_bytes = 40_000
  c.data.seq_len = 32
  c.model.d_model = 32
  c.model.num_layers = 1
  c.model.moe.expert_dim = 32
  c.model.moe.top_k = top_k
  c.model.rope_theta = rope_theta
  return c


@pytest.fixture(scope="module")
def top1_run(tmp_path_factory):
  """A workdir trained (saved) with model.moe.top_k=1 and rope_theta=500."""
  workdir = str(tmp_path_factory.mktemp("top1_run"))
  c = _config(top_k=1, rope_theta=500.0)
  model = initial.build_model(c, None)[1]
  params = build.init_params(model, seed=0)
  checkpoints.save_config(c, workdir)
  state = state_lib.create(params, optimizer.make_optimizer(c.train), use_ema=False)
  ckpt = checkpoints.Checkpointer(f"{workdir}/checkpoints", use_async=False)
  ckpt.save(1, state.replace(step=jnp.int32(1)), {})
  ckpt.close()
  return workdir, params


@pytest.mark.parametrize("field,config", [
    ("moe.top_k", _config(top_k=2, rope_theta=500.0)),
    ("rope_theta", _config(top_k=1, rope_theta=10000.0)),
])
def test_inference_refuses_a_config_that_changes_the_function_but_no_shape(
    top1_run, field, config):
  """Neither field is in any parameter's shape: a config file's default top_k=2 would
  restore a top_k=1 run without error and route every token to two experts."""
  workdir, params = top1_run
  # The run's own settings load, bit for bit.
  got = inference.load_for_inference(workdir, _config(top_k=1, rope_theta=500.0),
                                     use_ema=False)[3]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    assert jnp.array_equal(a, b)
  with pytest.raises(ValueError, match=rf"model\.{field}=.*pass --config\.model\.{field}="):
    inference.load_for_inference(workdir, config, use_ema=False)


@pytest.mark.parametrize("field,value", [
    ("attention_impl", "pallas"), ("moe.router_mode", "block"),
    ("moe.capacity_factor", 0.0), ("rope_scaling", {"type": "linear", "factor": 2.0})])
def test_inference_time_settings_still_load_over_the_run(top1_run, field, value):
  """What evaluation varies on purpose (attention kernel, routing mode for a sweep,
  capacity, RoPE scaling for a longer context) is not refused."""
  workdir, params = top1_run
  c = _config(top_k=1, rope_theta=500.0)
  section, name = ((c.model.moe, field[4:]) if field.startswith("moe.") else (c.model, field))
  assert name in section, field
  section[name] = value
  got = inference.load_for_inference(workdir, c, use_ema=False)[3]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    assert jnp.array_equal(a, b)
