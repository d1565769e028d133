r"""Can a key cross the summary slots? A copy task that only the slots can solve.

The long-context retrieval experiment (``long_context_retrieval.py``) found that a small
summary-token model trained on pass keys retrieves none exactly, where its full-attention
twin gets most. That mixes two questions: whether the slot path can carry a key at all,
and whether a 4-layer model learns to use it from 256-byte prompts on a CPU budget. This
probe asks only the first, on a task stripped to the mechanism:

  block 0 ...      "k" d1 .. dK  filler...      the key: K random digits after a marker
  blocks 1 .. n-2  filler (random letters)
  block n-1        "?" d1 .. dK  "."...         the answer: the key again (scored)

Only the answer's digits are scored (``loss_mask``), with the BD3-LM objective in the
``[x_t ; x_0]`` layout the trainer uses. With ``window_blocks=W`` and n > W + 1 blocks,
the answer block reads block 0 only through its S summary slots, so any accuracy above
chance (0.1 per digit, 10^-K whole keys) is information that crossed the slots. The same
rows train a full-attention twin (``--slots 0``), the upper bound. ``--key_block=any``
puts the key in a random block outside the window at a random offset, so the answer must
also find which bank holds it.

``--curriculum_steps=N`` eases that search in the first N training steps (the held-out
rows always use ``--key_block``): ``--curriculum=switch`` trains on the key in block 0
first, then on any block; ``--curriculum=widen`` lets the key's block range grow from
block 0 to all of them over the N steps.

Scored on held-out rows with the whole answer masked (one forward, argmax): the share of
digits right and of keys right, against training steps. Writes JSON, Markdown and a PNG.

  PYTHONPATH=. python experiments/summary_copy_probe.py --slots 0,1,2,4 --blocks 4 \
      --out experiments/results/summary_copy_probe
  PYTHONPATH=. python experiments/summary_copy_probe.py --quick   # smoke run, to /tmp
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blockdiff_jax import config as config_lib
from blockdiff_jax import masks
from blockdiff_jax import metrics_writer
from blockdiff_jax.diffusion import losses
from blockdiff_jax.diffusion import schedules
from blockdiff_jax.model import build

DIGITS = "0123456789"
FILLER = "abcdefghijlmnoprstuvwxyz"  # No "k": the key's marker is unique in a row.


@dataclasses.dataclass(frozen=True)
class Task:
  """Rows of the copy task.

  Attributes:
    num_blocks: blocks per row (the answer is the last).
    block_size: tokens per block.
    key_len: digits of the key.
    key_block: "first" (block 0, offset 0) or "any" (any block outside the window).
    window: the model's ``window_blocks``: the key sits in blocks the answer block reads
      only through their slots (when the model has slots).
  """

  num_blocks: int
  block_size: int
  key_len: int
  key_block: str
  window: int

  def __post_init__(self):
    if self.key_len + 1 > self.block_size:
      raise ValueError(f"--key_len={self.key_len} needs --block_size > key_len, "
                       f"got {self.block_size}")
    if self.num_blocks < self.window + 2:
      raise ValueError(f"--blocks={self.num_blocks} must be >= window + 2 = "
                       f"{self.window + 2}, or the key is inside the window")
    if self.key_block not in ("first", "any"):
      raise ValueError(f"--key_block must be 'first' or 'any', got {self.key_block!r}")


def last_key_block(task: Task) -> int:
  """The newest block the key may sit in: the answer block's window stays clear of it."""
  return task.num_blocks - task.window - 2


def make_rows(task: Task, ids: dict, rng: np.random.Generator, n: int,
              max_block: int | None = None) -> dict:
  """``n`` rows: ``tokens`` [n, L] int32 and ``loss_mask`` [n, L] (1 on the answer).

  ``max_block`` (with ``key_block="any"``) caps the key's block below the last allowed,
  for a curriculum.
  """
  b, length = task.block_size, task.num_blocks * task.block_size
  tokens = ids["filler"][rng.integers(0, len(ids["filler"]), (n, length))]
  keys = ids["digits"][rng.integers(0, 10, (n, task.key_len))]
  last = last_key_block(task) if max_block is None else min(max_block, last_key_block(task))
  for i in range(n):
    if task.key_block == "first":
      start = 0
    else:
      blk = int(rng.integers(0, last + 1))
      start = blk * b + int(rng.integers(0, b - task.key_len))
    tokens[i, start] = ids["k"]
    tokens[i, start + 1:start + 1 + task.key_len] = keys[i]
  ans = length - b
  tokens[:, ans] = ids["?"]
  tokens[:, ans + 1:ans + 1 + task.key_len] = keys
  tokens[:, ans + 1 + task.key_len:] = ids["."]
  loss_mask = np.zeros((n, length), np.float32)
  loss_mask[:, ans + 1:ans + 1 + task.key_len] = 1.0
  return {"tokens": tokens.astype(np.int32), "loss_mask": loss_mask}


