"""A decoder against AR decoding of the same model, in the same run (``sample.compare_ar``).

Each prompt is decoded alone (batch 1, the per-request setting I-DLM and Fast-dLLM
report) by greedy AR and by the chosen decoder. Both are timed warm: every call runs
once to compile and once to time, so compilation never counts. The report says whether
the texts are token-for-token identical (ISD with a gated-LoRA model must be), the
decoder's tokens per forward (TPF = generated tokens / forwards, the prefill counted as
the forward that emits the first token, as for AR) and the speed-up: its tokens/s over
AR's (generated tokens / warm wall time), per prompt and over all prompts.
"""

import dataclasses
import numbers
from typing import Any, Sequence

from blockdiff_jax.data import tokenizers
from blockdiff_jax.sampling import layout
from blockdiff_jax.sampling import generation
from blockdiff_jax.sampling import isd
from blockdiff_jax.sampling import policies


@dataclasses.dataclass(frozen=True)
class Decoder:
  """Which decoder to compare with AR.

  Attributes:
    policy: ``isd`` or the block policy name of the options compared (the block
      decoder runs ``options.policy``; this names it in the report, so they must agree).
    isd_stride: N when ``policy == "isd"``, else 0.
  """

  policy: str
  isd_stride: int = 0

  def __post_init__(self):
    # compare_with_ar picks ISD by the stride alone: "isd" without one would time the
    # block decoder under ISD's name, and a stride with a block policy would time ISD.
    stride = self.isd_stride
    if self.policy != "isd" and self.policy not in policies.POLICIES:
      # "ar" (the baseline itself) or a typo would time the block decoder under that name.
      raise ValueError(f"policy must be 'isd' or a block policy {sorted(policies.POLICIES)}, "
                       f"got {self.policy!r}")
    if isinstance(stride, bool) or not isinstance(stride, numbers.Integral):
      raise ValueError(f"isd_stride must be an integer, got {stride!r}")
    if self.policy == "isd" and stride < 2:
      raise ValueError(f"policy='isd' needs isd_stride >= 2, got {stride}")
    if self.policy != "isd" and stride:
      raise ValueError(f"isd_stride={stride} is only for policy='isd', got "
                       f"policy={self.policy!r}")

  @property
  def name(self) -> str:
    return f"isd N={self.isd_stride}" if self.isd_stride else self.policy


