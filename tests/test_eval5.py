"""Hardening of the evaluation package (eval5): task lists, exponent fits, sample counts."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from blockdiff_jax.diffusion import losses
from blockdiff_jax.evaluation import attention_cost
from blockdiff_jax.evaluation import evaluate
from blockdiff_jax.evaluation import likelihood
from blockdiff_jax.evaluation import routing_sweep
from conftest import evaluate_without_a_model
from conftest import load_config_file


class _Loaded(Exception):
  """Raised by the stub loader: run() got past its checks and loaded the model."""


def _never_load(*args, **kwargs):
  raise _Loaded()


def _config(**eval_fields):
  c = load_config_file("tiny")
  c.eval.update(eval_fields)
  return c


# evaluate.run: the task lists, checked before the model loads.


@pytest.mark.parametrize("tasks", ["", " , ", ","])
def test_empty_task_list_is_refused_before_the_model_loads(tasks, monkeypatch):
  # HEAD loaded the model, ran nothing and wrote an empty results file.
  monkeypatch.setattr(evaluate.inference, "load_for_inference", _never_load)
  with pytest.raises(ValueError, match="eval.tasks is empty"):
    evaluate.run(_config(tasks=tasks), "/nonexistent")


def test_long_context_tasks_accept_spaces_like_every_list_field(monkeypatch):
  # "passkey, kv_recall" was refused as the unknown task ' kv_recall', while
  # eval.tasks and eval.infilling_kinds take spaces after commas.
  monkeypatch.setattr(evaluate.inference, "load_for_inference", _never_load)
  with pytest.raises(_Loaded):
    evaluate.run(_config(tasks="long_context", long_context_tasks="passkey, kv_recall"),
                 "/nonexistent")
  assert evaluate._split(" passkey, kv_recall ,") == ["passkey", "kv_recall"]


def test_long_context_tasks_still_refuse_unknown_and_empty(monkeypatch):
  monkeypatch.setattr(evaluate.inference, "load_for_inference", _never_load)
  with pytest.raises(ValueError, match="needle"):
    evaluate.run(_config(tasks="long_context", long_context_tasks="passkey, needle"),
                 "/nonexistent")
  with pytest.raises(ValueError, match="eval.long_context_tasks is empty"):
    evaluate.run(_config(tasks="long_context", long_context_tasks=" , "), "/nonexistent")


def test_a_task_named_twice_runs_once(monkeypatch, tmp_path):
  calls = []
  evaluate_without_a_model(monkeypatch)
  monkeypatch.setitem(evaluate.TASK_FNS, "likelihood",
                      lambda ev: calls.append("likelihood") or {"nelbo": 1.0})
  res = evaluate.run(_config(tasks="likelihood, likelihood"), str(tmp_path))
  assert calls == ["likelihood"]
  assert res == {"likelihood": {"nelbo": 1.0}}


# attention_cost.fit_exponent against numpy's polyfit on known power laws.


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5.0, 0.0, None])
def test_fit_exponent_skips_points_without_a_finite_positive_value(bad):
  ns = [64, 128, 256, 512]
  rows = [{"n": n, "ms": 3.0 * n ** 1.5} for n in ns]
  rows.insert(2, {"n": 1024, "ms": bad})  # One unusable measurement.
  got = attention_cost.fit_exponent(rows, "ms")
  want = np.polyfit(np.log(ns), np.log([3.0 * n ** 1.5 for n in ns]), 1)[0]
  assert got == pytest.approx(want, abs=1e-9)
  assert got == pytest.approx(1.5, abs=1e-9)


def test_fit_exponent_is_none_when_fewer_than_two_lengths_are_usable():
  rows = [{"n": 64, "ms": 10.0}, {"n": 128, "ms": float("nan")}]
  assert attention_cost.fit_exponent(rows, "ms") is None


def test_measure_refuses_zero_timing_iterations_before_compiling():
  # HEAD compiled, then failed with statistics' "no median for empty data".
  with pytest.raises(ValueError, match="iters"):
    attention_cost.measure(16, "full", timed=True, iters=0)


# Sample counts of the Monte-Carlo estimators.


class _Unread:
  """A dataset that must not be read: the arguments are refused first."""

  def get_batch(self, i):
    raise AssertionError(f"batch {i} was read before the arguments were checked")


@pytest.mark.parametrize("num_batches,num_samples,name", [
    (0, 1, "num_batches"), (1, 0, "num_samples"), (2, -1, "num_samples")])
def test_likelihood_refuses_no_batches_or_no_noise_draws(num_batches, num_samples, name):
  # HEAD: numpy's "need at least one array to concatenate / stack", naming neither.
  obj = losses.BlockDiffusionObjective(block_size=4, mask_id=9)
  with pytest.raises(ValueError, match=name):
    likelihood.evaluate(lambda *a, **k: None, {}, _Unread(), obj, num_batches, num_samples)


@pytest.mark.parametrize("batches,noise_samples,match", [
    (0, 1, "batches is empty"), (1, 0, "noise_samples"), (1, -2, "noise_samples")])
def test_routing_sweep_names_missing_batches_or_draws(tiny_moe, batches, noise_samples, match):
  # HEAD: "no scored token in the batches (every loss_mask is 0)", which is not the cause.
  model, params = tiny_moe
  batch = {"tokens": jnp.zeros((1, 8), jnp.int32), "loss_mask": jnp.ones((1, 8))}
  obj = losses.BlockDiffusionObjective(block_size=4, mask_id=15)
  with pytest.raises(ValueError, match=match):
    routing_sweep.evaluate_setting(model, params, [batch] * batches, obj,
                                   routing_sweep.RoutingSetting("token"),
                                   noise_samples=noise_samples)


def test_likelihood_stderr_of_a_single_sequence_is_unknown_not_zero(tiny_moe):
  """One sequence has no spread: HEAD reported nelbo_stderr = 0.0, an exact-looking NELBO."""
  model, params = tiny_moe
  from blockdiff_jax.model import build  # pylint: disable=g-import-not-at-top

  class _One:
    def get_batch(self, i):
      return {"tokens": jnp.arange(8, dtype=jnp.int32)[None] % 15,
              "loss_mask": jnp.ones((1, 8), jnp.float32)}

  obj = losses.BlockDiffusionObjective(block_size=4, mask_id=15)
  res = likelihood.evaluate(build.make_apply(model), params, _One(), obj, 1, 1,
                            bytes_per_token=2.0)
  assert math.isfinite(res["nelbo"]) and res["scored_tokens"] == 8 and res["sequences"] == 1
  assert math.isnan(res["nelbo_stderr"]) and math.isnan(res["bits_per_byte_stderr"])


def test_ratio_stderr_for_equal_lengths_is_the_per_token_standard_error():
  """Reference: sequences of equal scored length, stderr = std(ddof=1) / sqrt(m)."""
  nats = np.array([10.0, 14.0, 9.0, 15.0])
  tokens = np.full(4, 5.0)
  ratio, stderr = likelihood._ratio(nats, tokens)
  per_token = nats / tokens
  assert ratio == pytest.approx(per_token.mean())
  assert stderr == pytest.approx(per_token.std(ddof=1) / math.sqrt(4))


def test_an_unusable_output_folder_fails_before_any_task_runs(monkeypatch, tmp_path):
  # HEAD ran every task, then lost their results to os.makedirs(WORKDIR/eval) failing.
  (tmp_path / "eval").write_text("not a folder")
  calls = []
  monkeypatch.setattr(evaluate.inference, "load_for_inference",
                      lambda workdir, config: (config, None, None, None))
  monkeypatch.setitem(evaluate.TASK_FNS, "likelihood",
                      lambda ev: calls.append("likelihood") or {"nelbo": 1.0})
  with pytest.raises(OSError, match="eval"):
    evaluate.run(_config(tasks="likelihood"), str(tmp_path))
  assert not calls
