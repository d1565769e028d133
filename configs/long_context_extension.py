r"""RoPE context extension: YaRN-scale a trained model's RoPE, then fine-tune briefly at length.

ChatDLM's recipe (4,096 -> 131,072 tokens) in two steps, as in YaRN:
  1. scale: keep every weight, stretch the rotary frequencies by ``factor`` =
     new length / training length (YaRN: the slow dimensions are interpolated,
     the fast ones kept, attention temperature 0.1 ln(factor) + 1);
  2. fine-tune: a short run (~0.1-1% of the pre-training steps; YaRN used 400
     steps for 16x) at the new length, at a lower learning rate, starting from the
     source run's parameters with a fresh optimizer.

``get_config(arg)`` takes ``"<base config>[,<factor>]"``: the base is the file in
``configs/`` the source run was trained with (its architecture must match the
checkpoint); the factor multiplies its ``data.seq_len`` (default 8). The source
run's workdir is given with ``--config.init_from.workdir``.

Run (after the quickstart run, 128 -> 1,024 tokens on a CPU):
  python -m blockdiff_jax.main --config=configs/long_context_extension.py:quickstart,8 \
      --config.init_from.workdir=runs/quickstart --workdir=runs/quickstart_x8 --mode=train
then passkey / key-value recall against length and depth (and the NELBO):
  python -m blockdiff_jax.main --config=configs/long_context_extension.py:quickstart,8 \
      --config.init_from.workdir=runs/quickstart --workdir=runs/quickstart_x8 --mode=eval
The base must train without RoPE scaling (``configs/chatdlm_7b.py`` describes the
already-extended model, YaRN x32 over 4,096, and is refused): for ChatDLM's 32x,
pre-train from an unscaled copy of it and pass ``:<that config>,32``. Nor may it set
``init.pretrained`` (the smollm2 configs): YaRN's ``original_max_position`` here is the
base config's ``seq_len``, the length a from-scratch base trained at, not a pretrained
model's native context (SmolLM2's is 8,192); scale such a model with
``--config.model.rope_scaling.*`` on its own config instead.

Trainer contract (``init_from``): when ``--workdir`` has no checkpoint yet and
``init_from.workdir`` is set, the trainer builds the model from this config,
restores only the parameters of that workdir's checkpoint (``init_from.step``,
-1 = latest; its EMA parameters when ``init_from.use_ema`` and it kept them),
and starts a fresh TrainState from them: step 0, a new optimizer state and this
config's data order. A checkpoint in ``--workdir`` itself always wins (resume).
The RoPE scaling has no parameters, so the source checkpoint loads unchanged.
``blockdiff_jax.main`` runs this file's ``validate`` on every mode, so each command on the
extended workdir repeats ``--config.init_from.workdir`` (as those above do).
"""

import importlib.util
import math
import os

import ml_collections

from blockdiff_jax.evaluation import eval_config

_CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BASE = "quickstart"
DEFAULT_FACTOR = 8


