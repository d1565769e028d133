"""experiments/summary_copy_probe.py: rows put the key where only the slots reach it, the
answer is the key, bad flags are refused before any work, and a short run writes results."""

import json

import numpy as np
import pytest

from conftest import load_experiment

probe = load_experiment("summary_copy_probe")

IDS = {"digits": np.arange(10, 20), "filler": np.arange(30, 54), "k": 5, "?": 6, ".": 7}


@pytest.mark.parametrize("key_block,blocks,window", [("first", 4, 1), ("any", 8, 1),
                                                     ("any", 6, 2)])
def test_rows_hide_the_key_outside_the_window_and_score_only_its_copy(key_block, blocks,
                                                                       window):
  task = probe.Task(blocks, 8, 4, key_block, window)
  rows = probe.make_rows(task, IDS, np.random.default_rng(0), 64)
  tokens, loss_mask = rows["tokens"], rows["loss_mask"]
  assert tokens.shape == loss_mask.shape == (64, blocks * 8)
  answer_start = (blocks - 1) * 8
  for row, scored in zip(tokens, loss_mask):
    (marker,) = np.flatnonzero(row == IDS["k"])  # One key per row.
    key = row[marker + 1:marker + 5]
    assert np.isin(key, IDS["digits"]).all()
    # Its block is older than the answer block's window: reachable only through slots.
    assert (marker + 4) // 8 < blocks - 1 - window
    assert marker // 8 == (marker + 4) // 8  # The key never straddles two blocks.
    assert row[answer_start] == IDS["?"]
    np.testing.assert_array_equal(row[answer_start + 1:answer_start + 5], key)
    np.testing.assert_array_equal(np.flatnonzero(scored), answer_start + 1 + np.arange(4))
  if key_block == "any":  # The key moves between rows.
    assert len({int(np.flatnonzero(r == IDS["k"])[0]) for r in tokens}) > 4


@pytest.mark.parametrize("argv,match", [
    (["--blocks", "2"], r"--blocks=2 must be >= window \+ 2"),
    (["--key_len", "8"], r"--key_len=8 needs --block_size > key_len"),
    (["--key_block", "last"], r"--key_block must be 'first' or 'any'"),
    (["--slots", "2,x"], r"comma lists of integers"),
    (["--slots", "-1"], r"--slots must be >= 0"),
    (["--steps", "0"], r"--steps must be >= 1"),
    (["--d_model", "30"], r"multiple of 4"),
    (["--key_block", "any", "--blocks", "8", "--curriculum_steps", "1500"],
     r"--curriculum_steps must be in \[0, --steps=1500\)"),
    (["--curriculum_steps", "10"], r"needs --key_block=any"),
    (["--key_block", "any", "--blocks", "8", "--curriculum", "random"], r"invalid choice"),
])
def test_bad_flags_are_refused_before_any_work(argv, match, capsys):
  with pytest.raises(SystemExit):
    probe.parse(argv)
  assert __import__("re").search(match, capsys.readouterr().err)


def test_a_short_run_writes_json_and_a_table(tmp_path):
  out = str(tmp_path / "probe")
  results = probe.main(["--slots", "2", "--steps", "2", "--eval_every", "1",
                        "--eval_rows", "8", "--d_model", "16", "--layers", "1",
                        "--out", out])
  (run,) = results["runs"]
  assert [p["step"] for p in run["curve"]] == [1, 2]
  assert all(0.0 <= p["digit_acc"] <= 1.0 and len(p["by_position"]) == 4
             for p in run["curve"])
  with open(out + ".json") as f:
    saved = json.load(f)
  assert saved["runs"][0]["final"] == run["final"]
  table = open(out + ".md").read()
  assert "| 2 slots/block | 0 |" in table and "Chance: 0.1 of digits" in table


def test_curriculum_switch_trains_on_block_0_then_on_any_block():
  task = probe.Task(8, 8, 4, "any", 1)
  for step, expect in [(1, "first"), (100, "first"), (101, "any"), (500, "any")]:
    train_task, cap = probe.training_rows_at(task, step, "switch", 100)
    assert (train_task.key_block, cap) == (expect, None)


def test_curriculum_widen_grows_the_key_range_to_every_block_outside_the_window():
  task = probe.Task(8, 8, 4, "any", 1)  # Key blocks 0..5.
  caps = [probe.training_rows_at(task, s, "widen", 60)[1] for s in range(1, 62)]
  assert caps[0] == 0 and caps[59] == 5 and caps[60] is None
  assert all(a <= b for a, b in zip(caps[:60], caps[1:60]))  # Never shrinks.
  assert sorted(set(caps[:60])) == [0, 1, 2, 3, 4, 5]  # Every stage is visited.
  rng = np.random.default_rng(0)
  for cap in (0, 2):
    rows = probe.make_rows(task, IDS, rng, 128, max_block=cap)["tokens"]
    blocks = {int(np.flatnonzero(r == IDS["k"])[0]) // 8 for r in rows}
    assert blocks == set(range(cap + 1))  # Within the cap, and all of it is used.


def test_quick_never_writes_into_the_results_folder():
  assert probe.parse(["--quick"]).out == "/tmp/summary_copy_probe_quick"
  assert probe.parse(["--quick", "--out", "x"]).out == "x"
