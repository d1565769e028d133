r"""What the test suite's XLA:CPU flags buy: compile time of small decoders, and their cost
on a real model's forward.

Most of the suite's time is XLA compiling small programs once each, so
``tests/conftest.py`` sets LLVM to -O0 and swaps XLA:CPU's MLIR fusion emitters for the
elemental ones. This measures, for each flag set, in a fresh process each (XLA reads
XLA_FLAGS once) and interleaved over repeats:

* backend compile seconds of the block decoder and of ISD on the suite's 32-wide tiny
  MoE (a decode of one prompt each: the kind of program most tests compile);
* the bundled SmolLM2-135M's forward over 128 tokens: compile seconds and ms per run
  (what the parity and SmolLM2 decoding tests pay).

  PYTHONPATH=. python experiments/xla_compile_flags.py --repeats=3
  PYTHONPATH=. python experiments/xla_compile_flags.py --quick  # 1 repeat, no SmolLM2

Writes experiments/results/xla_compile_flags{_tag}.{json,md}.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))

# Name -> XLA_FLAGS. The first is the baseline of every ratio.
FLAG_SETS = {
    "XLA defaults": "",
    "LLVM -O0": "--xla_backend_optimization_level=0",
    "LLVM -O0 + elemental emitters (the suite's)":
        "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
}
MEASURES = ("block_decode_compile_s", "isd_decode_compile_s", "smollm2_compile_s",
            "smollm2_forward_ms")


def _compile_seconds(fn):
  """(result, seconds XLA spent in backend compiles while fn ran)."""
  import jax  # pylint: disable=g-import-not-at-top
  total = [0.0]

  def listener(event, duration, **kw):
    del kw
    if event == "/jax/core/compile/backend_compile_duration":
      total[0] += duration
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    out = jax.block_until_ready(fn())
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return out, total[0]


def worker(smollm2: bool) -> dict:
  """One process's measurements at the XLA_FLAGS it was started with."""
  import jax  # pylint: disable=g-import-not-at-top
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import build  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import decoder  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import isd  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import layout  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import policies  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()  # The suite's small decoder model (tests/conftest.py).
  c.model.d_model, c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 32, 2, 1, 16
  c.model.moe.expert_dim = 32
  model, tok = build.build_model(c)
  params = build.init_params(model, 0)
  ids = layout.parse(tok, "<|bos|>sort: 3 1 2<|sep|>").ids
  canvas = layout.generation_canvas([ids], 20, 8, tok.mask_id, 64)
  key = jax.random.key(0)[None]
  out = {}
  for name, shift in (("block_decode", False), ("isd_decode", True)):
    opts = layout.DecodeOptions(block_size=8, mask_id=tok.mask_id, eos_id=tok.eos_id,
                                policy=policies.Threshold(0.05), token_shift=shift)
    run = ((lambda o=opts: isd.decode_isd(model, params, canvas, o, 4, key)) if shift else
           (lambda o=opts: decoder.decode(model, params, canvas, o, key)))
    out[f"{name}_compile_s"] = _compile_seconds(run)[1]
  if smollm2:
    import tempfile  # pylint: disable=g-import-not-at-top
    from blockdiff_jax.interop import causal_lm  # pylint: disable=g-import-not-at-top
    from blockdiff_jax.interop import hf  # pylint: disable=g-import-not-at-top
    from blockdiff_jax.interop import pretrained  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as cache:
      pre = pretrained.load("smollm2", cache, scan_layers=True)
    cfg = hf.transformer_config(pre.model_overrides, scan_layers=True)
    tokens = np.random.default_rng(0).integers(0, 1000, (1, 128)).astype(np.int32)
    out["smollm2_compile_s"] = _compile_seconds(
        lambda: causal_lm.logits(cfg, pre.params, tokens))[1]
    times = []
    for _ in range(3):
      t = time.perf_counter()
      causal_lm.logits(cfg, pre.params, tokens)
      times.append(1e3 * (time.perf_counter() - t))
    out["smollm2_forward_ms"] = float(np.median(times))
  return out


