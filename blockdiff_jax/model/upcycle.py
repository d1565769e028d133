"""Sparse upcycling: every dense SwiGLU MLP becomes E identical experts plus a new router.

With the top-k combine weights renormalised to sum to 1 (``normalize_topk``), any
routing of a token mixes k copies of the same MLP, so at initialisation the upcycled
model computes exactly the dense model's function; fine-tuning then lets the experts
drift apart (Komatsuzaki et al., sparse upcycling). The router is new: small random
weights, so the first steps already route tokens differently. The equality needs a
dropless dispatch: with ``model.moe.capacity_factor`` > 0 under expert parallelism, token
copies beyond an expert's capacity are dropped, and their share of the MLP with them.
"""

import collections.abc
import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from blockdiff_jax.model import lora as lora_lib
from blockdiff_jax.model import moe as moe_lib

Array = Any

# LoRA targets inside the dense MLP; the experts that replace it carry no adapters.
MLP_TARGETS = ("gate", "up", "down")


# MoE layout fields upcycling cannot honour, with the only value it accepts: every dense
# MLP becomes the experts of its layer, and a new shared expert would change the function.
FIXED_FIELDS = (("moe_every", 1), ("first_dense_layers", 0), ("shared_expert_dim", 0),
                ("shared_expert_gate", False))


def check_layout(moe_section: ml_collections.ConfigDict) -> None:
  """Refuses a ``config.model.moe`` layout that upcycling would silently replace.

  Raises:
    ValueError: naming the first field of ``FIXED_FIELDS`` off its accepted value.
  """
  for name, value in FIXED_FIELDS:
    got = moe_section.get(name, value)
    if got != value:
      raise ValueError(f"model.moe.{name}={got!r} cannot be kept by "
                       "model.moe.upcycle_from_dense=True: every dense MLP becomes an MoE "
                       f"layer and no shared expert is added; set it to {value!r}")


def upcycle_model_config(model: ml_collections.ConfigDict, num_experts: int) -> None:
  """Turns a dense ``config.model`` into its upcycled MoE twin, in place.

  Every layer becomes MoE (no leading dense layers, no shared expert) with experts as
  wide as the dense MLP; ``top_k`` and the routing options stay as configured. A layout
  asking otherwise is refused (``check_layout``) rather than overwritten.
  """
  check_layout(model.moe)
  if num_experts < 1:
    raise ValueError(f"model.moe.num_experts must be >= 1 to upcycle, got {num_experts}")
  if model.moe.top_k > num_experts:
    raise ValueError(f"model.moe.top_k={model.moe.top_k} > num_experts={num_experts}")
  if not model.moe.normalize_topk:
    raise ValueError("upcycling keeps the dense function only with model.moe.normalize_topk=True")
  with model.unlocked():
    model.moe.num_experts = num_experts
    model.moe.expert_dim = model.mlp_dim


def _moe_of_mlp(mlp: dict, num_experts: int, rng: Array, router_std: float) -> dict:
  """{gate, up, down} kernels ([..., d, f], [..., f, d]) -> MoE params with E copies."""
  wg = jnp.asarray(mlp["gate"]["DenseGeneral_0"]["kernel"])
  wu = jnp.asarray(mlp["up"]["DenseGeneral_0"]["kernel"])
  wd = jnp.asarray(mlp["down"]["DenseGeneral_0"]["kernel"])
  lead = wg.shape[:-2]  # () per layer, (n,) for a scanned stack.
  d = wg.shape[-2]
  copies = lambda w: jnp.broadcast_to(
      jnp.expand_dims(w, len(lead)), lead + (num_experts,) + w.shape[len(lead):]).astype(w.dtype)
  router = router_std * jax.random.normal(rng, lead + (d, num_experts), jnp.float32)
  return {"router": router, "wi_gate": copies(wg), "wi_up": copies(wu), "wo": copies(wd)}


