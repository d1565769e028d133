"""Configs a hostile user gets through today must be refused before compiling, naming the field."""

import json
import os

import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax.train import step as step_lib
from blockdiff_jax.train import trainer
from conftest import load_config_file


def _set(c, field, value):
  section, _, name = field.rpartition(".")
  node = c
  for part in filter(None, section.split(".")):  # "seed" has no section.
    node = node[part]
  node[name] = value


BAD = [
    ("model.moe.expert_dim", -5), ("model.moe.expert_dim", 0), ("model.moe.top_k", 0),
    ("model.moe.num_experts", -1), ("model.moe.shared_expert_dim", -8),
    ("model.moe.tile_size", 0), ("model.d_model", 0), ("model.num_layers", -1),
    ("model.head_dim", -16), ("model.mlp_dim", 0), ("model.vocab_size", -3),
    ("train.warmup_steps", -1), ("train.eval_every", -10), ("train.grad_clip", -1.0),
    ("train.weight_decay", -0.1), ("train.weight_decay", float("nan")),
    ("train.min_lr_ratio", -0.5), ("train.b2", 1.0), ("train.eval_batches", 0),
]


@pytest.mark.parametrize("field, value", BAD, ids=[f"{f}={v}" for f, v in BAD])
def test_validate_refuses_and_names_the_field(field, value):
  c = config_lib.base_config()
  _set(c, field, value)
  with pytest.raises(ValueError, match=field.replace(".", r"\.") + r" must be"):
    config_lib.validate(c)


@pytest.mark.parametrize("field, value", [("train.warmup_steps", 0), ("train.eval_every", 0),
                                          ("train.grad_clip", 0.0),
                                          ("train.weight_decay", 0.0),
                                          ("model.moe.num_experts", 0)])
