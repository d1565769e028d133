r"""SmolLM2-135M-Instruct: import time and peak memory, and AR decode speed vs transformers.

1. Import, each in a fresh subprocess (so peak RSS is the import's own): the cold load
   (GGUF dequantized and converted into the cache folder, then loaded) and the warm load
   (the cached HF folder). Peak memory is reported both as tracemalloc's peak of Python
   and numpy allocations and as the process's max RSS.
2. AR greedy decoding of the chat prompts of configs/smollm2.py, in one run on the same
   CPU: our jit AR decoder (``sampling.ar`` with the token shift, compiled once before
   timing) against ``transformers``' ``generate`` (greedy, its KV cache) of the model
   exported by ``interop.hf.export``. Both generate exactly ``--new_tokens`` tokens per
   prompt; the outputs are compared token for token.

  PYTHONPATH=$PWD python experiments/pretrained_smollm2.py --new_tokens=64

Writes experiments/results/pretrained_smollm2.{json,md}.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

_IMPORT_CHILD = r"""
import json, resource, sys, time, tracemalloc
tracemalloc.start()
from blockdiff_jax.interop import pretrained
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
pre = pretrained.load("smollm2", sys.argv[1], scan_layers=True)
import jax; jax.block_until_ready(pre.params)
wall = time.perf_counter() - t0
_, peak = tracemalloc.get_traced_memory()
print(json.dumps({"wall_s": wall, "tracemalloc_peak_mb": peak / 2**20,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_load_mb": rss0 / 1024}))
"""


def measure_import(cache: str, label: str) -> dict:
  env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", _IMPORT_CHILD, cache], env=env,
                       capture_output=True, text=True, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"[import {label}] {result['wall_s']:.1f}s, tracemalloc peak "
        f"{result['tracemalloc_peak_mb']:.0f} MB, max RSS {result['max_rss_mb']:.0f} MB",
        flush=True)
  return {"phase": label, **result}


def _config_module():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("smollm2_cfg",
                                                os.path.join(_ROOT, "configs", "smollm2.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _ar_greedy(cfg, params, ids, steps: int) -> list[int]:
  """Greedy tokens of the project's jit AR decoder (token shift, KV cache), batch 1."""
  from blockdiff_jax.model import transformer  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import ar  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.sampling import layout  # pylint: disable=g-import-not-at-top
  opts = layout.DecodeOptions(block_size=1, mask_id=cfg.vocab_size - 1, eos_id=-1,
                              stop_at_eos=False, token_shift=True)
  canvas = layout.generation_canvas([ids], steps, 1, cfg.vocab_size - 1, max_len=len(ids) + steps)
  out = ar.decode_ar(transformer.Transformer(cfg), params, canvas, opts)
  return out["tokens"][0, len(ids):len(ids) + steps].tolist()


def measure_decode(cache: str, new_tokens: int, thread_counts: list[int],
                   scan_layers: bool) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.interop import hf  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.interop import pretrained  # pylint: disable=g-import-not-at-top

  pre = pretrained.load("smollm2", cache, scan_layers=scan_layers)
  cfg = hf.transformer_config(pre.model_overrides, scan_layers=scan_layers)
  # The exported fp32 model (~0.5 GB) used to stay behind in the temporary folder after
  # every run; it is only needed to load the reference.
  with tempfile.TemporaryDirectory(prefix="smollm2_export_") as export_dir:
    hf.export(export_dir, pre.params, cfg, pre.model_overrides, tokenizer=pre.tokenizer)
    ref = transformers.LlamaForCausalLM.from_pretrained(export_dir,
                                                        dtype=torch.float32).eval()
  tok = pre.tokenizer
  prompts = [tok.encode_with_specials(p) for p in _config_module().get_config()
             .sample.prompts.split(";")]
  rows = []
  for i, ids in enumerate(prompts):
    t0 = time.perf_counter()
    _ar_greedy(cfg, pre.params, ids, new_tokens)  # Compile (per length).
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = _ar_greedy(cfg, pre.params, ids, new_tokens)
    ours_s = time.perf_counter() - t0
    inp = torch.tensor(ids[None].astype(np.int64))
    hf_rates = {}
    for threads in thread_counts:  # Torch's OpenMP pool suffers on a busy machine: try each.
      torch.set_num_threads(threads)
      with torch.no_grad():
        ref.generate(inp, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_id)
        t0 = time.perf_counter()
        out = ref.generate(inp, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=tok.pad_id)
        hf_rates[threads] = new_tokens / (time.perf_counter() - t0)
    best = max(hf_rates, key=hf_rates.get)
    theirs = out[0, len(ids):].tolist()
    row = {"prompt": i, "prompt_tokens": len(ids), "new_tokens": new_tokens,
           "ours_tokens_per_s": new_tokens / ours_s, "ours_compile_s": compile_s,
           "transformers_tokens_per_s": hf_rates[best], "transformers_threads": best,
           "transformers_tokens_per_s_by_threads": hf_rates, "identical": ours == theirs,
           # Greedy paths part at a near-tie of the top two logits (fp32 rounding differs).
           "first_difference": next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                                    None),
           "answer": tok.decode(ours[:ours.index(tok.eos_id)] if tok.eos_id in ours else ours)}
    print(f"[decode prompt {i}] ours {row['ours_tokens_per_s']:.1f} tok/s (compile "
          f"{compile_s:.1f}s), transformers {row['transformers_tokens_per_s']:.1f} tok/s "
          f"({best} threads), "
          f"identical={row['identical']}: {row['answer'][:70]!r}", flush=True)
    rows.append(row)
  return {"rows": rows, "torch_thread_counts": thread_counts, "scan_layers": scan_layers}


def write_results(result: dict, path_base: str) -> None:
  os.makedirs(os.path.dirname(path_base), exist_ok=True)
  with open(path_base + ".json", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  lines = ["# SmolLM2-135M-Instruct: import and AR decode speed", "",
           f"CPU: {result['cpu']} ({result.get('machine', '?')}), jax {result.get('jax', '?')}; "
           f"load average at start {result['load_average']:.1f} (the machine is shared: "
           "figures move with the load).", "", f"Command: `{result.get('command', '?')}`.", "",
           "| import | wall s | tracemalloc peak MB | max RSS MB | RSS after imports MB |",
           "|---|---|---|---|---|"]
  for r in result["import"]:
    lines.append(f"| {r['phase']} | {r['wall_s']:.1f} | {r['tracemalloc_peak_mb']:.0f} | "
                 f"{r['max_rss_mb']:.0f} | {r['rss_before_load_mb']:.0f} |")
  lines += ["", f"AR greedy decoding, batch 1, {result['decode']['rows'][0]['new_tokens']} "
            "new tokens per prompt (timed after a warm-up; ours = `sampling.ar`, the jit "
            "KV-cache decoder with the token shift, with "
            f"scan_layers={result['decode']['scan_layers']}):", "",
            "| prompt | prompt tokens | ours tok/s | transformers tok/s (threads) | speedup | "
            "identical | answer |", "|---|---|---|---|---|---|---|"]
  for r in result["decode"]["rows"]:
    answer = r["answer"][:60].replace("\n", " ").replace("|", "\\|")
    lines.append(f"| {r['prompt']} | {r['prompt_tokens']} | {r['ours_tokens_per_s']:.1f} | "
                 f"{r['transformers_tokens_per_s']:.1f} ({r['transformers_threads']}) | "
                 f"{r['ours_tokens_per_s'] / r['transformers_tokens_per_s']:.2f}x | "
                 f"{r['identical'] or 'from token ' + str(r['first_difference'])} | {answer} |")
  with open(path_base + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {path_base}.json and .md")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--threads", default=f"1,{len(os.sched_getaffinity(0))}",
                      help="torch thread counts to try; the fastest is reported (XLA uses "
                           "all cores)")
  # XLA:CPU copies each layer's weights out of the stacked arrays inside a scan, per
  # token: unrolled layers decode about twice as fast (compile takes longer).
  parser.add_argument("--scan_layers", action="store_true", help="decode with nn.scan layers")
  parser.add_argument("--out", default=os.path.join(_HERE, "results", "pretrained_smollm2"))
  args = parser.parse_args()
  threads = check_flags(parser, args)
  # The converted HF cache (~0.5 GB) is removed with the run; it used to pile up in /tmp.
  with tempfile.TemporaryDirectory(prefix="smollm2_cache_") as cache:
    run(args, threads, cache)


def check_flags(parser: argparse.ArgumentParser, args) -> list[int]:
  """The torch thread counts; bad flags refused by name before the minutes of imports
  (--threads=0 used to fail in torch.set_num_threads, --new_tokens=0 divided by zero)."""
  try:
    threads = [int(t) for t in args.threads.split(",")]
  except ValueError:
    parser.error(f"--threads={args.threads!r}: comma-separated integers expected")
  if min(threads) < 1:
    parser.error(f"--threads={args.threads!r}: every count must be >= 1")
  if args.new_tokens < 1:
    parser.error(f"--new_tokens={args.new_tokens} must be >= 1")
  return threads


def run(args, threads: list[int], cache: str) -> None:
  """Both measurements into ``cache`` (the converted model's folder), then the results."""
  import jax  # pylint: disable=g-import-not-at-top
  result = {"cpu": f"{len(os.sched_getaffinity(0))} cores", "load_average": os.getloadavg()[0],
            "machine": f"{platform.machine()}, {jax.devices()[0].device_kind}",
            "jax": jax.__version__,
            "command": " ".join(["python", "experiments/pretrained_smollm2.py"] + sys.argv[1:]),
            "import": [measure_import(cache, "cold (GGUF -> cache -> params)"),
                       measure_import(cache, "warm (cached HF folder -> params)")]}
  result["decode"] = measure_decode(cache, args.new_tokens, threads, args.scan_layers)
  write_results(result, args.out)


if __name__ == "__main__":
  main()
