"""All checkpoint I/O, on Orbax's CheckpointManager: the train state, the data position,
the parameters alone for inference, and the run's config.

A checkpoint step holds two items: ``state`` (the TrainState pytree, restored onto
the shardings of an abstract target) and ``data`` (the JSON position of the data
iterator), so a resumed run continues with exactly the batches it would have seen.
Orbax lists the steps; nothing here reads the step folders by hand.

Integrity: Orbax/TensorStore report missing or truncated files and unreadable metadata,
but a flipped byte inside an uncompressed array chunk restores as a silently different
number. So every save also records a fingerprint of each array (a position-weighted sum
of its bits, computed on the devices) in the ``data`` item, and a restore recomputes and
compares it. A checkpoint that fails either check is skipped: the newest one that
restores is used, and what was skipped and why is printed.
"""

import glob
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from blockdiff_jax.model import config as model_config_lib

STATE, DATA = "state", "data"
FINGERPRINT = "_array_fingerprints"  # Key of the fingerprints in the ``data`` item.


class CorruptCheckpointError(RuntimeError):
  """A checkpoint step cannot be restored faithfully (missing/garbled files or data)."""


class IncompatibleCheckpointError(ValueError):
  """The checkpoint holds other parameter shapes than the config asks for."""


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:  # bitcast_convert_type refuses bool (a flag in an optax state).
    x = x.astype(jnp.uint8)
  bits = jax.lax.bitcast_convert_type(
      x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]).astype(jnp.uint32)
  # Odd weights are invertible mod 2**32: any change of one element changes the sum.
  weights = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape) * 2 + 1
  return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree: Any) -> Any:
  return jax.tree.map(_leaf_fingerprint, tree)


def fingerprints(tree: Any) -> dict[str, int]:
  """``{path: uint32 fingerprint}`` of every array leaf of ``tree`` (PRNG keys skipped)."""
  leaves = {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)
            if hasattr(x, "dtype") and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
            and x.dtype.itemsize in (1, 2, 4)}
  return {k: int(v) for k, v in jax.device_get(_fingerprints(leaves)).items()}


def verify_fingerprints(tree: Any, data_state: dict | None, prefix: str = "") -> None:
  """Raises CorruptCheckpointError when a restored array differs from what was saved.

  Args:
    tree: the restored arrays.
    data_state: the ``data`` item saved with them (checkpoints written before
      fingerprints existed have none: nothing to compare).
    prefix: path of ``tree`` inside the saved state (e.g. ``"params/"``).
  """
  saved = (data_state or {}).get(FINGERPRINT)
  if not saved:
    return
  for path, got in fingerprints(tree).items():
    want = saved.get(prefix + path)
    if want is not None and int(want) != got:
      raise CorruptCheckpointError(f"array {prefix + path} differs from the one saved "
                                   f"(fingerprint {got} != {want})")


# Failures of the machine, not of a checkpoint's files: another step would fail alike;
# then the same as the status codes TensorStore and XLA begin their messages with.
_ENVIRONMENT_ERRORS = (MemoryError, ImportError, PermissionError, TimeoutError,
                       ConnectionError, InterruptedError)
_ENVIRONMENT_CODES = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                      "DEADLINE_EXCEEDED", "UNAUTHENTICATED")


def is_environment_error(error: BaseException) -> bool:
  """Whether ``error`` (or an error it was raised from) is the machine's, not the files'."""
  seen = 0
  while error is not None and seen < 8:
    if isinstance(error, _ENVIRONMENT_ERRORS):
      return True
    # The code may follow a wrapper's words ("Failed to restore ...: RESOURCE_EXHAUSTED:").
    first = str(error).lstrip().split("\n", 1)[0]
    if first.startswith(_ENVIRONMENT_CODES) or any(f"{c}:" in first
                                                   for c in _ENVIRONMENT_CODES):
      return True
    # Raised from it, or while handling it (an Orbax wrapper without ``from``).
    error, seen = error.__cause__ or error.__context__, seen + 1
  return False