def compare_with_ar(model, params, tokenizer: tokenizers.Tokenizer, prompts: Sequence[str],
                    options: layout.DecodeOptions, max_new_tokens: int, max_len: int,
                    dec: Decoder, log: Any = None) -> tuple[list[dict], dict]:
  """Decodes every prompt by AR and by ``dec``, each alone and warm.

  Args:
    model, params, tokenizer: the model (a Transformer or a logits function).
    prompts: prompt strings (specials spelled out).
    options: greedy decoding options (``sample.options_from_config``).
    max_new_tokens, max_len: limits, as for ``generation.generate``.
    dec: the decoder compared with AR.
    log: a callable taking one line of progress (with the prompt's tokens/s ratio to
      AR, as the summary's ``speedup``), or None.

  Returns:
    (per prompt ``{prompt, completion, ar_completion, identical, generated_tokens, nfe,
    ar_nfe, tpf, wall_s, ar_wall_s}``, summary ``{decoder, prompts, identical,
    generated_tokens, ar_generated_tokens, nfe, tpf, tokens_per_s, ar_tokens_per_s,
    speedup}``).
  """
  generation.check_prompt_list(prompts)
  # Read twice (checked, then decoded): a one-pass iterable (a generator, a ``map``)
  # would be used up by the checks and then decode nothing (a ZeroDivisionError). None
  # stays "no prompts" for the check below.
  prompts = [] if prompts is None else list(prompts)
  if options.sampling.temperature > 0:
    raise ValueError("compare_with_ar compares greedy texts; options.sampling.temperature "
                     f"must be 0, got {options.sampling.temperature}")
  if not prompts:
    raise ValueError("compare_with_ar needs at least one prompt, got none")
  if dec.isd_stride:
    # ISD refuses a model without token_shift only when it first runs: after the first
    # prompt's warm AR decodes (a compile and two decodes of a real model) were spent.
    isd.check_setup(options, dec.isd_stride)
  elif not isinstance(options.policy, policies.POLICIES[dec.policy]):
    # The block decoder runs options.policy; the report names dec.policy.
    raise ValueError(f"dec.policy={dec.policy!r} but options.policy is "
                     f"{type(options.policy).__name__}: the report would name a decoder "
                     "other than the one timed")
  # Every prompt is checked before any is decoded: each is decoded alone, so a bad one
  # met late would waste the warm runs before it (and generate would call it prompt 0).
  for i, prompt in enumerate(prompts):
    try:
      parsed = layout.parse(tokenizer, prompt)
      if parsed.maskable.any():
        raise ValueError("it has <|mask:N|> spans (infilling is not compared with AR)")
      layout.check_prompt(parsed.ids, max_new_tokens, tokenizer.mask_id, max_len, "it")
    except ValueError as e:
      raise ValueError(f"prompt {i} ({prompt[:40]!r}): {e}") from None
  rows = []
  for i, prompt in enumerate(prompts):
    common = dict(model=model, params=params, tokenizer=tokenizer, prompts=[prompt],
                  options=options, max_new_tokens=max_new_tokens, max_len=max_len,
                  warmup=True)
    (ar_row,), ar_sum = generation.generate(ar=True, **common)
    (row,), summ = generation.generate(isd_stride=dec.isd_stride, **common)
    rows.append({
        "prompt": prompt, "completion": row["completion"],
        "ar_completion": ar_row["completion"],
        "identical": row["tokens"] == ar_row["tokens"],
        "generated_tokens": row["generated_tokens"],
        "ar_generated_tokens": ar_row["generated_tokens"],
        "nfe": row["nfe"], "ar_nfe": ar_row["nfe"], "tpf": row["tpf"],
        "wall_s": summ["wall_s"], "ar_wall_s": ar_sum["wall_s"]})
    if log is not None:
      # Tokens/s, as the summary: a wall-time ratio would reward an answer cut short.
      ratio = ((row["generated_tokens"] / summ["wall_s"])
               / (ar_row["generated_tokens"] / ar_sum["wall_s"]))
      log(f"[{i + 1}/{len(prompts)}] {dec.name}: TPF {row['tpf']:.2f}, "
          f"{ratio:.2f}x AR, identical {rows[-1]['identical']}")
  total = lambda k: sum(r[k] for r in rows)
  summary = {
      "decoder": dec.name, "prompts": len(rows),
      "identical": all(r["identical"] for r in rows),
      "generated_tokens": total("generated_tokens"),
      "ar_generated_tokens": total("ar_generated_tokens"),
      "nfe": total("nfe"), "tpf": total("generated_tokens") / max(total("nfe"), 1),
      "tokens_per_s": total("generated_tokens") / total("wall_s"),
      "ar_tokens_per_s": total("ar_generated_tokens") / total("ar_wall_s"),
  }
  # Tokens/s ratio, so a decoder that stops earlier or later is not rewarded for length.
  summary["speedup"] = summary["tokens_per_s"] / summary["ar_tokens_per_s"]
  return rows, summary


def report(rows: Sequence[dict], summary: dict) -> str:
  """The comparison as readable text: each answer, then one line of totals."""
  lines = []
  for r in rows:
    same = "identical to AR" if r["identical"] else "DIFFERS from AR: " + repr(r["ar_completion"])
    lines.append(f"{r['prompt']!r}\n  -> {r['completion']!r}\n  ({same}; TPF {r['tpf']:.2f}, "
                 f"NFE {r['nfe']} vs AR {r['ar_nfe']})")
  lines.append(
      f"{summary['decoder']}: {summary['generated_tokens']} tokens, TPF {summary['tpf']:.2f}, "
      f"{summary['tokens_per_s']:.1f} tokens/s vs AR {summary['ar_tokens_per_s']:.1f} "
      f"tokens/s = {summary['speedup']:.2f}x; all identical to AR: {summary['identical']}")
  return "\n".join(lines)
