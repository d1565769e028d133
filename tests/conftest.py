"""Shared fixtures: tiny configs and models built in-process (no network, no GPU)."""

import os
import sys

# XLA's CPU backend tuned for compile time: the suite's programs are tiny and compiled
# once each, and compiling is most of the suite's time. LLVM at -O0 (its optimisation
# passes cost more than they save: a fifth of the suite's time), and the elemental
# emitters instead of the MLIR fusion emitters (half of each compile; real-model
# forwards run slower: experiments/xla_compile_flags.py). Set before JAX starts its
# backend; notebook kernels and the multi-device workers inherit it. A flag already in
# XLA_FLAGS wins.
TEST_XLA_FLAGS = {"xla_backend_optimization_level": "0",
                  "xla_cpu_use_fusion_emitters": "false"}


def xla_accepts(flag: str) -> bool:
  """Whether this jaxlib starts with ``flag`` in XLA_FLAGS: XLA aborts the process on a
  flag it does not know, and the jaxlib is not pinned (a subprocess tries it)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  probe = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
  return subprocess.run([sys.executable, "-c", probe], capture_output=True, check=False,
                        env={**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
                        ).returncode == 0


# Decided once, by pytest's own process before it starts the xdist workers: they (and
# every subprocess) inherit XLA_FLAGS and the marker.
if not os.environ.get("BLOCKDIFF_TEST_XLA_FLAGS"):
  os.environ["BLOCKDIFF_TEST_XLA_FLAGS"] = "set"
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "")] + [
      f"--{name}={value}" for name, value in TEST_XLA_FLAGS.items()
      if f"--{name}=" not in os.environ.get("XLA_FLAGS", "")
      and xla_accepts(f"--{name}={value}")]).strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def load_repo_module(folder: str, name: str):
  """A fresh import of ``<folder>/<name>.py`` (``configs``, ``experiments``): neither is a
  package, and each test gets its own copy to monkeypatch."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(ROOT, folder, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"{folder}_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_experiment(name: str):
  """``experiments/<name>.py`` as a module."""
  return load_repo_module("experiments", name)


def load_config_file(name):
  """``get_config()`` of ``configs/<name>.py``."""
  return load_repo_module("configs", name).get_config()


def small_moe_config(num_layers: int = 1):
  """configs/tiny.py's MoE at width 32 (experts 32 wide) and ``num_layers`` layers, on
  40 kB in batches of 2 x 32 tokens, without TensorBoard: for building and saving one."""
  c = load_config_file("tiny")
  c.data.max_bytes, c.data.seq_len, c.data.batch_size = 40_000, 32, 2
  c.model.d_model, c.model.num_layers, c.model.moe.expert_dim = 32, num_layers, 32
  c.train.tensorboard = False
  return c


def small_run_config(steps: int, checkpoint_every: int, warmup_steps: int = 1):
  """configs/tiny.py as a run of ``steps`` steps in seconds: one dense layer of width 32
  on 40 kB, batches of 4 x 32 tokens, a row logged every step, no validation, no
  TensorBoard, synchronous checkpoints every ``checkpoint_every`` steps."""
  c = load_config_file("tiny")
  c.data.max_bytes, c.data.seq_len, c.data.batch_size = 40_000, 32, 4
  c.model.d_model, c.model.num_layers, c.model.moe.num_experts = 32, 1, 0
  c.train.steps, c.train.warmup_steps, c.train.log_every = steps, warmup_steps, 1
  c.train.eval_every, c.train.checkpoint_every = 0, checkpoint_every
  c.train.async_checkpoints, c.train.tensorboard = False, False
  return c


LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # A program traced to MLIR.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # XLA compiled one.


class JaxEventCounter:
  """Counts one ``jax.monitoring`` duration event (``LOWERING_EVENT``, ...) while ``active``.

  Make one per test module: the listener stays registered for the process.
  """

  count, active = 0, False

  def __init__(self, event: str):
    self.event = event
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **kw):
    del duration, kw
    if self.active and event == self.event:
      self.count += 1


def one_layer_hf_folder(tmp_path) -> str:
  """test_init_pretrained's tiny HF llama folder, cut to its first layer.

  For end-to-end runs (train, checkpoints, decoders) whose checks no layer count
  changes: each of their many compiles costs about half.
  """
  import test_interop_pretrained as tiny  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path / "hf")
  model = tiny._tiny_llama(tiny._folder_with_unmasked_tokenizer(folder))  # pylint: disable=protected-access
  model.model.layers = model.model.layers[:1]
  model.config.num_hidden_layers = 1
  model.save_pretrained(folder)
  return folder