def upcycle_params(params: dict, num_experts: int, seed: int = 0,
                   router_std: float = 0.02) -> dict:
  """Replaces every ``mlp`` subtree (per layer or per scanned stack) with ``moe``.

  Args:
    params: unboxed params of a dense Transformer (layers ``layer_i`` or ``stack_s``).
    num_experts: E.
    seed: seed of the new routers (one key per layer/stack).
    router_std: standard deviation of the new router weights.

  Raises:
    ValueError: when the params hold no dense MLP, or an MLP holds LoRA adapters (the
      experts would silently lose them; ``upcycle`` folds plain ones first), for
      ``num_experts`` not an integer >= 1, or ``router_std`` not finite and >= 0.
  """
  # Zero experts gave empty expert weights silently, 2.5 a broadcasting error naming no
  # argument; a NaN or infinite std gave NaN router logits and a NaN model.
  if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral) or (
      num_experts < 1):
    raise ValueError(f"upcycle_params: num_experts must be an integer >= 1, got {num_experts!r}")
  if not (isinstance(router_std, numbers.Real) and math.isfinite(router_std)
          and router_std >= 0):
    raise ValueError(f"upcycle_params: router_std must be finite and >= 0, got {router_std!r}")
  out, n = {}, 0
  rng = jax.random.key(seed)
  for name, sub in params.items():
    # Any mapping: params frozen by flax (FrozenDict) are not dicts, and skipping their
    # layers ended in "no dense 'mlp' layer (already MoE?)".
    if isinstance(sub, collections.abc.Mapping) and "mlp" in sub:
      sub = dict(sub)
      mlp = sub.pop("mlp")
      if any(lora_lib.is_lora_path(path)
             for path, _ in jax.tree_util.tree_flatten_with_path(mlp)[0]):
        raise ValueError(f"upcycle_params: the dense MLP of {name!r} holds LoRA adapters; "
                         "fold them into its kernels first (lora.merge_adapters)")
      sub["moe"] = _moe_of_mlp(mlp, num_experts, jax.random.fold_in(rng, n), router_std)
      n += 1
    out[name] = sub
  if not n:
    raise ValueError("upcycle_params: no dense 'mlp' layer in the params (already MoE?)")
  return out


def _check_mlp_dims(params: dict, cfg: Any) -> None:
  """Refuses dense MLPs that are not [d_model, mlp_dim] / [mlp_dim, d_model].

  The experts' width comes from ``cfg.mlp_dim``: params of another model were upcycled
  silently and the MoE model failed only at its first forward, on a parameter shape.
  """
  want = {"gate": (cfg.d_model, cfg.mlp_dim), "up": (cfg.d_model, cfg.mlp_dim),
          "down": (cfg.mlp_dim, cfg.d_model)}
  for name, sub in params.items():
    if not (isinstance(sub, collections.abc.Mapping) and "mlp" in sub):
      continue
    for target, shape in want.items():
      got = tuple(jnp.shape(sub["mlp"][target]["DenseGeneral_0"]["kernel"])[-2:])
      if got != shape:
        raise ValueError(f"upcycle: the {target} kernel of {name!r} is {got}, but the "
                         f"config gives (model.d_model={cfg.d_model}, model.mlp_dim="
                         f"{cfg.mlp_dim}) -> {shape}; pass the config of these params")


def upcycle(params: dict, cfg: Any, num_experts: int, top_k: int, seed: int = 0,
            router_std: float = 0.02) -> tuple[dict, Any]:
  """(params, TransformerConfig) of the upcycled model of a dense ``cfg``.

  ``cfg`` is a ``transformer.TransformerConfig``; the MoE uses the ``dense`` dispatch
  default of ``moe_lib.MoEConfig`` otherwise (impl ragged_dot) and token routing.
  Plain LoRA adapters on the MLP are folded into its kernels before they are copied
  into the experts (so the upcycled model still computes the adapted function), and the
  MLP targets leave ``cfg.lora``; attention adapters are kept as they are.

  Raises:
    ValueError: for a MoE ``cfg``, dense MLP kernels of other dims than ``cfg``'s
      (``d_model``, ``mlp_dim``), or gated LoRA adapters on the MLP (they act only on
      MASK tokens, so no expert kernel reproduces them).
  """
  if cfg.moe is not None:
    raise ValueError(f"upcycle: the model is already MoE (model.moe.num_experts="
                     f"{cfg.moe.num_experts}); upcycling takes a dense model")
  _check_mlp_dims(params, cfg)
  lora_cfg = cfg.lora
  if lora_cfg is not None and any(lora_cfg.has(t) for t in MLP_TARGETS):
    if lora_cfg.gated:
      raise ValueError(f"upcycle: gated LoRA adapters on the MLP (model.lora.targets="
                       f"{lora_cfg.targets!r}) cannot be folded into the experts")
    params = {name: ({**sub, "mlp": lora_lib.merge_adapters(sub["mlp"], lora_cfg)}
                     if isinstance(sub, collections.abc.Mapping) and "mlp" in sub
                     else sub)
              for name, sub in params.items()}
    kept = tuple(t for t in lora_cfg.targets if t not in MLP_TARGETS)
    lora_cfg = dataclasses.replace(lora_cfg, targets=kept) if kept else None
  # block_min_experts must lie in [top_k, E]: MoEConfig's default (2) is kept where it fits,
  # else clamped (top_k > 2, or a single expert).
  min_experts = min(max(top_k, moe_lib.MoEConfig.block_min_experts), num_experts)
  moe_cfg = moe_lib.MoEConfig(num_experts=num_experts, top_k=top_k, expert_dim=cfg.mlp_dim,
                              normalize_topk=True, block_min_experts=min_experts)
  new_cfg = dataclasses.replace(cfg, moe=moe_cfg, moe_every=1, first_dense_layers=0,
                                lora=lora_cfg)
  return upcycle_params(params, num_experts, seed, router_std), new_cfg
