"""Load test of the OpenAI-compatible server: throughput and latency against concurrency.

Starts the server in-process on 127.0.0.1 (a free port) over a tiny random model (or
``--workdir``'s checkpoint with ``--config``), warms the decoders up (compile time is
reported, not timed), then for each decoder (AR and block diffusion, same model, same
run) and each concurrency level sends a bounded number of streaming requests
(``--requests`` per level) from that many client threads. Measured per level:
generated tokens/s (completion tokens of all requests / wall time of the level), p50 /
p99 request latency and p50 time to first content chunk (for block diffusion the first
committed block; for AR the first token). The engine batches continuously: a request
joins the running batch at the next forward.

  python experiments/serve_load.py --quick                 # tiny model, CPU, ~1 minute
  python experiments/serve_load.py --concurrency=1,4,16,64 --requests=128

Writes experiments/results/serve_load.{json,md,png} ($TMPDIR/serve_load_quick.* with --quick).
"""

import argparse
import asyncio
import concurrent.futures
import datetime
import importlib.util
import json
import pathlib
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import openai  # pylint: disable=g-import-not-at-top
from aiohttp import web

from blockdiff_jax import config as config_lib
from blockdiff_jax.model import build
from blockdiff_jax.serving import engine as engine_lib
from blockdiff_jax.serving import protocol
from blockdiff_jax.serving import server as server_lib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PROMPTS = ["<|bos|>sort: 3 1 2<|sep|>", "<|bos|>add: 12+34<|sep|>", "<|bos|>a",
           "<|bos|>sort: 9 8 7 6 5 4<|sep|>", "<|bos|>hello world", "<|bos|>xyz"]


def _model(args):
  if args.workdir:
    from blockdiff_jax.checkpoint import inference  # pylint: disable=g-import-not-at-top
    spec = importlib.util.spec_from_file_location("cfg", args.config)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config, model, tok, params = inference.load_for_inference(args.workdir, mod.get_config())
    max_len = args.max_len or config.data.seq_len
    from blockdiff_jax.sampling import sample  # pylint: disable=g-import-not-at-top
    PROMPTS[:] = sample.read_prompts(config.sample)  # The config's own (chat) prompts.
    return (model, tok, params, config.diffusion.block_size, max_len,
            bool(config.diffusion.get("token_shift", False)))
  c = config_lib.base_config()
  c.model.d_model, c.model.num_heads, c.model.num_kv_heads = 32, 2, 1
  c.model.head_dim, c.model.moe.expert_dim = 16, 32
  model, tok = build.build_model(c)
  return (model, tok, build.init_params(model, 0), c.diffusion.block_size,
          args.max_len or c.data.seq_len, False)


class _Running:
  """The server on 127.0.0.1:<free port> in a background event loop."""

  def __init__(self, server):
    self.loop = asyncio.new_event_loop()
    ready = threading.Event()

    def main():
      asyncio.set_event_loop(self.loop)
      self.runner = web.AppRunner(server.app(), handler_cancellation=True)
      self.loop.run_until_complete(self.runner.setup())
      site = web.TCPSite(self.runner, "127.0.0.1", 0)
      self.loop.run_until_complete(site.start())
      self.port = site._server.sockets[0].getsockname()[1]  # pylint: disable=protected-access
      ready.set()
      self.loop.run_forever()

    self.thread = threading.Thread(target=main, daemon=True)
    self.thread.start()
    ready.wait()

  def stop(self):
    asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
    self.loop.call_soon_threadsafe(self.loop.stop)
    self.thread.join()


def _one(client, model_name, prompt, max_tokens, extra):
  t0 = time.perf_counter()
  first, usage = None, None
  for ch in client.completions.create(model=model_name, prompt=prompt, max_tokens=max_tokens,
                                      temperature=0, stream=True, extra_body=extra):
    if ch.choices and ch.choices[0].text and first is None:
      first = time.perf_counter() - t0
    if ch.usage is not None:
      usage = ch.usage
  total = time.perf_counter() - t0
  return {"latency_s": total, "ttfb_s": total if first is None else first,
          "completion_tokens": usage.completion_tokens, "nfe": usage.model_dump()["nfe"]}


def _pct(xs, q):
  xs = sorted(xs)
  return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _ints(p, flag: str, text: str) -> list[int]:
  """Comma-separated integers >= 1 of ``flag``, or the parser's error naming it."""
  try:
    values = [int(x) for x in text.split(",")]
  except ValueError:
    p.error(f"--{flag}={text!r}: comma-separated integers expected")
  if min(values) < 1 or len(set(values)) != len(values):
    p.error(f"--{flag}={text!r}: integers >= 1, each once")
  return values