def small_model_config(**model):
  """The base config shrunk to a 32-wide model (2 heads, 1 KV head of 16) for decoders."""
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.d_model, c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 32, 2, 1, 16
  c.model.moe.expert_dim = 32
  for k, v in model.items():
    c.model[k] = v
  return c


@pytest.fixture(scope="session")
def tiny_decoder():
  """(model, tokenizer, params at seed 0) of ``small_model_config()``: a 32-wide MoE that
  the decoder, trace, serving and probe tests share (built once per worker)."""
  from blockdiff_jax.model import build  # pylint: disable=g-import-not-at-top
  model, tok = build.build_model(small_model_config())
  return model, tok, build.init_params(model, 0)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> str:
  """A cache_dir holding the bundled SmolLM2 converted from its GGUF, for tests that
  use the model rather than test its conversion (test_interop_smollm2 converts its own).

  A conversion costs seconds and half a gigabyte written; it runs once per session: the
  xdist workers share the folder under a file lock (as ``run_multidevice_worker``).
  ``link_smollm2`` puts it into a test's workdir.
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.interop import pretrained  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # Shared by the session's workers.
  cache = root / "smollm2_cache"
  cache.mkdir(exist_ok=True)
  with open(cache / "lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    pretrained.prepare("smollm2", str(cache))
  return str(cache)


def link_smollm2(cache: str, workdir) -> None:
  """Gives ``workdir`` the converted SmolLM2 of ``smollm2_cache`` (a symlink: the runs
  only read it), so ``pretrained.load("smollm2", workdir)`` skips the conversion."""
  os.makedirs(os.path.join(workdir, "pretrained"), exist_ok=True)
  os.symlink(os.path.join(cache, "pretrained", "smollm2"),
             os.path.join(workdir, "pretrained", "smollm2"))


XLA_CACHE_OPTIONS = {  # The persistent compilation cache, for every entry however small.
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


def pytest_configure(config):
  """Gives this test process a persistent XLA compilation cache of its own.

  Many tests build the same tiny models and jit the same programs in new closures;
  tracing repeats, but XLA's compile (most of a small test's time on the CPU) is
  then a cache read. One folder per process (each xdist worker runs this hook), so
  no two processes write one entry; it is removed when the process ends.
  """
  del config
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  folder = tempfile.mkdtemp(prefix="blockdiff_jax_xla_cache_")
  atexit.register(shutil.rmtree, folder, ignore_errors=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  for name, value in XLA_CACHE_OPTIONS.items():
    jax.config.update(name, value)


# The modules that take longest, longest first (summed --durations of a full run on the
# 2-core CPU). pytest.ini hands whole modules to the xdist workers in collection order
# (--dist loadfile --no-loadscope-reorder), so these start first and the many short
# modules fill in at the end, instead of one worker finishing a long module alone. A
# module missing from the list only runs later; the order changes no result.
SLOW_MODULES = (
    "test_serving_engine.py", "test_notebooks.py", "test_sampling_shifted.py",
    "test_sharding_train.py", "test_fastdllm_learning_curve.py", "test_interop_smollm2.py",
    "test_eval_humaneval.py", "test_train.py", "test_idlm_training.py",
    "test_hierarchical_cache.py", "test_upcycle.py", "test_sampling_decoder.py",
    "test_compare_decoders.py", "test_model.py", "test_factored_kv.py",
    "test_objective_introspective.py", "test_sampling_isd.py", "test_lora.py",
    "test_init_pretrained.py", "test_sampling_trace.py", "test_serving_cli.py",
    "test_eval_harness.py", "test_objective_fastdllm.py", "test_expert_parallel.py",
    "test_summary_decoding.py",
)


def pytest_collection_modifyitems(items):
  """Moves the slow modules to the front, longest first (a stable sort: each module's
  tests keep their order)."""
  rank = {name: i for i, name in enumerate(SLOW_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
  """Drops every compiled XLA program when a test module ends.

  XLA:CPU maps each executable's code into memory, and JAX keeps executables while
  their jitted functions live in its caches. One xdist worker runs about 500 tests and
  gathered over 60,000 memory mappings, past Linux's default vm.max_map_count (65,530);
  the next compile then segfaulted inside XLA and took the worker down. Tests in one
  module share programs, so they keep them until the module ends.
  """
  yield
  release_compiled_programs_now()


def release_compiled_programs_now() -> None:
  """Clears JAX's compilation caches and collects what they held."""
  import gc  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="module")
