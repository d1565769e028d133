"""Needle-depth curriculum of the long-context training stream (data.long_context_curriculum*)."""

import re

import numpy as np
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax.data import config as data_config
from blockdiff_jax.data import long_context as lc
from blockdiff_jax.data import pipeline
from blockdiff_jax.data import tokenizers

SEQ_LEN, BATCH, BLOCK = 256, 4, 16
# The needle and the blank lines around it, as data/long_context.py lays them out.
NEEDLE = re.compile(r"\n\nThe pass key is (\d+)\. Remember it\. \1 is the pass key\.\n\n")


@pytest.fixture(scope="module")
def tok():
  return tokenizers.ByteTokenizer()


def dataset(tok, split="train", **curriculum):
  cur = lc.DepthCurriculum(**curriculum) if curriculum else lc.DepthCurriculum()
  return pipeline.LongContextDataset(["passkey"], tok, SEQ_LEN, BATCH, BLOCK, split=split,
                                     curriculum=cur)


def in_band(ex, low, high) -> bool:
  """Whether the needle sits at a haystack depth in [low, high], read off the text (byte
  tokens: characters), give or take the rounding to a whole token."""
  m = NEEDLE.search(ex.prompt)
  assert m and m.group(1) == ex.answer, ex.prompt
  before = m.start() - (ex.prompt.index("\n\n") + 2)  # The haystack follows the instruction.
  total = before + ex.prompt.rindex("\n\nWhat is the pass key?") - m.end()
  slack = 0.5 / max(total, 1)
  return low - slack <= before / max(total, 1) <= high + slack


@pytest.mark.parametrize("kind,batch,want", [
    ("switch", 0, (0.2, 0.3)), ("switch", 9, (0.2, 0.3)), ("switch", 10, (0.0, 1.0)),
    ("switch", 500, (0.0, 1.0)), ("widen", 0, (0.2, 0.3)), ("widen", 5, (0.1, 0.65)),
    ("widen", 10, (0.0, 1.0))])
def test_depth_range_by_batch(kind, batch, want):
  cur = lc.DepthCurriculum(steps=10, low=0.2, high=0.3, kind=kind)
  np.testing.assert_allclose(cur.depth_range(batch), want)


@pytest.mark.parametrize("batch,want", [
    (0, (0.2, 0.3)), (3, (0.2, 0.3)), (4, (0.2, 0.3)), (7, (0.1, 0.65)),
    (9, (0.2 / 6, 0.3 + 0.7 * 5 / 6)), (10, (0.0, 1.0))])
def test_widen_after_a_hold(batch, want):
  """hold=4 of 10: the band [0.2, 0.3] for batches 0-3, then it grows over the last 6
  (by a hand count: f = (batch - 4) / 6)."""
  cur = lc.DepthCurriculum(steps=10, low=0.2, high=0.3, kind="widen", hold=4)
  np.testing.assert_allclose(cur.depth_range(batch), want)


@pytest.mark.parametrize("kind,hold,match", [
    ("widen", 11, r"hold must be an integer in \[0, steps=10\]"), ("widen", -1, "hold"),
    ("widen", True, "hold"), ("switch", 3, "applies to 'widen'")])
def test_a_bad_hold_is_refused(kind, hold, match):
  with pytest.raises(ValueError, match=match):
    lc.DepthCurriculum(steps=10, low=0.0, high=0.05, kind=kind, hold=hold)


def test_no_curriculum_is_the_full_range_from_the_first_batch():
  assert lc.DepthCurriculum().depth_range(0) == (0.0, 1.0)