def parse_args(argv=None) -> argparse.Namespace:
  """The flags, refused by name before the model is built and the decoders compile."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small settings for a CPU")
  p.add_argument("--concurrency", default="1,4,16,64")
  p.add_argument("--requests", type=int, default=64, help="requests per level")
  p.add_argument("--max_tokens", type=int, default=32)
  p.add_argument("--slots", type=int, default=16)
  p.add_argument("--forwards_per_call", default="1,8",
                 help="engine settings compared: forwards per host round trip")
  p.add_argument("--decoders", default="ar,threshold")
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--workdir", default="")
  p.add_argument("--max_len", type=int, default=0, help="context limit; 0 = data.seq_len")
  p.add_argument("--config", default="configs/synthetic.py")
  p.add_argument("--tag", default="")
  args = p.parse_args(argv)
  if args.quick:
    args.concurrency, args.requests, args.max_tokens, args.slots = "1,4,16", 16, 24, 4
  args.levels = _ints(p, "concurrency", args.concurrency)
  args.fpcs = _ints(p, "forwards_per_call", args.forwards_per_call)
  for flag in ("requests", "max_tokens", "slots"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag}={getattr(args, flag)} must be >= 1")
  if args.max_len < 0:
    p.error(f"--max_len={args.max_len} must be >= 0")
  args.decoder_list = args.decoders.split(",")
  unknown = [d for d in args.decoder_list if d not in protocol.POLICIES]
  if unknown or len(set(args.decoder_list)) != len(args.decoder_list):
    p.error(f"--decoders={args.decoders!r}: each once, of {list(protocol.POLICIES)}")
  return args


def _level(client, args, dec: str, fpc: int, conc: int) -> dict:
  """One concurrency level: ``args.requests`` streaming requests from ``conc`` threads."""
  extra = {"policy": dec, "threshold": args.threshold}
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(conc) as pool:
    res = list(pool.map(lambda i: _one(client, "bench", PROMPTS[i % len(PROMPTS)],
                                       args.max_tokens, extra), range(args.requests)))
  wall = time.perf_counter() - t0
  lat = [r["latency_s"] for r in res]
  return {"decoder": dec, "forwards_per_call": fpc, "concurrency": conc,
          "requests": len(res), "tokens_per_s": sum(r["completion_tokens"] for r in res) / wall,
          "p50_latency_s": _pct(lat, 0.5), "p99_latency_s": _pct(lat, 0.99),
          "p50_first_chunk_s": _pct([r["ttfb_s"] for r in res], 0.5),
          "mean_nfe": statistics.mean(r["nfe"] for r in res), "wall_s": wall}


def results_stem(args) -> pathlib.Path:
  """experiments/results/serve_load{_tag}; a --quick smoke run's in the temporary folder
  instead: it is not a result, and under the plain name it replaced the real one."""
  name = f"serve_load{('_' + args.tag) if args.tag else ''}"
  if args.quick:
    return pathlib.Path(tempfile.gettempdir()) / f"{name}_quick"
  return RESULTS / name


def main(argv=None):
  args = parse_args(argv)
  levels = args.levels
  model, tok, params, block, max_len, token_shift = _model(args)
  import jax  # pylint: disable=g-import-not-at-top
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
          "command": " ".join(["python", "experiments/serve_load.py"] + sys.argv[1:]),
          "slots": args.slots, "max_tokens": args.max_tokens, "threshold": args.threshold,
          "model": args.workdir or "tiny random (d_model 32)", "compile_s": {},
          "engine": "continuous batching (a request joins at the next forward with k=1, "
                    "within k forwards otherwise)"}
  stem = results_stem(args)
  stem.parent.mkdir(parents=True, exist_ok=True)
  rows = []

  def failed(dec, fpc, conc, e):
    rows.append({"decoder": dec, "forwards_per_call": fpc, "concurrency": conc,
                 "error": f"{type(e).__name__}: {e}"})
    print(f"{dec:>10} k={fpc} c={conc:<3} failed: {rows[-1]['error']}", flush=True)

  for fpc in args.fpcs:
    try:  # An engine that fails to build or compile: error rows, the next k still runs.
      eng = engine_lib.Engine(model, params, tok, block, max_len, slots=args.slots,
                              queue_size=max(levels) * 2, forwards_per_call=fpc)
      srv = server_lib.Server(eng, "bench", token_shift=token_shift)
      for dec in args.decoder_list:
        parsed = protocol.parse_request(
            {"model": "bench", "prompt": "x", "policy": dec, "threshold": args.threshold},
            "bench", False, tok, block, tok.mask_id, tok.eos_id, protocol.Defaults(),
            token_shift)
        meta["compile_s"][f"{dec} k={fpc}"] = eng.warmup([(parsed.options, parsed.ar)])
      eng.start()
      run = _Running(srv)
    except Exception as e:  # pylint: disable=broad-except
      for dec in args.decoder_list:
        for conc in levels:
          failed(dec, fpc, conc, e)
      write(meta, rows, stem)
      continue
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{run.port}/v1", api_key="x",
                           max_retries=0, timeout=None)
    try:
      for dec in args.decoder_list:
        for conc in levels:
          try:  # One failing level is an error row; the sweep goes on.
            row = _level(client, args, dec, fpc, conc)
          except Exception as e:  # pylint: disable=broad-except
            failed(dec, fpc, conc, e)
          else:
            rows.append(row)
            print(f"{dec:>10} k={fpc} c={conc:<3} {row['tokens_per_s']:8.1f} tok/s  p50 "
                  f"{row['p50_latency_s']:.3f}s  p99 {row['p99_latency_s']:.3f}s  first "
                  f"chunk {row['p50_first_chunk_s']:.3f}s", flush=True)
          write(meta, rows, stem)  # A killed sweep keeps what it measured.
    finally:
      run.stop()
  write(meta, rows, stem)
  try:
    plot(rows, stem.with_suffix(".png"))
  except ImportError:
    pass
  print(f"wrote {stem}.json/.md/.png")
  if any("error" in r for r in rows):
    sys.exit(f"{sum('error' in r for r in rows)} of {len(rows)} levels failed (error rows)")


def write(meta: dict, rows: list[dict], stem: pathlib.Path) -> None:
  """``stem``.json (strict) and ``stem``.md of the levels measured so far."""
  from blockdiff_jax import metrics_writer  # pylint: disable=g-import-not-at-top
  stem.with_suffix(".json").write_text(json.dumps(metrics_writer.finite_or_none(
      {"meta": meta, "rows": rows}), indent=2, allow_nan=False))
  compile_s = {k: round(v, 1) for k, v in meta["compile_s"].items()}
  lines = [f"# Serving load ({meta['model']}, {meta['device']}, jax {meta['jax']}, "
           f"{meta['slots']} slots, max_tokens {meta['max_tokens']})", "",
           f"Command: `{meta['command']}`.", "",
           f"Compile time at start-up (s): {json.dumps(compile_s)}",
           "", "k = forwards per host round trip (1: a request joins at the next forward).",
           "", "| decoder | k | concurrency | tokens/s | p50 latency (s) | p99 latency (s) | "
           "p50 first chunk (s) | mean NFE |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    head = f"| {r['decoder']} | {r['forwards_per_call']} | {r['concurrency']} | "
    if "error" in r:
      # One cell: a '|' or a newline in the message would break the table.
      cell = " ".join(r["error"].split()).replace("|", "\\|")
      lines.append(head + f"not run: {cell} | | | | |")
      continue
    lines.append(head + f"{r['tokens_per_s']:.1f} | "
                 f"{r['p50_latency_s']:.3f} | {r['p99_latency_s']:.3f} | "
                 f"{r['p50_first_chunk_s']:.3f} | {r['mean_nfe']:.1f} |")
  stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: pathlib.Path) -> None:
  """Tokens/s and latency against concurrency, one curve per (decoder, k)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [r for r in rows if "error" not in r]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for dec, fpc in sorted({(r["decoder"], r["forwards_per_call"]) for r in rows}):
    rs = [r for r in rows if r["decoder"] == dec and r["forwards_per_call"] == fpc]
    name = f"{dec} k={fpc}"
    axes[0].plot([r["concurrency"] for r in rs], [r["tokens_per_s"] for r in rs], "o-",
                 label=name)
    axes[1].plot([r["concurrency"] for r in rs], [r["p50_latency_s"] for r in rs], "o-",
                 label=f"{name} p50")
    axes[1].plot([r["concurrency"] for r in rs], [r["p99_latency_s"] for r in rs], "x--",
                 label=f"{name} p99")
  for ax, title in zip(axes, ("generated tokens/s", "latency (s)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_title(title)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  main()
