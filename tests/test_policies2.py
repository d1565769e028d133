"""Hardening of the sampling filters, the ``sample`` config checks and their neighbours.

The filters are checked against a float64 numpy reference of the filtered distribution
written from the definitions (top-k keeps ties with the k-th value; top-p keeps a token
while the mass before it is below p).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_hardening_sampling5 as h5  # Its distill fake model and killed runs.
from blockdiff_jax import config as config_lib
from blockdiff_jax.checkpoint import inference
from blockdiff_jax.sampling import distill
from blockdiff_jax.sampling import policies
from blockdiff_jax.sampling import sample


def _reference_keep(logits, temperature, top_k, top_p):
  """Tokens the filters keep, in float64 from the definitions."""
  lg = np.asarray(logits, np.float64) / temperature
  keep = np.ones(lg.shape, bool)
  if top_k:
    keep &= lg >= np.sort(lg)[::-1][top_k - 1]
  if top_p < 1:
    z = np.where(keep, lg, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    nucleus = np.zeros(lg.shape, bool)
    nucleus[order] = before < top_p
    keep &= nucleus
  return keep


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 0.75),  # Mass 0.5 + 0.25 reaches p exactly: the third token is out.
    (1.0, 0, 0.7),
    (0.5, 2, 1.0),
    (2.0, 3, 0.9),  # A tie at the k-th value: both tied tokens stay.
])
def test_filters_keep_the_reference_set(temperature, top_k, top_p):
  logits = np.log(np.array([0.5, 0.25, 0.125, 0.0625, 0.0625], np.float32))
  got = policies.Sampling(temperature, top_k, top_p).filter_logits(jnp.asarray(logits))
  np.testing.assert_array_equal(np.asarray(got) > -1e29,
                                _reference_keep(logits, temperature, top_k, top_p))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_top_p_of_low_precision_logits_is_the_reference_nucleus(dtype):
  # Before: the softmax and cumsum ran in bf16, whose cumulative mass is off by up to
  # 1/256: top_p=0.9 kept 28816 tokens of a 40001 vocabulary instead of 30001, and the
  # probabilities summed to 0.996.
  vocab = 40001
  logits = np.zeros(vocab, np.float32)
  logits[0] = np.log(0.6 / 0.4 * (vocab - 1))  # p = 0.6, then 40000 tokens of 1e-5.
  low = jnp.asarray(logits, dtype)
  s = policies.Sampling(1.0, 0, 0.9)
  kept = np.asarray(s.filter_logits(low).astype(jnp.float32)) > -1e29
  want = _reference_keep(np.asarray(low.astype(jnp.float32)), 1.0, 0, 0.9)
  assert abs(int(kept.sum()) - int(want.sum())) <= 2, (kept.sum(), want.sum())
  tokens, conf, probs = s.propose(low, jax.random.key(0))
  assert probs.dtype == jnp.float32 and conf.dtype == jnp.float32
  np.testing.assert_allclose(float(jnp.sum(probs)), 1.0, atol=1e-5)
  assert float(conf) == pytest.approx(float(probs[int(tokens)]))


@pytest.mark.parametrize("policy", ["greedy", "AR", "speculative"])
def test_an_unknown_sample_policy_lists_every_choice(policy):
  # Before: the message listed only the block policies, as if ar and isd did not exist.
  c = config_lib.base_config()
  c.sample.policy = policy
  with pytest.raises(ValueError, match=r"sample.policy must be one of \[.*'ar', 'isd'\], "
                     f"got '{policy}'"):
    sample.validate(c)


@pytest.mark.parametrize("policy", ["ar", "threshold", "l2r"])
def test_known_sample_policies_still_validate(policy):
  c = config_lib.base_config()
  c.sample.policy = policy
  sample.validate(c)


@pytest.mark.parametrize("content", [None, "\n  \n", b"<|bos|>caf\xe9\n"],
                         ids=["missing", "blank", "not_utf8"])
def test_a_bad_prompts_file_is_reported_before_the_checkpoint_loads(tmp_path, monkeypatch,
                                                                     content):
  # Before: --mode=sample loaded the checkpoint (minutes for a real model) and only then
  # opened sample.prompts_file.
  monkeypatch.setattr(inference, "load_for_inference",
                      lambda *a, **k: pytest.fail("loaded the checkpoint first"))
  path = tmp_path / "prompts.txt"
  if isinstance(content, str):
    path.write_text(content)
  elif content is not None:
    path.write_bytes(content)
  c = config_lib.base_config()
  c.sample.prompts_file = str(path)
  with pytest.raises((ValueError, OSError), match="prompts|No such file"):
    sample.run(c, str(tmp_path / "run"))


# --- Distillation: the starting weights of a workdir without a checkpoint. ---


@pytest.mark.parametrize("field", ["init.pretrained", "init_from.workdir"])
def test_distill_refuses_to_resume_answers_of_other_starting_weights(monkeypatch, tmp_path,
                                                                     field):
  # Before: with no checkpoint (step None) the settings did not say which weights
  # answered, so a base model's partial file resumed under an instruct model of the
  # same architecture, mixing the two models' answers in one file.
  c = h5._distill_setup(monkeypatch, tmp_path)
  h5.STEP["value"] = None  # The starting weights: no checkpoint in the workdir.
  section, name = field.split(".")
  c[section][name] = str(tmp_path / "base")
  workdir = str(tmp_path / "run")
  h5._killed_run(monkeypatch, c, workdir)
  c[section][name] = str(tmp_path / "instruct")
  calls = h5._counting_decoder(monkeypatch)
  with pytest.raises(ValueError, match=f"other settings [(]weights: \"{field}='.*base'"):
      distill.run(c, workdir)
  assert not calls
  # The same weights resume (2 of 3 batches were there).
  c[section][name] = str(tmp_path / "base")
  with open(distill.run(c, workdir), encoding="utf-8") as f:
    assert len(f.readlines()) == 6
  assert len(calls) == 1


def test_distill_file_of_a_checkpoint_resumes_whatever_the_starting_weights(monkeypatch,
                                                                            tmp_path):
  # With a checkpoint the init fields pick no weights: changing them refuses nothing.
  c = h5._distill_setup(monkeypatch, tmp_path)
  workdir = str(tmp_path / "run")
  h5._killed_run(monkeypatch, c, workdir)
  c.init.pretrained = "something-else"
  calls = h5._counting_decoder(monkeypatch)
  with open(distill.run(c, workdir), encoding="utf-8") as f:
    assert len(f.readlines()) == 6
  assert len(calls) == 1