def _base_config(name: str) -> ml_collections.ConfigDict:
  path = os.path.join(_CONFIG_DIR, f"{name}.py")
  if not os.path.exists(path):
    raise ValueError(f"long_context_extension: base config {name!r} not found at {path}")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _parse(arg: str | None) -> tuple[str, int]:
  """(base config name, factor) of ``"<base>[,<factor>]"``; names a bad part."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  # A third part ("quickstart,8,4") was dropped silently, extending by 8, not 4 or 32.
  if len(parts) > 2:
    raise ValueError(f"long_context_extension: the argument is '<base config>[,<factor>]', "
                     f"got {arg!r}")
  base = parts[0] if parts else DEFAULT_BASE
  try:
    factor = int(parts[1]) if len(parts) > 1 else DEFAULT_FACTOR
  except ValueError:  # int()'s own message named neither the argument nor the factor.
    raise ValueError(f"long_context_extension: factor must be an integer >= 2 (new length / "
                     f"training length), got {parts[1]!r} in {arg!r}") from None
  if factor < 2:
    raise ValueError(f"long_context_extension: factor must be >= 2, got {factor}")
  return base, factor


def _check_not_pretrained(spec: str, where: str) -> None:
  """Refuses ``init.pretrained``: the YaRN scaling would start from the wrong length.

  ``original_max_position`` is set to the base config's ``seq_len`` (what a from-scratch
  base trained at); a pretrained model's native context is longer, and YaRN from the
  shorter one would squeeze frequencies it already handles.
  """
  if spec:
    raise ValueError(f"long_context_extension: {where} sets init.pretrained={spec!r}; "
                     "this recipe scales from the base config's seq_len, not a pretrained "
                     "model's native context, so the base must train from scratch "
                     "(init.pretrained=''); scale a pretrained model with "
                     "--config.model.rope_scaling.* on its own config")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  base, factor = _parse(arg)
  c = _base_config(base)
  _check_not_pretrained(c.init.get("pretrained", ""), f"base config {base!r}")
  if c.model.rope_scaling.type != "none":
    raise ValueError(f"long_context_extension: base config {base!r} already scales RoPE "
                     f"({c.model.rope_scaling.type}); extend the unscaled source model")
  original = c.data.seq_len
  m = c.model

  # Step 1: scale. YaRN; the frequencies match transformers' "yarn" rope_type.
  m.rope_scaling.type = "yarn"  # none | linear | ntk | yarn; YaRN extends best untuned.
  m.rope_scaling.factor = float(factor)  # New length / training length.
  m.rope_scaling.original_max_position = original  # The source run's training length.

  # Step 2: a short fine-tune at the new length.
  c.data.seq_len = original * factor  # Tokens per sequence after extension.
  # Same tokens per step as the source run, fewer (longer) sequences.
  c.data.batch_size = max(1, c.data.batch_size // factor)
  # Micro-batches per step: as many as before that still divide the smaller batch.
  c.train.grad_accum_steps = math.gcd(c.train.grad_accum_steps, c.data.batch_size)
  t = c.train
  # ~1% of the source run, at least 50 steps (YaRN: 400 steps for 16x).
  t.steps = max(min(50, t.steps), t.steps // 100)
  t.learning_rate = t.learning_rate / 10  # Gentle: the model is already trained.
  t.warmup_steps = max(1, t.steps // 10)  # Linear warmup steps.
  t.min_lr_ratio = 1.0  # Constant LR after warmup (YaRN fine-tunes without decay).
  t.log_every = max(1, min(t.log_every, t.steps // 10))  # Steps between metric lines.
  t.eval_every = t.steps  # One validation NELBO evaluation, at the end.
  t.checkpoint_every = t.steps  # One checkpoint, at the end.

  # Where the fine-tune starts: the base config's init_from section (checkpoint/initial.py),
  # required here: --config.init_from.workdir=<source run>.

  # Passkey / key-value evaluation of the extended model: --mode=eval runs it
  # (evaluation/evaluate.py, task long_context; data/long_context.py builds the prompts).
  e = c.eval
  e.tasks = "likelihood,long_context"  # What --mode=eval runs by default here.
  # Prompt lengths: the training length times 1, 2, 4, ... up to twice the extended
  # length, each raised to at least 512 tokens (about the shortest that holds both tasks
  # with a byte tokenizer). A short base at a small factor (tiny,2: 64 -> 128 tokens)
  # has none as long: an empty list would fall back to eval_config's seq_len * 2**i,
  # prompts too short to hold a task, so it evaluates at 512.
  e.long_context_lengths = ",".join(str(n) for n in sorted(
      {max(original * 2**i, 512) for i in range(8) if 2**i <= 2 * factor}))
  e.long_context_depths = "0.0,0.25,0.5,0.75,1.0"  # Needle depths (fraction of the haystack).
  e.long_context_per_cell = 4  # Prompts per (task, length, depth).
  # Key-value pairs per kv_recall prompt: as the source trained on, if it did.
  e.long_context_num_pairs = c.data.get("long_context_num_pairs", 4)
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the extension fields; names the first bad field and value."""
  rs, init = config.model.rope_scaling, config.init_from
  if not init.workdir:
    raise ValueError("init_from.workdir is empty: give the source run's workdir with "
                     "--config.init_from.workdir=PATH")
  if init.step < -1:
    raise ValueError(f"init_from.step must be -1 (latest) or a step >= 0, got {init.step}")
  if rs.type == "none":
    raise ValueError("model.rope_scaling.type is 'none': an extension scales RoPE")
  _check_not_pretrained(config.init.get("pretrained", ""), "the config")
  want = config.data.seq_len / rs.original_max_position
  if not math.isclose(rs.factor, want):
    raise ValueError(f"model.rope_scaling.factor={rs.factor} but data.seq_len / "
                     f"original_max_position = {config.data.seq_len} / "
                     f"{rs.original_max_position} = {want}")
  eval_config.validate(config.eval)
