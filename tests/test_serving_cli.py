"""``--mode=serve`` end to end: a tiny trained workdir, the server process, one request and
a graceful shutdown on SIGINT."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import load_config_file
from blockdiff_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("serve"))
  c = load_config_file("synthetic")
  c.model.d_model = 32
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.head_dim = 16
  c.model.moe.expert_dim = 32
  c.train.steps = 2
  c.train.eval_every = 0
  c.train.async_checkpoints = False
  trainer.run(c, path)
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_serve_mode_answers_and_shuts_down(workdir):
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen(
      [sys.executable, "-m", "blockdiff_jax.main", "--config=configs/synthetic.py",
       f"--workdir={workdir}", "--mode=serve", f"--port={port}",
       "--config.model.d_model=32", "--config.model.num_heads=2",
       "--config.model.num_kv_heads=1", "--config.model.head_dim=16",
       "--config.model.moe.expert_dim=32", "--config.serve.slots=2"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    health = None
    while proc.poll() is None and health is None:  # Until it serves or dies.
      try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
          health = json.loads(r.read())
      except (urllib.error.URLError, ConnectionError):
        time.sleep(0.2)
    assert health is not None, proc.communicate()[0]
    assert health["status"] == "ok" and health["compile_s"] > 0
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({"model": "blockdiff", "prompt": "<|bos|>sort: 2 1<|sep|>",
                         "max_tokens": 8}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
      out = json.loads(r.read())
    assert out["object"] == "text_completion" and out["usage"]["nfe"] >= 1
  finally:
    proc.send_signal(signal.SIGINT)
    log = proc.communicate()[0]
  assert proc.returncode == 0, log
  assert "compiled the" in log
