"""Collective traffic of one MoE layer (forward + backward) per expert-parallel mode.

Compiles, without running, the gradient of one MoE layer at a config's shapes
on N simulated CPU devices and reads the collectives from the optimized HLO.
It reports, for each mode, the bytes one device receives for each collective
kind, and the total as a ratio to ``gather`` from the same run:

* ``all_to_all``: tokens travel to their experts' shards (``model/expert_parallel.py``),
  dropless;
* ``all_to_all`` with ``--capacity`` (GShard buffers);
* ``gather``: GSPMD partitions the local sort-based dispatch (it all-gathers the
  expert weights, and, as the HLO shows, all-reduces the token-copy buffers).

Then it times each mode at a small shape on the same simulated devices. Those
devices share this machine's cores, so the times show per-mode overhead, not
interconnect speed.

  python experiments/expert_parallel_comm.py --config=configs/chatdlm_7b.py --devices=8
"""

import argparse
import datetime
import json
import os
import pathlib
import re
import statistics
import sys
import time

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
               "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/chatdlm_7b.py", help="config file (MoE shapes)")
  p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (= expert shards)")
  p.add_argument("--seqs_per_device", type=int, default=1, help="sequences per device")
  p.add_argument("--capacity", type=float, default=1.25, help="capacity factor of the capped mode")
  p.add_argument("--time_tokens", type=int, default=512, help="tokens per device when timing")
  p.add_argument("--time_dim", type=int, default=128, help="d_model when timing")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--out", default=str(RESULTS_DIR / "expert_parallel_comm"),
                 help="output path prefix (.json and .md are appended)")
  args = p.parse_args(argv)
  # Refused before minutes of compiling: one device has no collectives (every ratio 0/0),
  # and no timed iteration leaves statistics.median([]) to fail at the end.
  for flag, least in (("devices", 2), ("seqs_per_device", 1), ("time_tokens", 1),
                      ("time_dim", 1), ("iters", 1)):
    if getattr(args, flag) < least:
      raise ValueError(f"--{flag}={getattr(args, flag)} must be >= {least}")
  if not args.capacity > 0:
    raise ValueError(f"--capacity={args.capacity} must be > 0")
  return args