def _restore_newest(directory: str, steps: list[int], restore_step: Callable[[int], Any],
                    explicit: bool) -> tuple[int, Any]:
  """Restores the newest of ``steps`` that restores; says which were skipped and why.

  ``IncompatibleCheckpointError`` is raised at once (every step shares the config), and so
  is an error of the machine rather than of the files (``is_environment_error``: no
  permission, out of memory, a missing module, a storage timeout): an older step would
  fail alike or, worse, restore, and the healthy newer steps would be set aside as
  corrupt and overwritten. Any other failure counts as corruption. With ``explicit``
  (the caller asked for one step) nothing falls back.
  """
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  failures = []
  for step in sorted(steps, reverse=True):
    try:
      result = restore_step(step)
    except IncompatibleCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if is_environment_error(e):
        e.add_note(f"restoring checkpoint step {step} in {directory}: an error of the "
                   "machine, not of the checkpoint, so no older step was tried")
        raise
      reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
      failures.append((step, reason))
      if explicit:
        break
      print(f"checkpoint step {step} in {directory} does not restore ({reason}); "
            f"trying an older one", flush=True)
      continue
    if failures:
      print(f"restored checkpoint step {step} instead of step {failures[0][0]} (newer "
            f"steps are corrupt: {[s for s, _ in failures]})", flush=True)
    return step, result
  if explicit:
    raise CorruptCheckpointError(f"checkpoint step {failures[0][0]} in {directory} does not "
                                 f"restore: {failures[0][1]}")
  raise CorruptCheckpointError(
      f"no checkpoint in {directory} restores: " +
      "; ".join(f"step {s}: {r}" for s, r in failures))


def _no_step(directory: str, step: int, steps: Any) -> FileNotFoundError:
  """The error for a ``step`` that is not among the finished ``steps``, naming the folder of
  an unfinished save of it (a save cut short, or one still being written) if there is one."""
  unfinished = sorted(glob.glob(os.path.join(glob.escape(directory),
                                             f"{step}{ocp.utils.TMP_DIR_SUFFIX}*")))
  why = (f"; its save never finished: {unfinished[0]} is a save cut short or still being "
         "written" if unfinished else "")
  return FileNotFoundError(f"no step {step} in {directory} (it has {sorted(steps)}){why}")