def test_zero_still_means_off(field, value):
  c = load_config_file("tiny")
  _set(c, field, value)
  config_lib.validate(c)


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if the trainer gets as far as building its jitted step."""
  def refuse(*args, **kwargs):
    raise AssertionError("reached compilation")
  monkeypatch.setattr(step_lib, "make_sharded_train", refuse)


def test_trainer_refuses_expert_dim_before_touching_the_workdir(tmp_path, no_compile):
  c = load_config_file("tiny")
  c.model.moe.expert_dim = -5
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"model\.moe\.expert_dim must be >= 1, got -5"):
    trainer.run(c, workdir)
  assert not os.path.exists(workdir)


def test_vocab_smaller_than_the_tokenizers_is_refused_before_compiling(tmp_path, no_compile):
  c = load_config_file("tiny")
  c.model.vocab_size = 100  # The byte tokenizer has 256 bytes plus specials.
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match=r"model\.vocab_size=100 is smaller than the "
                                       r"tokenizer's \d+ tokens"):
    trainer.run(c, workdir)
  assert not os.path.exists(os.path.join(workdir, "config.json"))


# Fields a training run reads that were accepted and failed later (or trained on NaN).
BAD_RUN_FIELDS = [
    ("data.seq_len", 0), ("data.seq_len", -8), ("data.corpus", "nosuch"),
    ("data.tokenizer", "nosuch"), ("data.tokenizer", ""),
    ("data.validation_fraction", -0.1), ("data.validation_fraction", 1.5),
    ("data.validation_fraction", float("nan")), ("data.max_bytes", -1),
    ("data.bpe_vocab_size", 10), ("data.synthetic_tasks", "sort,bogus"),
    ("data.synthetic_digits", 0), ("data.sft_max_examples", -1),
    ("data.sft_block_multiple", 0), ("data.long_context_num_pairs", 0),
    ("data.long_context_min_length", -1),
    ("train.learning_rate", float("nan")), ("train.learning_rate", float("inf")),
    ("train.min_lr_ratio", 1.5), ("train.min_lr_ratio", float("nan")),
    ("model.rope_theta", 0.0), ("model.rope_theta", -1.0), ("model.rope_theta", float("nan")),
    ("model.norm_eps", 0.0), ("model.norm_eps", -1e-6),
    ("sample.kv_chunk", 0), ("sample.kv_rank", 0), ("sample.kv_rank", -3),
    ("sample.kv_window", -1), ("sample.kv_sinks", -1), ("sample.kv_form", "bogus"),
    ("sample.max_new_tokens", 0), ("sample.max_len", -1), ("sample.isd_stride", 0),
    ("sample.temperature", -1.0), ("sample.top_p", 0.0), ("sample.policy_value", -1.0),
]


@pytest.mark.parametrize("field, value", BAD_RUN_FIELDS,
                         ids=[f"{f}={v!r}" for f, v in BAD_RUN_FIELDS])
def test_validate_refuses_bad_run_fields_naming_them(field, value):
  c = load_config_file("tiny")
  _set(c, field, value)
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    config_lib.validate(c)


@pytest.mark.parametrize("field, value", [
    ("data.max_bytes", 0), ("data.sft_max_examples", 0), ("data.long_context_min_length", 0),
    ("data.validation_fraction", 0.0), ("data.validation_fraction", 1.0),
    ("data.corpus", "synthetic"), ("data.corpus", "long_context"),
    ("train.min_lr_ratio", 0.0), ("train.min_lr_ratio", 1.0), ("sample.max_len", 0)])
def test_zero_and_the_range_ends_are_accepted(field, value):
  c = load_config_file("tiny")
  _set(c, field, value)
  if (field, value) == ("data.validation_fraction", 0.0):
    c.train.eval_every = 0  # No validation split to evaluate on (next test).
  config_lib.validate(c)


@pytest.mark.parametrize("corpus", ["stdlib", "files", "long_context"])
def test_evaluating_on_an_empty_validation_split_is_refused(corpus):
  c = load_config_file("tiny")
  c.data.corpus, c.data.validation_fraction, c.train.eval_every = corpus, 0.0, 10
  if corpus == "files":
    c.data.paths = "/tmp/x.txt"
  with pytest.raises(ValueError, match=r"train\.eval_every=10 .*data\.validation_fraction=0"):
    config_lib.validate(c)
  c.train.eval_every = 0
  config_lib.validate(c)


def test_sft_with_a_bpe_tokenizer_is_refused_naming_both_fields():
  c = load_config_file("tiny")
  c.data.corpus, c.data.tokenizer = "sft", "bpe"
  with pytest.raises(ValueError, match=r"data\.tokenizer='bpe'.*data\.corpus='sft'"):
    config_lib.validate(c)
  c.data.corpus = "stdlib"  # BPE trains on the stdlib corpus: fine.
  config_lib.validate(c)


def _aligned(corpus, multiple, block_size=32, seq_len=128, objective="bd3", anchors=0):
  c = load_config_file("tiny")
  c.data.corpus, c.data.seq_len, c.data.sft_block_multiple = corpus, seq_len, multiple
  c.diffusion.block_size = block_size
  if objective == "introspective":
    c.diffusion.token_shift, c.diffusion.objective = True, "introspective"
    c.diffusion.isd_stride, c.diffusion.isd_anchors = 4, anchors
  return c


@pytest.mark.parametrize("corpus", ["sft", "long_context"])
def test_examples_may_not_start_mid_block(corpus):
  with pytest.raises(ValueError, match=r"data\.sft_block_multiple=16 must be a multiple of "
                                       r"diffusion\.block_size=32"):
    config_lib.validate(_aligned(corpus, 16))
  config_lib.validate(_aligned(corpus, 32))
  config_lib.validate(_aligned(corpus, 64))


def test_introspective_examples_align_to_the_isd_stride_not_the_block_size():
  # I-DLM's noisy blocks are isd_stride long; diffusion.block_size is unused there.
  config_lib.validate(_aligned("sft", 8, objective="introspective"))
  with pytest.raises(ValueError, match=r"sft_block_multiple=2 must be a multiple of "
                                       r"diffusion\.isd_stride=4"):
    config_lib.validate(_aligned("sft", 2, objective="introspective"))
  # Anchored noisy blocks start at any scored position: no alignment to keep.
  config_lib.validate(_aligned("sft", 2, objective="introspective", anchors=4))


def test_plan_refuses_a_zero_kv_chunk_naming_it(tmp_path):
  from blockdiff_jax.train import plan  # pylint: disable=g-import-not-at-top
  c = load_config_file("tiny")
  c.model.vocab_size = 264
  c.sample.kv_chunk = 0  # Divided by in the hierarchical cache size (kv_cache="full" too).
  with pytest.raises(ValueError, match=r"sample\.kv_chunk"):
    plan.run(c, str(tmp_path / "plan"))
  c.sample.kv_chunk, c.sample.kv_rank = 256, -6
  with pytest.raises(ValueError, match=r"sample\.kv_rank must be in \[1, chunk=256\], got -6"):
    plan.run(c, str(tmp_path / "plan"))
  assert not os.path.exists(tmp_path / "plan")


def _tiny_run_config(steps=2):
  c = load_config_file("tiny")
  c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 32, 1, 2, 1
  c.model.head_dim, c.model.mlp_dim, c.model.moe.num_experts = 16, 32, 0
  c.data.seq_len, c.data.batch_size, c.data.max_bytes = 32, 2, 20_000
  c.train.steps, c.train.log_every, c.train.eval_every = steps, 1, 0
  c.train.checkpoint_every, c.train.async_checkpoints, c.train.tensorboard = 1, False, False
  return c


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A 2-step run with checkpoints at steps 1 and 2."""
  workdir = str(tmp_path_factory.mktemp("resume") / "run")
  trainer.run(_tiny_run_config(), workdir)
  return workdir


