"""experiments/xla_compile_flags.py: medians and ratios to the first flag set, its table,
and a worker that XLA refuses to start is named, not read as a result."""

import pytest

from conftest import load_experiment


def _samples():
  return {"XLA defaults": [{"block_decode_compile_s": 3.0, "smollm2_forward_ms": 100.0},
                           {"block_decode_compile_s": 5.0, "smollm2_forward_ms": 300.0},
                           {"block_decode_compile_s": 4.0, "smollm2_forward_ms": 200.0}],
          "LLVM -O0": [{"block_decode_compile_s": 1.0, "smollm2_forward_ms": 500.0},
                       {"block_decode_compile_s": 2.0, "smollm2_forward_ms": 400.0},
                       {"block_decode_compile_s": 9.0, "smollm2_forward_ms": 600.0}]}


def test_rows_are_medians_with_ratios_to_the_first_flag_set():
  mod = load_experiment("xla_compile_flags")
  base, o0 = mod.summarize(_samples())
  assert base["block_decode_compile_s"] == 4.0 and base["block_decode_compile_s_ratio"] == 1.0
  assert o0["block_decode_compile_s"] == 2.0 and o0["block_decode_compile_s_ratio"] == 0.5
  assert o0["smollm2_forward_ms"] == 500.0 and o0["smollm2_forward_ms_ratio"] == 2.5
  assert "isd_decode_compile_s" not in o0  # Not measured: no column.
  env = {"command": "x.py", "backend": "cpu", "cpus": 2, "machine": "m", "jax": "0",
         "load_avg": [0.5], "total_s": 60.0}
  text = mod.markdown([base, o0], env, 3)
  assert "| LLVM -O0 | 2.00 (0.50x) | 500 (2.50x) |" in text
  assert "ISD" not in text.split("|---|")[0].splitlines()[-1]


def test_a_worker_xla_refuses_names_its_flags():
  mod = load_experiment("xla_compile_flags")
  with pytest.raises(SystemExit, match="xla_no_such_flag_in_any_jaxlib"):
    mod.run_worker("--xla_no_such_flag_in_any_jaxlib=1", smollm2=False)