class Checkpointer:
  """Saves on demand (the trainer decides when), keeps K, optionally in the background.

  Args:
    directory: the run's ``checkpoints`` folder.
    keep: how many of the newest steps to keep.
    use_async: write in a background thread.
    remove_unfinished: delete the temporary folders (``<step>.orbax-checkpoint-tmp*``)
      of saves that a crash or ``kill -9`` cut short. They hold a checkpoint's worth of
      data, and Orbax reuses one only when that step is saved again, which an
      interrupted step's never is. Only the run that holds the workdir may pass True:
      another process's save in progress would be deleted.
  """

  def __init__(self, directory: str, keep: int = 1, use_async: bool = True,
               remove_unfinished: bool = False):
    self.directory = os.path.abspath(directory)
    self._closed = False
    if remove_unfinished and jax.process_index() == 0:
      # Before the manager starts: the primary process makes every step folder.
      self._remove_unfinished()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=use_async, create=True))

  def _remove_unfinished(self) -> None:
    pattern = os.path.join(glob.escape(self.directory), "*" + ocp.utils.TMP_DIR_SUFFIX + "*")
    unfinished = sorted(glob.glob(pattern))
    if unfinished:
      print(f"removing unfinished checkpoint folders (a save was cut short): "
            f"{[os.path.basename(u) for u in unfinished]}", flush=True)
    for path in unfinished:
      shutil.rmtree(path, ignore_errors=True)

  def _reload(self) -> None:
    """Re-reads the steps on disk: the manager caches its listing, so a step another
    process (or Checkpointer) saved, or one deleted by hand, went unseen. Skipped while
    a save of this one is in flight: the listing would drop that unfinished step."""
    if not self.manager.is_saving_in_progress():
      self.manager.reload()

  def latest_step(self) -> int | None:
    """The newest finished step on disk (None: none)."""
    self._reload()
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> bool:
    """Saves ``step`` unless a checkpoint of that step exists already."""
    if step in self.manager.all_steps():
      return False
    data_state = dict(data_state, **{FINGERPRINT: fingerprints(state)})
    return self.manager.save(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                         DATA: ocp.args.JsonSave(data_state)}), force=True)

  def reached_preemption(self, step: int) -> bool:
    """Whether a multi-process run was told to stop (SIGTERM) and all processes agree
    to stop after ``step`` (JAX's preemption service; False for one process)."""
    return self.manager.reached_preemption(step)

  def check_params(self, abstract_params: Any) -> None:
    """Raises IncompatibleCheckpointError naming the first parameter of another shape.

    Reads only metadata (of the newest step whose metadata reads), so it runs before
    anything is compiled or written.
    """
    if not self.manager.all_steps():
      return
    manager = _reader(self.directory)
    try:
      for step in sorted(manager.all_steps(), reverse=True):
        try:
          saved = manager.item_metadata(step)[STATE].tree["params"]
        except Exception:  # pylint: disable=broad-except
          continue  # Unreadable metadata: the restore falls back past this step.
        try:
          check_params_fit(saved, abstract_params,
                           f"checkpoint {os.path.join(self.directory, str(step))}")
        except ValueError as e:
          raise IncompatibleCheckpointError(str(e)) from None
        return
    finally:
      manager.close()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, data position) of ``step`` (default: the latest).

    Args:
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` (with shardings) to restore onto.
      step: which checkpoint; None = latest.

    Raises:
      FileNotFoundError: listing the saved steps, when ``step`` is not one of them.
      CorruptCheckpointError: no step (or the ``step`` asked for) restores.
    """
    explicit = step is not None
    self.manager.wait_until_finished()
    self._reload()

    def restore_step(s):
      restored = self.manager.restore(
          s, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                        DATA: ocp.args.JsonRestore()}))
      data_state = restored[DATA]
      if not isinstance(data_state, dict):
        raise CorruptCheckpointError(f"data item is {type(data_state).__name__}, not a dict")
      verify_fingerprints(restored[STATE], data_state)
      data_state = {k: v for k, v in data_state.items() if k != FINGERPRINT}
      return restored[STATE], data_state

    if explicit and step not in self.manager.all_steps():
      # Not a corrupt checkpoint (as the failed restore would have called it): none.
      raise _no_step(self.directory, step, self.manager.all_steps())
    steps = [step] if explicit else list(self.manager.all_steps())
    restored_step, result = _restore_newest(self.directory, steps, restore_step, explicit)
    # Only a fallback proves the newer steps corrupt: an explicit step never tried them,
    # and moving them aside would throw away healthy checkpoints.
    if not explicit:
      self._set_aside_newer(restored_step)
    return result

  def _set_aside_newer(self, step: int) -> None:
    """Moves steps newer than ``step`` (corrupt) out of the way, so they get rewritten."""
    # A step whose folder is gone (deleted by hand since the listing) has nothing to
    # move: moving it raised after the older step had restored.
    newer = [s for s in self.manager.all_steps()
             if s > step and os.path.isdir(os.path.join(self.directory, str(s)))]
    # By the primary alone: multi-host processes raced on the folders, the losers failed.
    if newer and jax.process_index() == 0:
      self.manager.wait_until_finished()
      aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
      os.makedirs(aside, exist_ok=True)
      for s in newer:
        target = os.path.join(aside, f"{s}_{time.strftime('%Y%m%d_%H%M%S')}")
        shutil.move(os.path.join(self.directory, str(s)), target)
        print(f"moved corrupt checkpoint step {s} to {target}", flush=True)
    if jax.process_count() > 1:  # Each process's own listing may differ: always meet.
      multihost_utils.sync_global_devices("blockdiff_jax_set_aside_newer")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    """Waits for the writes in progress and closes the manager (again: nothing to do)."""
    if self._closed:
      return
    self._closed = True
    try:
      self.manager.wait_until_finished()
    finally:  # A failed write still releases the manager.
      self.manager.close()


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_params_fit(saved: Any, abstract: Any, where: str = "checkpoint") -> None:
  """Raises ValueError naming the first parameter whose saved shape differs.

  (``IncompatibleCheckpointError``, a ValueError, from a checkpoint.)

  Args:
    saved: tree of checkpoint metadata (anything with ``.shape``).
    abstract: tree of ``jax.ShapeDtypeStruct`` the config expects.
    where: names the checkpoint in the message.
  """
  saved_flat = {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved)}
  want_flat = {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  for path, want in want_flat.items():
    if path not in saved_flat:
      raise ValueError(f"parameter {path} (shape {tuple(want.shape)}) is missing from "
                       f"{where}{_layout_hint(saved_flat, want_flat)}")
    got = tuple(saved_flat[path].shape)
    if got != tuple(want.shape):
      raise ValueError(f"parameter {path} has shape {got} in {where} but the config expects "
                       f"{tuple(want.shape)}")
  extra = sorted(set(saved_flat) - set(want_flat))
  if extra:
    raise ValueError(f"{where} has parameters the config lacks: {extra[:5]}")


def _stacked(flat: dict) -> bool | None:
  """Whether ``flat``'s layers are stacked (``stack_<seg>``, model.scan_layers=True),
  one module per layer (``layer_<i>``), or None (neither: no layers)."""
  tops = {path.split("/", 1)[0] for path in flat}
  if any(t.startswith("stack_") for t in tops):
    return True
  return False if any(t.startswith("layer_") for t in tops) else None


def _layout_hint(saved_flat: dict, want_flat: dict) -> str:
  """Names ``model.scan_layers`` when it alone makes the two trees differ in names: the
  missing parameter (``layer_0/...`` vs ``stack_0/...``) did not say why."""
  saved, want = _stacked(saved_flat), _stacked(want_flat)
  if saved is None or want is None or saved == want:
    return ""
  return (f" (its layers are {'stacked' if saved else 'one module each'}: it was saved with "
          f"model.scan_layers={saved}, the config has model.scan_layers={want}; pass "
          f"--config.model.scan_layers={saved})")


def _reader(checkpoint_dir: str) -> ocp.CheckpointManager:
  # A PyTree handler (not the Standard one the trainer saves with, same format on
  # disk) because it reads the tree metadata and restores a subtree.
  return ocp.CheckpointManager(
      checkpoint_dir, item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                                     DATA: ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))


def saved_steps(checkpoint_dir: str) -> list[int]:
  """The finished checkpoint steps in ``checkpoint_dir``, oldest first ([] if none)."""
  if not os.path.isdir(checkpoint_dir):
    return []
  manager = ocp.CheckpointManager(os.path.abspath(checkpoint_dir),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def has_checkpoint(checkpoint_dir: str) -> bool:
  """Whether ``checkpoint_dir`` holds at least one finished checkpoint."""
  return bool(saved_steps(checkpoint_dir))


def restore_params(checkpoint_dir: str, abstract_params: Any, step: int | None = None,
                   subtree: str = "params", fallback_subtree: str | None = None,
                   return_step: bool = False) -> Any:
  """Restores only ``state/<subtree>`` (the params) of a checkpoint, onto any mesh.

  Orbax partial restore reads just the requested arrays, and each device reads
  just its own shards: the optimizer state is never loaded. Shapes are checked
  against the checkpoint metadata first.

  Args:
    checkpoint_dir: the ``checkpoints`` directory of a run (``Checkpointer``'s).
    abstract_params: ``jax.ShapeDtypeStruct`` tree with shardings to restore onto.
    step: which step; None = the latest.
    subtree: the field of the train state to restore (``ema_params`` for EMA).
    fallback_subtree: restored instead when the checkpoint lacks ``subtree`` (e.g.
      ``params`` when EMA was off).
    return_step: also return the step restored (with ``step=None`` an older one than
      the newest when newer steps do not restore).

  Returns:
    The params, laid out as ``abstract_params``' shardings say; ``(step, params)`` with
    ``return_step``.
  """
  checkpoint_dir = os.path.abspath(checkpoint_dir)
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
  manager = _reader(checkpoint_dir)
  explicit = step is not None

  def restore_step(step):
    where = f"checkpoint {os.path.join(checkpoint_dir, str(step), STATE)}"
    tree = manager.item_metadata(step)[STATE].tree
    name = subtree
    if (name not in tree or tree[name] is None) and fallback_subtree is not None:
      name = fallback_subtree
    if name not in tree or tree[name] is None:
      raise CorruptCheckpointError(f"{where} has no {name!r} (it holds {sorted(tree)})")
    try:
      check_params_fit(tree[name], abstract_params, where)
    except ValueError as e:
      raise IncompatibleCheckpointError(str(e)) from None
    target = {name: abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True),
        DATA: ocp.args.JsonRestore()}))
    verify_fingerprints(restored[STATE][name], restored[DATA], prefix=name + "/")
    return restored[STATE][name]

  try:
    if explicit and step not in manager.all_steps():
      raise _no_step(checkpoint_dir, step, manager.all_steps())
    steps = [step] if explicit else list(manager.all_steps())
    restored, params = _restore_newest(checkpoint_dir, steps, restore_step, explicit)
  finally:
    manager.close()
  return (restored, params) if return_step else params


def _state_tree(checkpoint_dir: str, step: int | None) -> tuple[str, dict]:
  """(the ``state`` folder of ``step``, its tree metadata) without reading any array."""
  checkpoint_dir = os.path.abspath(checkpoint_dir)
  if not has_checkpoint(checkpoint_dir):
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}")
  manager = ocp.CheckpointManager(
      checkpoint_dir, item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                                     DATA: ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step() if step is None else step
    if step not in manager.all_steps():
      raise _no_step(checkpoint_dir, step, manager.all_steps())
    tree = manager.item_metadata(step)[STATE].tree
  finally:
    manager.close()
  return os.path.join(checkpoint_dir, str(step), STATE), tree


def param_names(checkpoint_dir: str, step: int | None = None,
                subtree: str = "params") -> dict[str, tuple[tuple[int, ...], str]]:
  """``{"embed/embedding": (shape, dtype), ...}`` of a checkpoint's params, from metadata only.

  Args:
    checkpoint_dir: the ``checkpoints`` directory of a run.
    step: which step; None = the latest.
    subtree: the field of the train state (``params``, ``ema_params``, ``opt_state``).
  """
  return _names(*_state_tree(checkpoint_dir, step), subtree)


def _names(where: str, tree: dict, subtree: str) -> dict[str, tuple[tuple[int, ...], str]]:
  if subtree not in tree or tree[subtree] is None:
    raise ValueError(f"checkpoint {where} has no {subtree!r} (it holds {sorted(tree)})")
  return {_path_str(p): (tuple(x.shape), str(x.dtype))
          for p, x in jax.tree_util.tree_leaves_with_path(tree[subtree])}


def open_param(checkpoint_dir: str, name: str, step: int | None = None,
               subtree: str = "params") -> ts.TensorStore:
  """Opens one saved parameter as a TensorStore (lazy: nothing is read yet).

  Orbax writes each array of the train state as a zarr array named by its tree
  path joined with dots (``params.embed.embedding``), inside one OCDBT key-value
  store per step (``<step>/state``; plain files when OCDBT was off). Indexing the
  returned store and calling ``.read().result()`` reads just those chunks.

  Args:
    checkpoint_dir: the ``checkpoints`` directory of a run.
    name: the parameter's path, ``/``-separated (a key of ``param_names``).
    step: which step; None = the latest.
    subtree: the field of the train state.

  Raises:
    KeyError: naming the closest parameters when ``name`` is not in the checkpoint.
  """
  state_dir, tree = _state_tree(checkpoint_dir, step)
  names = _names(state_dir, tree, subtree)
  if name not in names:
    close = [n for n in names if n.rsplit("/", 1)[-1] == name.rsplit("/", 1)[-1]] or sorted(names)
    raise KeyError(f"no parameter {name!r} in {subtree} of {checkpoint_dir}; e.g. {close[:5]}")
  with open(os.path.join(state_dir, "_METADATA"), encoding="utf-8") as f:
    layout = json.load(f)
  key = ".".join([subtree, *name.split("/")])
  if layout.get("use_ocdbt", True):
    kvstore = {"driver": "ocdbt", "base": f"file://{state_dir}", "path": key}
  else:
    kvstore = {"driver": "file", "path": os.path.join(state_dir, key)}
  spec = {"driver": "zarr3" if layout.get("use_zarr3", False) else "zarr", "kvstore": kvstore}
  return ts.open(spec, open=True, read=True).result()


def read_param(checkpoint_dir: str, name: str, index: Any = (), step: int | None = None,
               subtree: str = "params") -> np.ndarray:
  """Reads one parameter (or ``index`` of it, e.g. ``np.s_[:2]``) without loading the rest."""
  return np.asarray(open_param(checkpoint_dir, name, step, subtree)[index].read().result())


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes ``config.json`` to the workdir, without the backend-dependent fields."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for name in model_config_lib.BACKEND_FIELDS:
      if name in config.get("model", {}):
        del config.model[name]
  path = os.path.join(workdir, "config.json")
  # Whole or not at all: the other processes of a multi-host run may be reading it.
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(path + ".tmp", path)


REQUIRED_SECTIONS = ("model", "data")  # What a model and its tokenizer are built from.


def _fill_missing(saved: dict, defaults: dict, prefix: str, filled: list[str]) -> None:
  """Adds to ``saved`` (in place) every field of ``defaults`` it lacks, at any depth."""
  for key, value in defaults.items():
    if key not in saved:
      saved[key] = value
      filled.append(prefix + key)
    elif isinstance(value, dict) and isinstance(saved[key], dict):
      _fill_missing(saved[key], value, f"{prefix}{key}.", filled)


def load_config(workdir: str, fill_defaults: bool = True) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (written by ``save_config``).

  Args:
    workdir: the run's directory.
    fill_defaults: give a ``model`` field the saved config lacks its default. A
      config.json written before the field existed (e.g. ``model.moe.expert_parallel``)
      otherwise failed the model build with a bare ``AttributeError: 'expert_parallel'``;
      a field added later defaults to what the code did before it. The fields filled
      are printed. False: the config exactly as saved (to compare what it recorded).

  Raises:
    FileNotFoundError: the workdir has no ``config.json``.
    ValueError: naming the file, when it is not a JSON object or lacks a section the
      model is built from (e.g. after an edit by hand).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
  with open(path, encoding="utf-8") as f:
    try:
      saved = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}); fix it, or pass the run's config "
                       "explicitly") from None
  if not isinstance(saved, dict):
    raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not a config object")
  missing = [name for name in REQUIRED_SECTIONS if not isinstance(saved.get(name), dict)]
  if missing:
    raise ValueError(f"{path} has no {' or '.join(repr(m) for m in missing)} section "
                     f"(it has {sorted(saved)}); restore it, or pass the run's config "
                     "explicitly")
  if fill_defaults:
    defaults = model_config_lib.default_model_config().to_dict()
    for name in model_config_lib.BACKEND_FIELDS:  # Never saved: the backend decides.
      defaults.pop(name, None)
    filled = []
    _fill_missing(saved["model"], defaults, "model.", filled)
    if filled:
      print(f"{path} predates field(s) {filled}: using their defaults", flush=True)
  return ml_collections.ConfigDict(saved)