def _group_size(line: str, default: int) -> int:
  """Devices per replica group of a collective (three HLO spellings)."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:  # mesh['axis_0'=8,'axis_1'=2] {'axis_0'}: the product of the named axes.
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    n = 1
    for axis in re.findall(r"'(\w+)'", m.group(2)):
      n *= int(sizes[axis])
    return n
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  return len(m.group(1).split(",")) if m and m.group(1) else default


def collective_bytes(hlo: str, num_devices: int) -> dict[str, float]:
  """Bytes one device receives per collective kind, from optimized HLO text.

  Result sizes come from each op's shape; received bytes assume ring/direct
  algorithms: all-gather and all-to-all receive (n-1)/n of their result,
  reduce-scatter (n-1) result-sized chunks, all-reduce 2(n-1)/n of its result.
  """
  out = {k: 0.0 for k in KINDS}
  for line in hlo.splitlines():
    m = re.search(r"=\s*(.+?)\s+(" + "|".join(KINDS) + r")(-start)?\(", line)
    if not m or "-done" in line.split("=")[0]:
      continue
    shape, kind = m.group(1), m.group(2)
    arrays = re.findall(r"(\w+)\[([\d,]*)\]", shape)
    if m.group(3) and shape.startswith("("):
      # Async start: (operand..., result[, context...]); count the result. A
      # collective-permute-start ends in two u32[] scalars (its sync context): taking the
      # last array counted 4 bytes for the whole permute.
      arrays = [a for a in arrays if a != ("u32", "")][-1:]
    size = 0
    for dtype, dims in arrays:
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      size += n * DTYPE_BYTES.get(dtype, 4)
    g = _group_size(line, num_devices)
    if g <= 1:
      continue
    factor = {"all-gather": (g - 1) / g, "all-to-all": (g - 1) / g, "reduce-scatter": g - 1,
              "all-reduce": 2 * (g - 1) / g, "collective-permute": 1.0}[kind]
    out[kind] += size * factor
  return out


def main(argv=None):
  args = _parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from blockdiff_jax import masks  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import moe  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import sharding  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("cfg", args.config)
  cfg_mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg_mod)
  config = cfg_mod.get_config()
  m = config.model
  n_dev = args.devices
  mesh_config = mesh_lib.default_mesh_config()
  mesh_config.update(data=1, fsdp=1, expert=n_dev, tensor=1)
  mesh = mesh_lib.make_mesh(mesh_config)
  rules = mesh_lib.logical_rules(mesh_config)
  dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
  modes = {"gather": ("gather", 0.0), "all_to_all (dropless)": ("all_to_all", 0.0),
           f"all_to_all (capacity {args.capacity:g})": ("all_to_all", args.capacity)}

  def layer_grad(mode, capacity, d, tokens):
    cfg = moe.MoEConfig(num_experts=m.moe.num_experts, top_k=m.moe.top_k,
                        expert_dim=m.moe.expert_dim, impl="ragged_dot", expert_parallel=mode,
                        capacity_factor=capacity, block_min_experts=m.moe.top_k)
    layer = moe.MoEFeedForward(cfg, dtype=dtype)
    b, t = n_dev * args.seqs_per_device, tokens
    x = jax.ShapeDtypeStruct((b, t, d), dtype)
    meta = masks.make_meta(jnp.broadcast_to(jnp.arange(t), (b, t)), 16, masks.CLEAN)
    boxed = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros(x.shape, dtype),
                                              meta))["params"]
    p_sharding = mesh_lib.param_shardings(boxed, mesh, rules)
    x_sharding = jax.sharding.NamedSharding(mesh, sharding.fit_spec(
        mesh_lib.batch_spec(rules), x.shape, mesh))

    def loss(params, x):
      y, stats = layer.apply({"params": params}, x, meta)
      return jnp.sum(y.astype(jnp.float32) ** 2) + stats["load_balance_loss"]

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=(p_sharding, x_sharding))
    return fn, boxed, x, p_sharding, x_sharding

  seq_tokens = 2 * config.data.seq_len  # The BD3-LM pass runs [x_t ; x_0].
  rows = {}
  for name, (mode, capacity) in modes.items():
    fn, boxed, x, _, _ = layer_grad(mode, capacity, m.d_model, seq_tokens)
    abstract = jax.tree.map(lambda b: jax.ShapeDtypeStruct(b.value.shape, b.value.dtype),
                            boxed, is_leaf=lambda b: hasattr(b, "names"))
    t0 = time.time()
    with mesh_lib.mesh_context(mesh, rules):
      hlo = fn.lower(abstract, x).compile().as_text()
    traffic = collective_bytes(hlo, n_dev)
    rows[name] = {"bytes": traffic, "total": sum(traffic.values()),
                  "compile_s": time.time() - t0}
    print(f"{name:<28} {sum(traffic.values()) / 2**20:10.1f} MiB received per device "
          f"(compiled in {time.time() - t0:.0f}s)", flush=True)

  base = rows["gather"]["total"]
  for r in rows.values():  # None (null in the JSON) where gather moves nothing.
    r["ratio_vs_gather"] = r["total"] / base if base else None

  # Wall time at a small shape (simulated devices share the host's cores).
  timing = {}
  for name, (mode, capacity) in modes.items():
    fn, boxed, x, p_sharding, x_sharding = layer_grad(mode, capacity, args.time_dim,
                                                      args.time_tokens)
    params = jax.device_put(jax.tree.map(
        lambda b: jax.random.normal(jax.random.key(1), b.value.shape, jnp.float32) * 0.05,
        boxed, is_leaf=lambda b: hasattr(b, "names")), p_sharding)
    xv = jax.device_put(jax.random.normal(jax.random.key(2), x.shape, dtype), x_sharding)
    with mesh_lib.mesh_context(mesh, rules):
      jax.block_until_ready(fn(params, xv))
      times = []
      for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, xv))
        times.append(time.perf_counter() - t0)
    timing[name] = statistics.median(times)
  for name in rows:
    rows[name]["small_shape_time_s"] = timing[name]
    rows[name]["time_ratio_vs_gather"] = timing[name] / timing["gather"]

  result = {
      "date": datetime.date.today().isoformat(), "machine": f"{n_dev} simulated CPU devices "
      f"on {os.cpu_count()} cores", "jax": jax.__version__,
      "command": " ".join(["python"] + sys.argv),
      "shapes": {"config": args.config, "tokens_per_device": seq_tokens * args.seqs_per_device,
                 "d_model": m.d_model, "experts": m.moe.num_experts, "top_k": m.moe.top_k,
                 "expert_dim": m.moe.expert_dim, "dtype": m.dtype,
                 "mesh": dict(mesh.shape)},
      "timing_shapes": {"tokens_per_device": args.time_tokens, "d_model": args.time_dim,
                        "iters": args.iters},
      "modes": rows}
  write(result, args.out)
  return result


def markdown(result: dict) -> str:
  """The table of ``result``: every collective kind the total sums, and the ratios."""
  mib = lambda b: f"{b / 2**20:.1f}"
  ratio = lambda x: "-" if x is None else f"{x:.2f}x"
  timing = result["timing_shapes"]
  lines = [f"# Expert-parallel collective traffic, one MoE layer fwd+bwd ({result['date']})", "",
           f"{result['machine']}, jax {result.get('jax', '?')}; `{result['command']}`", "",
           f"Shapes: {result['shapes']}", "",
           "| mode | " + " | ".join(f"{k} MiB" for k in KINDS) + " | total MiB | vs gather "
           "| small-shape time | vs gather |", "|---|" + "---|" * (len(KINDS) + 4)]
  for name, r in result["modes"].items():
    lines.append(f"| {name} | " + " | ".join(mib(r["bytes"][k]) for k in KINDS) +
                 f" | {mib(r['total'])} | {ratio(r['ratio_vs_gather'])} | "
                 f"{1e3 * r['small_shape_time_s']:.1f} ms | "
                 f"{ratio(r['time_ratio_vs_gather'])} |")
  lines += ["", "Received bytes per device, from the compiled HLO's collectives (XLA:CPU "
            "moves bf16 data as f32, so a GPU moves half of the data bytes). Small-shape "
            f"times: {timing['tokens_per_device']} tokens/device, d_model {timing['d_model']}, "
            f"median of {timing.get('iters', '?')} warm runs; simulated devices share the "
            "host cores."]
  return "\n".join(lines) + "\n"


def write(result: dict, out: str) -> None:
  """``out``.json (strict) and ``out``.md."""
  from blockdiff_jax import metrics_writer  # pylint: disable=g-import-not-at-top
  table = markdown(result)
  print(table)
  # Appended, not Path.with_suffix: that replaced a dotted tail, so --out=r/cap1.25 wrote
  # r/cap1.json and a run at --out=r/cap1.5 overwrote it.
  json_path, md_path = pathlib.Path(f"{out}.json"), pathlib.Path(f"{out}.md")
  json_path.parent.mkdir(parents=True, exist_ok=True)
  json_path.write_text(json.dumps(metrics_writer.finite_or_none(result), indent=2,
                                  allow_nan=False))
  md_path.write_text(table)
  print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
  main()