def training_rows_at(task: Task, step: int, curriculum: str, curriculum_steps: int):
  """The task and the cap on the key's block for training step ``step`` (1-based)."""
  if step > curriculum_steps or task.key_block == "first":
    return task, None
  if curriculum == "switch":
    return dataclasses.replace(task, key_block="first"), None
  # widen: blocks 0..k, k growing evenly to the last allowed block over the N steps.
  return task, (step - 1) * (last_key_block(task) + 1) // curriculum_steps


def build_model(args, slots: int, window: int):
  c = config_lib.base_config()
  c.model.d_model, c.model.num_layers = args.d_model, args.layers
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, args.d_model // 4
  c.model.mlp_dim = 3 * args.d_model
  c.model.moe.num_experts = 0
  c.diffusion.block_size = args.block_size
  c.model.summary.num_slots = slots
  c.model.summary.window_blocks = window
  c.data.seq_len = args.blocks * args.block_size
  config_lib.validate(c)
  return build.build_model(c)


def run_one(args, slots: int, seed: int) -> dict:
  """Trains one model; its accuracy curve."""
  model, tok = build_model(args, slots, args.window)
  ids = {"digits": np.array([tok.encode(d)[0] for d in DIGITS]),
         "filler": np.array([tok.encode(f)[0] for f in FILLER]),
         "k": tok.encode("k")[0], "?": tok.encode("?")[0], ".": tok.encode(".")[0]}
  task = Task(args.blocks, args.block_size, args.key_len, args.key_block, args.window)
  params = build.init_params(model, seed)
  apply_fn = build.make_apply(model)
  obj = losses.BlockDiffusionObjective(block_size=args.block_size, mask_id=tok.mask_id,
                                       schedule=schedules.make_schedule("loglinear", 1e-3))
  sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10),
                                             args.steps, args.lr * 0.1)
  opt = optax.adamw(sched, b2=0.98, weight_decay=0.01)
  opt_state = opt.init(params)

  @jax.jit
  def train_step(params, opt_state, batch, rng):
    (loss, _), grads = jax.value_and_grad(
        lambda p: losses.block_diffusion_loss(apply_fn, p, batch, rng, obj), has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  length = args.blocks * args.block_size
  meta = masks.training_meta(length, args.block_size, args.eval_rows)
  test = make_rows(task, ids, np.random.default_rng([seed, 1]), args.eval_rows)
  answer = test["loss_mask"] > 0

  @jax.jit
  def predict(params, tokens):
    # The whole answer masked (t = 1 on its block): one forward of the training layout.
    xt = jnp.where(answer, tok.mask_id, tokens)
    logits, _ = apply_fn(params, jnp.concatenate([xt, tokens], 1), meta,
                         logits_slice=(0, length))
    logits = logits.at[..., tok.mask_id].set(-jnp.inf)
    return jnp.argmax(logits, -1)

  def score(params):
    pred = np.asarray(predict(params, test["tokens"]))
    right = (pred == test["tokens"])[answer].reshape(args.eval_rows, args.key_len)
    return float(right.mean()), float(right.all(1).mean()), right.mean(0).round(3).tolist()

  rng = np.random.default_rng([seed, 0])
  key = jax.random.key(seed)
  curve, losses_seen, t0 = [], [], time.time()
  for step in range(1, args.steps + 1):
    train_task, max_block = training_rows_at(task, step, args.curriculum,
                                             args.curriculum_steps)
    batch = make_rows(train_task, ids, rng, args.batch, max_block)
    key, sub = jax.random.split(key)
    params, opt_state, loss = train_step(params, opt_state, batch, sub)
    losses_seen.append(float(loss))
    if step % args.eval_every == 0 or step == args.steps:
      digit, exact, by_position = score(params)
      rate = step / (time.time() - t0)
      curve.append({"step": step, "loss": float(np.mean(losses_seen[-args.eval_every:])),
                    "digit_acc": digit, "exact": exact, "by_position": by_position})
      print(f"  slots={slots} seed={seed} step {step}/{args.steps}: loss "
            f"{curve[-1]['loss']:.3f} digits {digit:.3f} {by_position} exact {exact:.3f} "
            f"({rate:.1f} steps/s, ETA {(args.steps - step) / rate:.0f} s)", flush=True)
  return {"slots": slots, "seed": seed, "curve": curve,
          "seconds": time.time() - t0, "final": curve[-1]}


def write(results: dict, out: str) -> None:
  # A new folder in --out used to fail here, after the first model had trained.
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(metrics_writer.finite_or_none(results), f, indent=2, allow_nan=False)
  a = results["args"]
  lines = ["# Summary-slot copy probe\n",
           f"{a['blocks']} blocks of {a['block_size']}, window {a['window']}, "
           f"{a['key_len']}-digit key in {'block 0' if a['key_block'] == 'first' else 'any block outside the window'}; "
           f"d {a['d_model']}, {a['layers']} layers, batch {a['batch']}, {a['steps']} steps, "
           f"lr {a['lr']}; "
           + (f"curriculum '{a['curriculum']}' over the first {a['curriculum_steps']} steps; "
              if a.get("curriculum_steps") else "")
           + f"{a['eval_rows']} held-out rows, answer fully masked, one forward. "
           f"Chance: 0.1 of digits, {10.0 ** -a['key_len']:.0e} of keys. "
           f"{results['machine']}.\n",
           f"Command: `{results['command']}`\n",
           "| model | seed | digits right | by position | keys right | best digits (step) | seconds |",
           "|---|---|---|---|---|---|---|"]
  for r in results["runs"]:
    name = "full attention" if r["slots"] == 0 else f"{r['slots']} slots/block"
    best = max(r["curve"], key=lambda p: p["digit_acc"])
    by_pos = " / ".join(f"{v:.2f}" for v in r["final"]["by_position"])
    lines.append(f"| {name} | {r['seed']} | {r['final']['digit_acc']:.3f} | {by_pos} | "
                 f"{r['final']['exact']:.3f} | {best['digit_acc']:.3f} ({best['step']}) | "
                 f"{r['seconds']:.0f} |")
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in results["runs"]:
    name = "full" if r["slots"] == 0 else f"S={r['slots']}"
    ax.plot([p["step"] for p in r["curve"]], [p["digit_acc"] for p in r["curve"]],
            label=f"{name} seed {r['seed']}")
  ax.axhline(0.1, color="gray", ls=":", label="chance")
  if results["args"].get("curriculum_steps"):
    ax.axvline(results["args"]["curriculum_steps"], color="gray", ls="--",
               label="curriculum ends")
  ax.set_xlabel("training step")
  ax.set_ylabel("answer digits right")
  ax.set_ylim(0, 1.02)
  ax.legend(fontsize=7)
  ax.set_title("A key read only through summary slots")
  fig.tight_layout()
  fig.savefig(out + ".png", dpi=120)


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--slots", default="0,1,2,4", help="comma list; 0 = full attention")
  p.add_argument("--seeds", default="0", help="comma list of seeds")
  p.add_argument("--blocks", type=int, default=4, help="blocks per row")
  p.add_argument("--block_size", type=int, default=8)
  p.add_argument("--window", type=int, default=1, help="model.summary.window_blocks")
  p.add_argument("--key_len", type=int, default=4, help="digits in the key")
  p.add_argument("--key_block", default="first", help="'first' or 'any'")
  p.add_argument("--curriculum", default="switch", choices=("switch", "widen"),
                 help="with --key_block=any: block 0 first, or a growing block range")
  p.add_argument("--curriculum_steps", type=int, default=0,
                 help="training steps under the curriculum (0: none)")
  p.add_argument("--d_model", type=int, default=64)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--eval_every", type=int, default=100)
  p.add_argument("--eval_rows", type=int, default=256)
  # Anchored at this file: relative to the working directory, a run started outside the
  # checkout failed its first write, after the first model had trained.
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "results", "summary_copy_probe"))
  p.add_argument("--quick", action="store_true", help="2 models, 60 steps: a smoke run")
  args = p.parse_args(argv)
  if args.quick:
    args.slots, args.steps, args.eval_every, args.eval_rows = "0,2", 60, 30, 32
    if args.out == p.get_default("out"):
      args.out = "/tmp/summary_copy_probe_quick"  # A smoke run, not a result.
  try:
    args.slot_list = [int(s) for s in args.slots.split(",")]
    args.seed_list = [int(s) for s in args.seeds.split(",")]
  except ValueError:
    p.error(f"--slots and --seeds are comma lists of integers, got {args.slots!r}, "
            f"{args.seeds!r}")
  if any(s < 0 for s in args.slot_list):
    p.error(f"--slots must be >= 0, got {args.slots!r}")
  # key_len 0 scored no digit: digit accuracy NaN and every (empty) key "right". A
  # window of 0 passed here and failed in the first slot model's build, after the
  # full-attention twin had trained.
  for name in ("steps", "eval_every", "eval_rows", "batch", "d_model", "layers", "key_len",
               "window"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  if not 0 <= args.curriculum_steps < args.steps:
    p.error(f"--curriculum_steps must be in [0, --steps={args.steps}), got "
            f"{args.curriculum_steps}")
  if args.curriculum_steps and args.key_block != "any":
    p.error("--curriculum_steps needs --key_block=any (the held-out task it eases into)")
  if args.d_model % 4:
    p.error(f"--d_model must be a multiple of 4 (4 heads), got {args.d_model}")
  try:
    Task(args.blocks, args.block_size, args.key_len, args.key_block, args.window)
  except ValueError as e:
    p.error(str(e))
  return args


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)  # Before any training.
  results = {"args": {k: v for k, v in vars(args).items() if not k.endswith("_list")},
             "command": "python experiments/summary_copy_probe.py " + " ".join(
                 sys.argv[1:] if argv is None else argv),
             "machine": f"{jax.devices()[0].device_kind}, jax {jax.__version__}, "
                        f"{os.cpu_count()} CPUs",
             "runs": []}
  for seed in args.seed_list:
    for slots in args.slot_list:
      results["runs"].append(run_one(args, slots, seed))
      write(results, args.out)  # After every model: a long sweep keeps what it has.
  print(open(args.out + ".md").read())
  return results


if __name__ == "__main__":
  main()