def run_worker(flags: str, smollm2: bool) -> dict:
  """Runs worker() in a fresh process with XLA_FLAGS=flags."""
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(_HERE), env.get("PYTHONPATH", "")])
  cmd = [sys.executable, os.path.abspath(__file__), "--worker"] + (
      [] if smollm2 else ["--quick"])
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise SystemExit(f"worker with XLA_FLAGS={flags!r} failed:\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(samples: dict) -> list[dict]:
  """Median of each measure per flag set, and its ratio to the first flag set."""
  base = next(iter(samples))
  rows = []
  for name, runs in samples.items():
    row = {"flags": name, "xla_flags": FLAG_SETS.get(name, "")}
    for m in MEASURES:
      vals = [r[m] for r in runs if m in r]
      if vals:
        row[m] = float(np.median(vals))
        ref = float(np.median([r[m] for r in samples[base]]))
        row[m + "_ratio"] = row[m] / ref
    rows.append(row)
  return rows


def markdown(rows: list[dict], env: dict, repeats: int) -> str:
  present = [m for m in MEASURES if m in rows[0]]
  head = {"block_decode_compile_s": "block decode compile s",
          "isd_decode_compile_s": "ISD decode compile s",
          "smollm2_compile_s": "SmolLM2 forward compile s",
          "smollm2_forward_ms": "SmolLM2 forward ms"}
  lines = [
      "# XLA:CPU flags of the test suite: compile time against run time", "",
      f"`{env['command']}` on {env['backend']} ({env['cpus']} CPUs, {env['machine']}), "
      f"jax {env['jax']}, load average {env['load_avg'][0]:.1f}, "
      f"{env['total_s'] / 60:.1f} min in all.", "",
      f"Each flag set in its own process, {repeats} interleaved repeat(s); medians, and in "
      f"brackets the ratio to `{rows[0]['flags']}`. Compile s: XLA backend compile time "
      "(jax.monitoring). Decoders: the suite's 32-wide tiny MoE, one prompt, 20 new "
      "tokens, blocks of 8 (ISD: stride 4). SmolLM2: the bundled 135M model, 1 x 128 "
      "tokens, median of 3 runs after the compile.", "",
      "| flags | " + " | ".join(head[m] for m in present) + " |",
      "|---|" + "---|" * len(present)]
  for r in rows:
    cells = [f"{r[m]:.2f} ({r[m + '_ratio']:.2f}x)" if m.endswith("_s") else
             f"{r[m]:.0f} ({r[m + '_ratio']:.2f}x)" for m in present]
    lines.append(f"| {r['flags']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each set")
  ap.add_argument("--quick", action="store_true", help="1 repeat, decoders only")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--tag", default="")
  args = ap.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(smollm2=not args.quick)))
    return
  if args.repeats < 1:
    raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
  sys.path.insert(0, _HERE)
  import decode_window_speed  # pylint: disable=g-import-not-at-top
  t_start = time.time()
  repeats = 1 if args.quick else args.repeats
  samples = {name: [] for name in FLAG_SETS}
  for r in range(repeats):
    for name, flags in FLAG_SETS.items():
      t = time.time()
      samples[name].append(run_worker(flags, smollm2=not args.quick))
      print(f"[repeat {r + 1}/{repeats}] {name}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in samples[name][-1].items())
            + f" ({time.time() - t:.0f} s)", flush=True)
    # After every whole repeat (each flag set with as many samples): a worker that fails
    # late (SystemExit) or a killed run used to lose the finished repeats' minutes.
    rows = summarize(samples)
    env = decode_window_speed.environment("xla_compile_flags.py", t_start)
    decode_window_speed.write_outputs(
        decode_window_speed.quick_stem("xla_compile_flags", args.quick), args.tag,
        {"env": env, "repeats": r + 1, "rows": rows, "samples": samples},
        markdown(rows, env, r + 1))


if __name__ == "__main__":
  main()