def tiny_moe():
  """(model, params) of a one-layer MoE (4 experts, top 2, dense dispatch) on 16 tokens."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from blockdiff_jax import masks  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import moe  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import transformer  # pylint: disable=g-import-not-at-top
  cfg = transformer.TransformerConfig(
      vocab_size=16, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
      mlp_dim=16, moe=moe.MoEConfig(num_experts=4, top_k=2, expert_dim=16, impl="dense",
                                    block_min_experts=2))
  model = transformer.Transformer(cfg)
  meta = masks.make_meta(jnp.arange(8)[None], 1, masks.CLEAN)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), meta)
  return model, nn.unbox(params["params"])


def evaluate_without_a_model(monkeypatch) -> None:
  """``evaluate.run`` loads no weights: the tasks (monkeypatched by the test) get the
  config and ``None`` for model, tokenizer and params."""
  import contextlib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(evaluate.inference, "load_for_inference",
                      lambda workdir, config: (config, None, None, None))
  monkeypatch.setattr(evaluate.inference, "inference_context",
                      lambda config: contextlib.nullcontext())


def xla_and_counted_step_flops(config) -> tuple[float, float]:
  """(XLA's FLOP count of the compiled train step of ``config``, at batch 1 and
  ``data.seq_len``; ``trainer.objective_step_flops``, the count MFU divides by)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.diffusion import config as diffusion_config  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import config as model_config  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import transformer  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import trainer  # pylint: disable=g-import-not-at-top
  mesh, _ = mesh_lib.mesh_of(config)
  mcfg = model_config.model_config(config)
  obj = diffusion_config.objective(config, mcfg.vocab_size - 1)
  st = step_lib.make_sharded_train(config, mesh, transformer.Transformer(mcfg), obj)
  sd = lambda dt: jax.ShapeDtypeStruct((1, config.data.seq_len), dt)
  batch = {"tokens": sd(jnp.int32), "segment_ids": sd(jnp.int32), "loss_mask": sd(jnp.float32)}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  cost = st.train_step.__wrapped__.lower(st.abstract_state, batch, rng).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
  return xla, trainer.objective_step_flops(config, mcfg, obj)


@pytest.fixture
def tiny_config():
  return load_config_file("tiny")


# Kernel tests: on a GPU the same tests run the compiled Triton kernels.
INTERPRET = jax.default_backend() != "gpu"
TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.fixture
def full_precision_matmuls():
  """XLA's default fp32 matmul on GPU is TF32; the kernels' fp32 path is exact."""
  with jax.default_matmul_precision("highest"):
    yield


def run_multidevice_worker(script: str, tmp_path_factory, name: str) -> dict:
  """Runs ``python script OUT TMP`` with 8 simulated CPU devices and returns its JSON report.

  The script sets ``XLA_FLAGS`` before importing jax (so this pytest process keeps
  one device) and writes ``{check: result or "error: ..."}`` to OUT. There is no
  wall-clock limit: a worker is one process that ends by itself, and on a machine
  busy with other work it only takes longer (a fixed limit failed such runs).

  It runs once per test session: under pytest-xdist a module's tests may land on
  several workers, and each would otherwise run the (minutes-long) worker again; the
  first takes a file lock in the session's shared temporary folder and the others read
  its report.
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # Shared by the session's workers.
  tmp = root / f"multidevice_{name}"
  tmp.mkdir(exist_ok=True)
  out = os.path.join(str(tmp), "report.json")
  with open(os.path.join(str(tmp), "lock"), "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(out):
      repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
      env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
                 JAX_COMPILATION_CACHE_DIR=str(tmp / "xla_cache"),
                 **{k.upper(): str(v) for k, v in XLA_CACHE_OPTIONS.items()})
      proc = subprocess.run([sys.executable, script, out, str(tmp)], env=env, cwd=repo,
                            capture_output=True, text=True, check=False)
      assert proc.returncode == 0 and os.path.exists(out), proc.stderr[-5000:]
  with open(out, encoding="utf-8") as f:
    data = json.load(f)
  assert data["num_devices"] == 8
  return data


def report_value(report: dict, name: str):
  """One check of a worker report; fails the test with the worker's traceback."""
  value = report[name]
  assert not (isinstance(value, str) and value.startswith("error")), value
  return value