@pytest.mark.parametrize("kind", ["switch", "widen"])
def test_curriculum_batches_put_the_needle_in_the_band_then_the_stream_is_unchanged(tok, kind):
  steps = 3
  cur = dataset(tok, steps=steps, low=0.0, high=0.05, kind=kind)
  plain = dataset(tok)
  for j in range(steps * BATCH):
    ex = cur.long_context_example(j)
    low, high = cur.curriculum.depth_range(j // BATCH)
    assert low <= ex.depth <= high and in_band(ex, low, high), (j, ex.prompt)
  # Without a curriculum the same rows spread over the whole prompt.
  assert not all(in_band(plain.long_context_example(j), 0.0, 0.05)
                 for j in range(steps * BATCH))
  # After the curriculum: exactly the rows of the stream without one.
  for index in (steps, steps + 1, 40):
    got, want = cur.get_batch(index), plain.get_batch(index)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_validation_ignores_the_curriculum(tok):
  cur = dataset(tok, "validation", steps=100, low=0.0, high=0.01)
  plain = dataset(tok, "validation")
  for index in range(3):
    np.testing.assert_array_equal(cur.get_batch(index)["tokens"],
                                  plain.get_batch(index)["tokens"])


def test_build_dataset_reads_the_config_fields(tok):
  config = config_lib.base_config()
  d = config.data
  d.corpus, d.long_context_tasks, d.seq_len = "long_context", "passkey", SEQ_LEN
  d.batch_size, d.sft_block_multiple, config.diffusion.block_size = BATCH, BLOCK, BLOCK
  d.long_context_curriculum_steps, d.long_context_curriculum_depths = 2, "0.9,1"
  data_config.validate(config)
  ds = pipeline.build_dataset(d, tok, "train", SEQ_LEN, BATCH, seed=0)
  assert ds.curriculum == lc.DepthCurriculum(2, 0.9, 1.0, "switch")
  assert all(in_band(ds.long_context_example(j), 0.9, 1.0) for j in range(2 * BATCH))
  assert not all(in_band(ds.long_context_example(j), 0.9, 1.0) for j in range(40, 48))


@pytest.mark.parametrize("field,value,match", [
    ("long_context_curriculum_depths", "0.5,0.1", "long_context_curriculum_depths"),
    ("long_context_curriculum_depths", "0.1", "low,high"),
    ("long_context_curriculum_depths", "0,1.5", "0 <= low <= high <= 1"),
    ("long_context_curriculum", "linear", "switch"),
    ("long_context_curriculum_steps", -1, "long_context_curriculum_steps"),
    ("long_context_curriculum_hold", 3, "long_context_curriculum_hold=3"),
])
def test_validate_names_a_bad_curriculum_field(field, value, match):
  config = config_lib.base_config()
  config.data.corpus, config.data.seq_len = "long_context", SEQ_LEN
  config.data.sft_block_multiple = config.diffusion.block_size
  config.data[field] = value
  with pytest.raises(ValueError, match=match):
    data_config.validate(config)


def test_training_example_refuses_a_depth_range_outside_0_1(tok):
  hay = lc.load_haystack(tok, 512)
  with pytest.raises(ValueError, match="depth_range"):
    lc.training_example(["passkey"], tok, hay, index=0, split="train", seed=0,
                        min_length=120, max_length=200, depth_range=(0.5, 0.2))


def test_experiment_passes_the_curriculum_to_the_source_runs_only(tmp_path, monkeypatch):
  """experiments/long_context_retrieval.py --curriculum_*: the source model's training
  command carries the fields, the extension fine-tune's does not, and the config it
  builds from them validates and yields that curriculum."""
  from conftest import load_experiment  # pylint: disable=g-import-not-at-top
  mod = load_experiment("long_context_retrieval")
  args = mod.parse_args(["--runs", str(tmp_path), "--models", "summary", "--steps", "50",
                         "--ext_steps", "5", "--curriculum_steps", "20",
                         "--curriculum_depths", "0,0.1", "--curriculum", "widen",
                         "--curriculum_hold", "8"])
  commands = []
  monkeypatch.setattr(mod, "_run", lambda cmd, log: commands.append(cmd))
  mod.train(args.runs, args.steps, args.ext_factor, args.ext_steps, args.slots,
            args.model_list, overrides=["data.long_context_score_prompt=False"],
            source_overrides=mod.curriculum_overrides(args))
  source, extension = commands
  fields = [a for a in source if "curriculum" in a]
  assert fields == ["--config.data.long_context_curriculum_steps=20",
                    "--config.data.long_context_curriculum_depths=0,0.1",
                    "--config.data.long_context_curriculum=widen",
                    "--config.data.long_context_curriculum_hold=8"]
  assert not [a for a in extension if "curriculum" in a]
  assert all("--config.data.long_context_score_prompt=False" in c for c in commands)
  # The source config with those fields (as absl would set them) is the curriculum asked for.
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  d = config.data
  d.corpus, d.seq_len, d.sft_block_multiple = "long_context", SEQ_LEN, BLOCK
  config.diffusion.block_size, d.long_context_tasks = BLOCK, "passkey"
  for a in fields:
    key, value = a.removeprefix("--config.data.").split("=")
    d[key] = type(d[key])(value)
  data_config.validate(config)
  assert pipeline.build_dataset(d, tokenizers.ByteTokenizer(), "train", SEQ_LEN, BATCH,
                                seed=0).curriculum == lc.DepthCurriculum(20, 0.0, 0.1, "widen", 8)


@pytest.mark.parametrize("argv,match", [
    (["--steps", "10", "--curriculum_steps", "10"], "--curriculum_steps=10"),
    (["--curriculum_steps", "5", "--curriculum_depths", "0.3,0.2"], "--curriculum_depths"),
    (["--curriculum_steps", "5", "--curriculum_depths", "x"], "low,high"),
])
def test_experiment_refuses_a_bad_curriculum_before_training(argv, match, capsys):
  from conftest import load_experiment  # pylint: disable=g-import-not-at-top
  mod = load_experiment("long_context_retrieval")
  with pytest.raises(SystemExit):
    mod.parse_args(argv)
  assert match in capsys.readouterr().err


def test_experiment_states_the_curriculum_each_run_was_trained_with(tmp_path):
  """The results say what each run's saved config holds, not what the flags ask for (a
  run already trained is not retrained with them)."""
  import json  # pylint: disable=g-import-not-at-top
  from conftest import load_experiment  # pylint: disable=g-import-not-at-top
  mod = load_experiment("long_context_retrieval")
  for name, steps in (("full", 0), ("summary", 30), ("fixed", 40)):
    c = config_lib.base_config()
    c.data.long_context_curriculum_steps, c.data.long_context_curriculum = steps, "widen"
    c.train.steps = 40 if name == "fixed" else 100  # "fixed": the band for every step.
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(c.to_dict()))
  old = config_lib.base_config().to_dict()
  del old["data"]["long_context_curriculum_steps"]  # A run from before the fields.
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "config.json").write_text(json.dumps(old))
  curricula = {m: mod.trained_curriculum(str(tmp_path / m))
               for m in ("full", "summary", "old", "fixed")}
  assert curricula == {
      "full": None, "old": None,
      "summary": {"steps": 30, "depths": "0,0.05", "kind": "widen", "hold": 0,
                  "run_steps": 100},
      "fixed": {"steps": 40, "depths": "0,0.05", "kind": "widen", "hold": 0, "run_steps": 40}}
  args = mod.parse_args(["--models", "full,summary", "--curriculum_steps", "5"])
  row = {"variant": "summary", "task": "passkey", "length": 256, "depth": 0.5,
         "answer": "12345", "completion": "12345", "hit": True, "seconds": 0.1}
  result = {"device": "cpu", "jax": "x", "command": "c", "seconds": 1.0, "train_seconds": {},
            "settings": vars(args), "curricula": curricula, "rows": [row],
            "variants": [{"name": "summary"}], "errors": {}}
  out = str(tmp_path / "res")
  mod.write(result, out)
  text = open(out + ".md", encoding="utf-8").read()
  assert "`summary` was trained with needles at depths 0,0.05 for its first 30 steps" in text
  # A run that never left the band is not said to have gone on to [0, 1].
  assert "`fixed` was trained with needles at depths 0,0.05 for all its 40 steps" in text
  # Results from before run_steps was recorded read as before.
  del curricula["summary"]["run_steps"]
  mod.write({**result, "curricula": curricula}, out)
  text = open(out + ".md", encoding="utf-8").read()
  assert "`summary` was trained with needles at depths 0,0.05 for its first 30 steps" in text
  assert "`full` was trained" not in text
