"""Sharded init, train step, sampling forward and resharding checkpoints on 8 CPU devices.

The checks run in one subprocess that sees 8 simulated devices
(``--xla_force_host_platform_device_count=8``), so the rest of the suite keeps
one device; each pytest test below asserts on one part of its JSON report.
"""

import os
import sys

if __name__ == "__main__":
  # Must precede the first jax import of the worker process.
  # Keeps the flags the suite gives (conftest), adding the simulated devices.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"

import pytest

from conftest import report_value
from conftest import run_multidevice_worker
from conftest import WorkerReport

# One xdist worker takes all of this module's tests (pytest.ini: --dist loadfile), so
# the other never sits waiting on the report while the subprocess runs.
pytestmark = pytest.mark.xdist_group("sharding_train_worker")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ((8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2))
# One Explicit mesh for the train step (every axis but data); "decode" runs (2, 2, 2, 1).
EXPLICIT_MESHES = ((1, 2, 2, 2),)
VOCAB, MASK_ID = 128, 127


def _worker(out_path: str, tmp: str) -> None:
  """Runs every check and writes {check: result or "error: ..."} to out_path."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from blockdiff_jax import config as config_lib
  from blockdiff_jax import masks
  from blockdiff_jax.model import transformer
  from blockdiff_jax.sampling import decoder
  from blockdiff_jax.sampling import layout
  from blockdiff_jax.sampling import policies
  from blockdiff_jax.sampling import sample
  from blockdiff_jax.checkpoint import checkpoints
  from blockdiff_jax.checkpoint import inference
  from blockdiff_jax.model import build
  from blockdiff_jax.model import mesh as mesh_lib
  from blockdiff_jax.model import sharding
  from blockdiff_jax.train import state as state_lib
  from blockdiff_jax.train import step as step_lib
  from blockdiff_jax.train import trainer
  sys.path.insert(0, REPO)
  from configs import tiny  # pylint: disable=g-import-not-at-top

  report = WorkerReport(out_path)
  check = report.check

  config = tiny.get_config()
  # One block: the checks compare sharded programs with one device, and a second block
  # repeats the first's rules and collectives at twice the compile time (most of a check).
  config.model.num_layers = 1
  config.model.vocab_size = VOCAB
  config.mesh = mesh_lib.default_mesh_config()
  model = transformer.Transformer(config_lib.model_config(config))
  obj = config_lib.objective(config, MASK_ID)
  # SGD, not AdamW: Adam's first update is ~lr*sign(g), which turns fp32 noise in
  # near-zero gradients into lr-sized differences; SGD keeps them proportional.
  sgd = optax.sgd(0.5)
  lr = optax.constant_schedule(0.5)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, MASK_ID, (8, 64)).astype(np.int32),
           "loss_mask": np.ones((8, 64), np.float32)}
  base_rng = jax.random.key(1)

  def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  def set_mesh(sizes):
    for axis, size in zip(mesh_lib.MESH_AXES, sizes):
      config.mesh[axis] = size

  # A one-block decoder model with a byte tokenizer, 2 heads and 1 KV head.
  dec_config = config_lib.base_config()
  dec_config.model.update(d_model=32, num_heads=2, num_kv_heads=1, head_dim=16)
  dec_config.model.moe.expert_dim = 32
  dec_config.model.num_layers = 1
  dec_model, dec_tok = build.build_model(dec_config)
  dec_params = build.init_params(dec_model, 0)

  ref_params = build.init_params(model, config.seed)
  ref_step = jax.jit(step_lib.make_train_step(build.make_apply(model), obj, sgd, lr))
  ref_state, ref_metrics = ref_step(state_lib.create(ref_params, sgd, False), batch, base_rng)
  ref_eval = jax.jit(step_lib.make_eval_step(build.make_apply(model), obj))(
      ref_state.params, batch, base_rng)
  states = {}

  for sizes in MESHES:
    @check(f"train/{sizes}")
    def _(sizes=sizes):
      set_mesh(sizes)
      mesh = mesh_lib.make_mesh(config.mesh)
      sharded = step_lib.make_sharded_train(config, mesh, model, obj, tx=sgd, lr_schedule=lr)
      state = sharded.init_state(config.seed)
      init_diff = max_diff(state.params, ref_params)
      state, metrics = sharded.train_step(state, sharded.put_batch(batch), base_rng)
      states[sizes] = (sharded, state)
      return {"init_diff": init_diff,
              "loss": float(metrics["loss"]), "ref_loss": float(ref_metrics["loss"]),
              "grad_norm": float(metrics["grad_norm"]),
              "ref_grad_norm": float(ref_metrics["grad_norm"]),
              "param_diff": max_diff(state.params, ref_state.params)}

  for sizes in EXPLICIT_MESHES:
    @check(f"explicit/{sizes}")
    def _(sizes=sizes):
      # The same step on a mesh with Explicit axes (sharding in types, JAX's default).
      set_mesh(sizes)
      config.mesh.axis_types = "explicit"
      try:
        mesh = mesh_lib.make_mesh(config.mesh)
        sharded = step_lib.make_sharded_train(config, mesh, model, obj, tx=sgd,
                                                  lr_schedule=lr)
        state = sharded.init_state(config.seed)
        state, metrics = sharded.train_step(state, sharded.put_batch(batch), base_rng)
        eval_metrics = sharded.eval_step(state.params, sharded.put_batch(batch), base_rng)
      finally:
        config.mesh.axis_types = "auto"
      typed = {checkpoints._path_str(p): str(jax.typeof(x).sharding.spec)  # pylint: disable=protected-access
               for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
      return {"axis_types": [t.name for t in mesh.axis_types],
              "loss": float(metrics["loss"]), "ref_loss": float(ref_metrics["loss"]),
              "param_diff": max_diff(state.params, ref_state.params),
              "eval_nelbo": float(eval_metrics["nelbo"]),
              "ref_eval_nelbo": float(ref_eval["nelbo"]),
              "wi_gate_type": typed["layer_0/moe/wi_gate"],
              "embedding_type": typed["embed/embedding"]}

  @check("lora_explicit")
  def _():
    # LoRA with gradient accumulation on Explicit axes with tensor=2: the adapters'
    # x A contracts a tensor-split input (it raised ShardingTypeError).
    import ml_collections  # pylint: disable=g-import-not-at-top
    from blockdiff_jax.train import optimizer  # pylint: disable=g-import-not-at-top
    lcfg = ml_collections.ConfigDict(config.to_dict())
    lcfg.model.lora.update(rank=4, gated=False)
    lcfg.train.update(trainable="lora", grad_accum_steps=2)
    lmodel = transformer.Transformer(config_lib.model_config(lcfg))
    one = jax.jit(step_lib.make_train_step(build.make_apply(lmodel), obj, sgd, lr, 2,
                                           trainable_mask=optimizer.mask_fn("lora")))
    want, want_m = one(state_lib.create(build.init_params(lmodel, lcfg.seed), sgd, False),
                       batch, base_rng)
    lcfg.mesh.update(data=1, fsdp=2, expert=2, tensor=2, axis_types="explicit")
    sharded = step_lib.make_sharded_train(lcfg, mesh_lib.make_mesh(lcfg.mesh), lmodel, obj,
                                          tx=sgd, lr_schedule=lr)
    state, metrics = sharded.train_step(sharded.init_state(lcfg.seed),
                                        sharded.put_batch(batch), base_rng)
    return {"loss": float(metrics["loss"]), "ref_loss": float(want_m["loss"]),
            "param_diff": max_diff(state.params, want.params)}

  @check("decode")
  def _():
    # The whole jitted block decoder (prefill, KV cache, while_loop, policy) with
    # sharded params, on Auto and Explicit meshes, against one device.
    prompts = ["<|bos|>hello world, this", "<|bos|>ab", "<|bos|>def f(x):", "<|bos|>import"] * 2
    ids = [layout.parse(dec_tok, p).ids for p in prompts]
    canvas = layout.generation_canvas(ids, 20, 8, dec_tok.mask_id, 64, 48)
    opt = decoder.DecodeOptions(block_size=8, mask_id=dec_tok.mask_id, eos_id=dec_tok.eos_id,
                                policy=policies.Threshold(0.05))
    ref = decoder.decode(dec_model, dec_params, canvas, opt, prefill_width=16)
    out = {"ref_nfe": ref["nfe"].tolist()}
    set_mesh((2, 2, 2, 1))
    for kind in ("auto", "explicit"):
      config.mesh.axis_types = kind
      mesh = mesh_lib.make_mesh(config.mesh)
      config.mesh.axis_types = "auto"
      rules = mesh_lib.logical_rules(config.mesh)
      params = jax.device_put(dec_params, mesh_lib.param_shardings(
          build.abstract_params(dec_model), mesh, rules))
      with mesh_lib.mesh_context(mesh, rules):
        got = decoder.decode(dec_model, params, canvas, opt, prefill_width=16)
      out[kind] = {"tokens_equal": bool((got["tokens"] == ref["tokens"]).all()),
                   "nfe": got["nfe"].tolist()}
    return out

  @check("cli")
  def _():
    # train.run on an explicit 2x2x2 mesh, then sample.run: params-only restore onto
    # the mesh, sharded decoding; the same samples as one device reading the same run.
    run_config = tiny.get_config()
    run_config.model.num_layers = 1
    run_config.data.max_bytes = 40_000
    run_config.train.update(steps=2, log_every=1, eval_every=0, checkpoint_every=2,
                            async_checkpoints=False, tensorboard=False)
    run_config.mesh = mesh_lib.default_mesh_config()
    run_config.mesh.update(data=2, fsdp=2, expert=2, tensor=1, axis_types="explicit")
    run_config.sample = sample.default_sample_config()
    run_config.sample.update(prompts="<|bos|>def;<|bos|>import os", max_new_tokens=16,
                             stream=False, policy="threshold")
    workdir = os.path.join(tmp, "cli")
    metrics = trainer.run(run_config, workdir)
    sharded_rows = sample.run(run_config, workdir)
    one_device = run_config.copy_and_resolve_references()
    del one_device.mesh
    rows = sample.run(one_device, workdir)
    _, _, _, params = inference.load_for_inference(workdir, run_config)
    return {"loss": float(metrics["loss"]),
            "same_samples": [a["completion"] == b["completion"]
                             for a, b in zip(sharded_rows, rows)],
            "n": len(rows), "n_sharded": len(sharded_rows),
            "wi_gate_devices": len(params["layer_0"]["moe"]["wi_gate"].sharding.device_set),
            "wi_gate_spec": str(params["layer_0"]["moe"]["wi_gate"].sharding.spec)}

  @check("specs")
  def _():
    set_mesh((1, 2, 2, 2))
    mesh = mesh_lib.make_mesh(config.mesh)
    sharded = step_lib.make_sharded_train(config, mesh, model, obj)  # AdamW.
    state = sharded.init_state(config.seed)
    specs = lambda tree: {checkpoints._path_str(p): str(x.sharding.spec)  # pylint: disable=protected-access
                          for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    adam = state.opt_state[1][0]
    non_param = [str(x.sharding.spec) for x in (state.step, adam.count)]
    return {"params": specs(state.params), "mu": specs(adam.mu), "nu": specs(adam.nu),
            "non_param": non_param,
            "rules": {checkpoints._path_str(p): str(sharding.fit_spec(s, x.shape, mesh))  # pylint: disable=protected-access
                      for (p, s), x in zip(
                          jax.tree_util.tree_leaves_with_path(
                              mesh_lib.param_specs(build.abstract_params(model),
                                                       sharded.rules),
                              is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)),
                          jax.tree.leaves(state.params))}}

  @check("sampling_forward")
  def _():
    # Prompt -> KV cache, then one noisy block attending to it, sharded vs one device.
    sharded, state = states[(2, 2, 2, 1)]
    params = state.params
    prompt = jnp.asarray(batch["tokens"][:, :16])
    block = jnp.full((8, 8), MASK_ID, jnp.int32)
    pmeta = masks.make_meta(jnp.broadcast_to(jnp.arange(16), (8, 16)), 8, masks.CLEAN)
    bmeta = masks.make_meta(jnp.broadcast_to(jnp.arange(16, 24), (8, 8)), 8, masks.NOISY)

    def sample_fn(params, prompt, block):
      _, aux = model.apply({"params": params}, prompt, pmeta, return_kv=True)
      cache = {"k": aux["kv"][0], "v": aux["kv"][1], "meta": pmeta}
      return model.apply({"params": params}, block, bmeta, cache=cache)[0]

    with sharded.context():
      logits = jax.jit(sample_fn, in_shardings=(sharded.param_sharding, sharded.batch_sharding,
                                                sharded.batch_sharding))(params, prompt, block)
    ref = jax.jit(sample_fn)(jax.device_get(params), prompt, block)
    return {"diff": max_diff(logits, ref), "spec": str(logits.sharding.spec)}

  @check("checkpoint_reshard")
  def _():
    out = {}
    cases = {"8->1": ((1, 8, 1, 1), (1, 1, 1, 1)), "2x4->4x2": ((1, 2, 1, 4), (1, 4, 1, 2))}
    for name, (src, dst) in cases.items():
      set_mesh(src)
      src_mesh = mesh_lib.make_mesh(config.mesh)
      src_train = step_lib.make_sharded_train(config, src_mesh, model, obj)
      # A fresh state (no train step: that would cost a compile per source mesh).
      state = src_train.init_state(config.seed)
      directory = os.path.join(tmp, name)
      ckpt = checkpoints.Checkpointer(directory, use_async=False)
      ckpt.save(1, state, {"index": 1})
      set_mesh(dst)
      n = int(np.prod(dst))
      dst_mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:n])
      dst_train = step_lib.make_sharded_train(config, dst_mesh, model, obj)
      restored, data = ckpt.restore(dst_train.abstract_state)
      ckpt.close()
      params_only = checkpoints.restore_params(
          directory, jax.tree.map(lambda a: a, dst_train.abstract_state.params))
      out[name] = {
          "state_diff": max_diff(restored, state), "data": data,
          "devices": len(jax.tree.leaves(restored.params)[0].sharding.device_set),
          "spec_ok": all(r.sharding == s for r, s in zip(
              jax.tree.leaves(restored), jax.tree.leaves(dst_train.state_sharding))),
          "params_diff": max_diff(params_only, state.params),
          "params_spec_ok": all(r.sharding == s for r, s in zip(
              jax.tree.leaves(params_only), jax.tree.leaves(dst_train.param_sharding)))}
    # A config whose shapes differ from the checkpoint must name the path and both shapes.
    bad = config.copy_and_resolve_references()
    bad.model.moe.expert_dim = 32
    bad_model = transformer.Transformer(config_lib.model_config(bad))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            __import__("flax").linen.unbox(
                                build.abstract_params(bad_model)))
    try:
      checkpoints.restore_params(os.path.join(tmp, "8->1"), abstract)
      out["mismatch"] = "no error"
    except ValueError as e:
      out["mismatch"] = str(e)
    return out

  @check("kv_commit_collectives")
  def _():
    # A batch-sharded cache commits each row on its own device: no gather of the update.
    from blockdiff_jax.sampling import kv_cache  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    spec = kv_cache.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype=jnp.bfloat16)
    rows5, rows1 = NamedSharding(mesh, P(None, "data")), NamedSharding(mesh, P("data"))
    cache = kv_cache.KVCache.empty(spec, 8, 64, 16, 16)
    cache = cache.replace(k=jax.device_put(cache.k, rows5), v=jax.device_put(cache.v, rows5))
    kv = jax.device_put(jnp.ones((2, 8, 16, 2, 8), jnp.float32), rows5)
    start = jax.device_put(jnp.arange(8, dtype=jnp.int32) * 8, rows1)
    write = jax.device_put(jnp.arange(8) % 3 != 1, rows1)
    commit = jax.jit(lambda c, kv, s, w: c.commit(kv, kv, s, w))
    hlo = commit.lower(cache, kv, start, write).compile().as_text()
    out = commit(cache, kv, start, write)
    filled = np.asarray(out.k.astype(jnp.float32)).sum(axis=(0, 3, 4)) != 0  # [B, slots]
    want = np.zeros_like(filled)
    for b in range(8):
      if b % 3 != 1:
        want[b, 8 * b:min(8 * b + 16, 64)] = True  # Past the capacity: dropped.
    return {"all_gathers": hlo.count("all-gather("), "spec": str(out.k.sharding.spec),
            "slots_right": bool((filled == want).all())}

  report.write()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  return run_multidevice_worker(__file__, tmp_path_factory, "sharding")


_get = report_value


@pytest.mark.parametrize("sizes", MESHES, ids=["8x1x1x1", "2x2x2x1", "1x2x2x2"])
def test_train_step_matches_one_device(report, sizes):
  r = _get(report, f"train/{sizes}")
  assert r["init_diff"] == 0.0  # The partitionable PRNG gives the same init in shards.
  assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-5)
  assert r["grad_norm"] == pytest.approx(r["ref_grad_norm"], rel=1e-5)
  assert r["param_diff"] < 1e-5


@pytest.mark.parametrize("sizes", EXPLICIT_MESHES, ids=["1x2x2x2"])
def test_train_step_on_explicit_axes_matches_one_device(report, sizes):
  r = _get(report, f"explicit/{sizes}")
  assert r["axis_types"] == ["Explicit"] * 4
  assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-5)
  assert r["param_diff"] < 1e-5
  assert r["eval_nelbo"] == pytest.approx(r["ref_eval_nelbo"], rel=1e-5)
  # The updated params carry their rule's sharding in their type.
  assert r["wi_gate_type"] == "P('expert', 'fsdp', 'tensor')"
  assert r["embedding_type"] == "P('tensor', 'fsdp')"


def test_lora_accumulation_on_a_tensor_split_explicit_mesh_matches_one_device(report):
  r = _get(report, "lora_explicit")
  assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-5)
  assert r["param_diff"] < 1e-5


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_sharded_decoder_matches_one_device(report, kind):
  r = _get(report, "decode")
  assert r[kind]["tokens_equal"]
  assert r[kind]["nfe"] == r["ref_nfe"]


def test_train_then_sample_cli_on_a_mesh(report):
  r = _get(report, "cli")
  assert r["loss"] > 0 and r["n"] == r["n_sharded"] == 2
  assert all(r["same_samples"])
  # Inference params were restored onto the 8-device mesh, experts split.
  assert r["wi_gate_devices"] == 8
  assert r["wi_gate_spec"] == "P('expert', 'fsdp', 'tensor')"


def test_param_and_optimizer_shardings_follow_rules(report):
  r = _get(report, "specs")
  assert r["params"] == r["rules"]
  assert r["mu"] == r["params"] and r["nu"] == r["params"]
  assert r["non_param"] == ["P()", "P()"]  # Step and Adam count: replicated.
  p = r["params"]
  assert p["embed/embedding"] == "P('tensor', 'fsdp')"
  assert p["layer_0/moe/wi_gate"] == "P('expert', 'fsdp', 'tensor')"
  assert p["layer_0/moe/wo"] == "P('expert', 'tensor', 'fsdp')"
  assert p["layer_0/moe/router"] == "P('fsdp', 'expert')"
  assert p["layer_0/attention/query/DenseGeneral_0/kernel"] == "P('fsdp', 'tensor', None)"
  assert p["layer_0/attention/out/DenseGeneral_0/kernel"] == "P('tensor', None, 'fsdp')"
  assert p["layer_0/attn_norm/scale"] == "P('fsdp',)"


def test_sharded_sampling_forward_with_kv_cache(report):
  r = _get(report, "sampling_forward")
  assert r["diff"] < 1e-4
  assert r["spec"] != "P()"  # The logits stay batch-sharded.


def test_batch_sharded_kv_commit_gathers_nothing(report):
  r = _get(report, "kv_commit_collectives")
  assert r["slots_right"] and r["all_gathers"] == 0, r
  assert "data" in r["spec"]


@pytest.mark.parametrize("case", ["8->1", "2x4->4x2"])
def test_checkpoint_restores_onto_other_mesh(report, case):
  r = _get(report, "checkpoint_reshard")[case]
  assert r["state_diff"] == 0.0 and r["spec_ok"]
  assert r["data"] == {"index": 1}
  assert r["devices"] == (1 if case == "8->1" else 8)
  assert r["params_diff"] == 0.0 and r["params_spec_ok"]


def test_restore_params_names_mismatched_shape(report):
  msg = _get(report, "checkpoint_reshard")["mismatch"]
  assert "layer_0/moe/wi_gate" in msg or "moe/wi_gate" in msg, msg
  assert "(4, 64, 64)" in msg and "(4, 64, 32)" in msg, msg


if __name__ == "__main__":
  _worker(sys.argv[1], sys.argv[2])