class WorkerReport:
  """Collects a multi-device worker's checks: ``@report.check("name")`` runs a function."""

  def __init__(self, out_path: str):
    self.out_path = out_path
    self.results = {"num_devices": jax.device_count()}

  def check(self, name: str):
    """Decorator: runs the function now, storing its result or its traceback."""
    def deco(fn):
      import time  # pylint: disable=g-import-not-at-top
      import traceback  # pylint: disable=g-import-not-at-top
      start = time.perf_counter()
      try:
        self.results[name] = fn()
      except Exception:  # pylint: disable=broad-except
        self.results[name] = "error: " + traceback.format_exc()[-3000:]
      # Where the worker's minutes go (read the report to keep the suite short).
      self.results.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
      return fn
    return deco

  def write(self) -> None:
    import json  # pylint: disable=g-import-not-at-top
    with open(self.out_path, "w", encoding="utf-8") as f:
      json.dump(self.results, f, indent=1)


class RunningServer:
  """A ``serving.server.Server`` on 127.0.0.1:<free port>, in a background thread with
  its own event loop (the HTTP tests' client side stays synchronous)."""

  def __init__(self, server):
    import asyncio  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    self.server = server
    self.loop = asyncio.new_event_loop()
    self.ready = threading.Event()
    self.thread = threading.Thread(target=self._main, daemon=True)
    self.thread.start()
    self.ready.wait()
    self.url = f"http://127.0.0.1:{self.port}"

  def _main(self):
    import asyncio  # pylint: disable=g-import-not-at-top
    from aiohttp import web  # pylint: disable=g-import-not-at-top
    asyncio.set_event_loop(self.loop)
    self.runner = web.AppRunner(self.server.app(), handler_cancellation=True)
    self.loop.run_until_complete(self.runner.setup())
    site = web.TCPSite(self.runner, "127.0.0.1", 0)
    self.loop.run_until_complete(site.start())
    self.port = site._server.sockets[0].getsockname()[1]  # pylint: disable=protected-access
    self.ready.set()
    self.loop.run_forever()

  def stop(self):
    import asyncio  # pylint: disable=g-import-not-at-top
    # Graceful: on_shutdown drains the engine, then the loop stops.
    asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
    self.loop.call_soon_threadsafe(self.loop.stop)
    self.thread.join()


class BigramLM:
  """A token-shifted causal LM whose logits depend only on the last real token it sees.

  At a real token t the logits are ``params["table"][t]``; at a MASK slot they are those
  of the last real token before it, so MASK slots draft what the bigram says next. It
  follows the decoders' logits-function interface (cache and ``logits_slice``) and
  compiles in a moment, so decoder tests can compare against a NumPy loop.
  """

  def __init__(self, mask_id: int):
    from blockdiff_jax.sampling import kv_cache  # pylint: disable=g-import-not-at-top
    self.mask_id = mask_id
    self.kv_spec = kv_cache.KVSpec(num_layers=1, num_kv_heads=1, head_dim=2)

  # Decoders key their compiled programs on the model: equal masks, one program.
  def __eq__(self, other):
    return isinstance(other, BigramLM) and other.mask_id == self.mask_id

  def __hash__(self):
    return hash((BigramLM, self.mask_id))

  def __call__(self, params, tokens, meta, cache=None, logits_slice=None):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from blockdiff_jax import masks  # pylint: disable=g-import-not-at-top
    kv = jnp.stack([tokens, tokens != self.mask_id], -1).astype(jnp.float32)  # [B, T, 2]
    keys, key_meta = kv, meta
    if cache is not None:
      keys = jnp.concatenate([cache["k"][0, :, :, 0], kv], 1)
      key_meta = cache["meta"].concat(meta)
    usable = masks.dense_mask(meta, key_meta) & (keys[..., 1] > 0)[:, None, :]
    last = jnp.argmax(jnp.where(usable, key_meta.positions[:, None, :], -1), axis=-1)
    logits = params["table"][jnp.take_along_axis(keys[..., 0], last, 1).astype(jnp.int32)]
    if logits_slice is not None:
      logits = logits[:, logits_slice[0]:logits_slice[0] + logits_slice[1]]
    return logits, (kv[None, :, :, None], kv[None, :, :, None]), {}