@pytest.fixture
def run_copy(trained_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  copy = str(tmp_path / "run")
  shutil.copytree(trained_run, copy)
  return copy


@pytest.mark.parametrize("field, value", [("data.corpus", "synthetic"),
                                          ("data.batch_size", 4), ("data.max_bytes", 30_000),
                                          ("seed", 1), ("diffusion.block_size", 16),
                                          ("train.ema_decay", 0.9)])
def test_resume_that_changes_the_data_or_objective_is_refused(run_copy, no_compile, field,
                                                              value):
  before = open(os.path.join(run_copy, "config.json")).read()
  listing = sorted(os.listdir(run_copy))
  c = _tiny_run_config(steps=4)
  _set(c, field, value)
  with pytest.raises(ValueError, match=r"cannot resume .*checkpoint step 2.*\n  " +
                     field.replace(".", r"\.") + ": "):
    trainer.run(c, run_copy)
  assert open(os.path.join(run_copy, "config.json")).read() == before
  assert sorted(os.listdir(run_copy)) == listing


def test_resume_with_a_longer_schedule_keeps_the_previous_config(run_copy, no_compile,
                                                                 capsys):
  c = _tiny_run_config(steps=4)
  c.train.checkpoint_every, c.train.log_every, c.train.keep_checkpoints = 2, 2, 5
  c.train.learning_rate, c.sample.max_new_tokens, c.model.remat = 1e-3, 8, True
  with pytest.raises(AssertionError, match="reached compilation"):
    trainer.run(c, run_copy)
  assert "train.steps: 2 -> 4" in capsys.readouterr().out
  # It failed before its checkpoint restored: the run's own config is put back, and no
  # config.step2.json claims a change that never trained (tests/test_train5.py checks
  # that a resume that restores records it).
  saved = json.load(open(os.path.join(run_copy, "config.json")))
  assert (saved["train"]["steps"], saved["train"]["learning_rate"]) == (2, 3e-3)
  assert not [n for n in os.listdir(run_copy) if n.startswith("config.step")]


def test_resume_with_the_same_config_keeps_no_copy(run_copy, no_compile):
  with pytest.raises(AssertionError, match="reached compilation"):
    trainer.run(_tiny_run_config(), run_copy)
  assert not [n for n in os.listdir(run_copy) if n.startswith("config.step")]


@pytest.mark.parametrize("field, value, message", [
    ("diffusion.eps", -1.0, r"diffusion\.eps must be in \(0, 1\), got -1\.0"),
    ("diffusion.eps", 0.0, r"diffusion\.eps must be in \(0, 1\), got 0\.0"),
    ("diffusion.eps", float("nan"), r"diffusion\.eps must be in \(0, 1\), got nan"),
    ("diffusion.clean_weight", float("nan"), r"diffusion\.clean_weight must be >= 0, got nan"),
])
def test_noise_floor_and_clean_weight_are_refused_naming_them(field, value, message):
  # eps < 0 trained silently: the 1/t weight was unbounded near t = 0.
  c = load_config_file("tiny")
  c.diffusion.token_shift, c.diffusion.objective = True, "introspective"
  _set(c, field, value)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


@pytest.mark.parametrize("field, value, message", [
    ("mesh.plan_devices", -1, r"mesh\.plan_devices must be an integer >= 1 .*got -1"),
    ("mesh.plan_memory_gib", -1.0, r"mesh\.plan_memory_gib must be > 0, got -1\.0"),
    ("mesh.plan_memory_gib", 0.0, r"mesh\.plan_memory_gib must be > 0, got 0\.0"),
])
def test_plan_refuses_a_negative_device_count_or_memory(tmp_path, field, value, message):
  # Before: "(-1 devices) ... fits in 80.0 GiB" and "does NOT fit in -1.0 GiB", exit 0.
  from blockdiff_jax.model import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import plan  # pylint: disable=g-import-not-at-top
  c = load_config_file("tiny")
  c.model.vocab_size = 264
  c.mesh = mesh_lib.default_mesh_config()
  _set(c, field, value)
  with pytest.raises(ValueError, match=message):
    plan.run(c, str(tmp_path / "plan"))
  assert not os.path.exists(tmp_path / "plan")


def test_ar_objective_needs_no_block_multiple_but_blocks_and_slots_do():
  c = config_lib.base_config()
  c.data.seq_len, c.diffusion.block_size = 10, 8
  with pytest.raises(ValueError, match=r"data\.seq_len=10 is not a multiple"):
    config_lib.validate(c)
  c.diffusion.objective, c.diffusion.token_shift = "ar", True
  config_lib.validate(c)  # The AR loss never reads block_size.
  c.model.summary.num_slots = 2  # Summary slots sit one bank per block.
  with pytest.raises(ValueError, match=r"data\.seq_len=10 is not a multiple"):
    config_lib.validate(c)