def randomized_hf_model(model):
  """``model`` (a transformers causal LM) in eval mode with random weights, norms and
  biases included (the seed is the caller's ``torch.manual_seed``), so parity tests
  exercise every parameter rather than the initialisers' ones and zeros."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.25)
  return model.eval()


def slow_block_ar(model, params, prompt, max_new, block_size, mask_id, width, eos_id=None):
  """Greedy AR of a block-diffusion model without a cache, the decoders' slow reference.

  Each token is one full forward of [prompt (block-causal over its trained blocks) ;
  generated tokens (one block each) ; MASK at q]. Returns the generated ids (np.int32),
  up to and including ``eos_id`` when it is given and produced.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from blockdiff_jax import masks  # pylint: disable=g-import-not-at-top
  fwd = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m)[0][0, -1])
  toks = np.zeros(width, np.int32)
  toks[:len(prompt)] = prompt
  pos = np.arange(width)
  for q in range(len(prompt), len(prompt) + max_new):
    clean = masks.make_meta(pos[None], block_size, masks.CLEAN,
                            np.where(pos < q, 0, -1)[None])
    clean = dataclasses.replace(clean, block_ids=jnp.asarray(
        np.where(pos < len(prompt), pos // block_size, pos)[None], jnp.int32))
    noisy = dataclasses.replace(masks.make_meta([[q]], 1, masks.NOISY),
                                block_ids=jnp.asarray([[q]], jnp.int32))
    logits = np.array(fwd(params, jnp.asarray(np.append(toks, mask_id))[None],
                          clean.concat(noisy)))
    logits[mask_id] = -np.inf
    toks[q] = int(np.argmax(logits))
    if toks[q] == eos_id:
      break
  return toks[len(prompt):q + 1]


class FakeSlotPool:
  """The bookkeeping of a ``serving.pool.SlotPool`` without a model, for engine and server
  tests: subclasses write ``advance`` (which rows' tokens become final per forward).

  ``rows`` maps a slot to [prompt length, max_tokens, tokens generated so far].
  """

  def __init__(self, model, params, decoder, slots, width, max_prompt, forwards_per_call=1):
    del model, params, max_prompt, forwards_per_call
    self.decoder, self.slots, self.width = decoder, slots, width
    self.occupied = [False] * slots
    self.rows = {}
    self.retired = 0

  @property
  def free(self):
    return self.occupied.count(False)

  @property
  def busy(self):
    return any(self.occupied)

  def admit(self, prompt, max_tokens, seed=0):
    del seed
    slot = self.occupied.index(False)
    self.occupied[slot] = True
    self.rows[slot] = [len(prompt), max_tokens, 0]
    return slot

  def retire(self, slot):
    self.occupied[slot] = False
    self.retired += 1

  def release(self, slot):
    self.occupied[slot] = False

  def warmup(self):
    pass


def sgd_steps_by_accumulation(cfg, row_scores, accums=(1, 2)):
  """One train step of ``cfg``'s model per ``grad_accum_steps`` in ``accums``, on the
  same batch, key and starting params, for gradient-accumulation tests.

  The batch is [len(row_scores), cfg.data.seq_len] random bytes whose row r scores its
  first ``row_scores[r]`` tokens. Plain SGD at learning rate 1, so the update is the
  gradient itself (Adam's first update is about lr * sign(g), which float noise flips
  wherever a gradient is ~0).

  Returns:
    (the starting params, [(state, metrics) per entry of ``accums``]).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from blockdiff_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.model import build  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from blockdiff_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  model, tok = build.build_model(cfg)
  obj = config_lib.objective(cfg, tok.mask_id)
  tx, lr = optax.sgd(1.0), optax.constant_schedule(1.0)
  params = build.init_params(model, 0)
  rows, length = len(row_scores), cfg.data.seq_len
  scored = jnp.array(row_scores)[:, None] > jnp.arange(length)[None]
  batch = {"tokens": jax.random.randint(jax.random.key(0), (rows, length), 0, 256),
           "loss_mask": scored.astype(jnp.float32),
           "segment_ids": jnp.zeros((rows, length), jnp.int32)}
  outs = []
  for accum in accums:
    step = jax.jit(step_lib.make_train_step(build.make_apply(model), obj, tx, lr, accum))
    outs.append(step(state_lib.create(params, tx, False), batch, jax.random.key(1)))
  return params, outs
