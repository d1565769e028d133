"""Multi-process (multi-host) start-up: ``jax.distributed.initialize`` from flags or environment.

Every process runs the same program. Call ``initialize()`` before anything else
touches JAX devices; afterwards ``jax.devices()`` lists the devices of all
processes and ``model.mesh.make_mesh`` builds the global mesh from them.

Settings come from the arguments, else from the environment:

* ``JAX_COORDINATOR_ADDRESS``: ``host:port`` of process 0's coordinator service;
* ``JAX_NUM_PROCESSES``: how many processes take part;
* ``JAX_PROCESS_ID``: this process's index in ``[0, num_processes)``, each
  process its own (required with more than one process, unless ``auto=True``).

With one process (or none of the settings) it does nothing, so single-host
runs need no flags. On clusters that JAX detects by itself (SLURM, Open MPI,
Cloud TPU) pass ``auto=True`` to let ``jax.distributed.initialize`` find them.
"""

import os

from absl import logging
import jax

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError as e:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def _given(coordinator_address: str | None, num_processes: int | None,
           process_id: int | None) -> tuple[str | None, int | None, int | None]:
  """The settings the arguments or the environment give, None where neither does."""
  # Stripped as the integers are: " host:1234" (a launcher's stray space) reached gRPC,
  # which could not resolve " host", and every process waited out the timeout.
  coordinator = ((coordinator_address or os.environ.get(ENV_COORDINATOR) or "").strip()
                 or None)
  n = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  return coordinator, n, pid


def _check(coordinator: str | None, n: int | None, pid: int | None,
           need_id: bool) -> tuple[str | None, int, int | None]:
  """Checks given settings; (coordinator, num_processes, process_id or None).

  ``need_id`` is False under ``auto``: what is not given is then JAX's to detect,
  the process count included, so a given id is only checked against a given count.
  """
  if n is not None and n < 1:
    raise ValueError(f"num_processes must be >= 1, got {n} (from num_processes or "
                     f"${ENV_NUM_PROCESSES})")
  if pid is not None and pid < 0:
    raise ValueError(f"process_id must be >= 0, got {pid} (from process_id or "
                     f"${ENV_PROCESS_ID})")
  # Under auto a count left to JAX (SLURM_NTASKS) is unknown here: checking the id
  # against the default of 1 refused every process but the first.
  if pid is not None and (n is not None or need_id) and pid >= (n or 1):
    raise ValueError(f"process_id={pid} must be in [0, num_processes={n or 1}) (from "
                     f"process_id or ${ENV_PROCESS_ID}, num_processes or "
                     f"${ENV_NUM_PROCESSES})")
  n = 1 if n is None else n
  if n > 1 and not coordinator:
    raise ValueError(f"num_processes={n} needs a coordinator address (host:port): pass "
                     f"coordinator_address or set {ENV_COORDINATOR}")
  # Defaulting to 0 made every process of the job process 0: each then waited for the
  # others to join (the whole initialization timeout) and died saying a task failed.
  if n > 1 and pid is None and need_id:
    raise ValueError(f"num_processes={n} needs this process's id in [0, {n}): pass "
                     f"process_id or set {ENV_PROCESS_ID} (each process its own), or use "
                     f"auto=True where JAX detects the cluster (SLURM, Open MPI)")
  if coordinator:
    _check_address(coordinator)
  return coordinator, n, pid


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> tuple[str | None, int, int]:
  """(coordinator, num_processes, process_id) from the arguments, else the environment.

  Raises:
    ValueError: naming the inconsistent setting (e.g. process_id out of range, or a
      multi-process run without a coordinator or without this process's id).
  """
  coordinator, n, pid = _check(*_given(coordinator_address, num_processes, process_id),
                               need_id=True)
  return coordinator, n, 0 if pid is None else pid


def _check_address(address: str) -> None:
  """Refuses a coordinator address that is not ``host:port`` with a port in [1, 65535].

  JAX does not check it: process 0 crashed (segfault) on a non-numeric port, and
  with an empty, out-of-range or missing port every process waited the whole
  initialization timeout (5 minutes) and then aborted saying "another task died".
  """
  host, sep, port = address.rpartition(":")
  # An IPv6 host is bracketed ("[::1]:1234"): "::1" alone would read as host ":" and
  # port "1".
  bad_host = (not host or any(c.isspace() for c in host)
              or (":" in host and not (host.startswith("[") and host.endswith("]"))))
  if not sep or bad_host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise ValueError(f"coordinator address {address!r} must be host:port with a port in "
                     f"[1, 65535] (an IPv6 host in brackets: [::1]:1234); set by "
                     f"coordinator_address or ${ENV_COORDINATOR}")


_initialized = False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False,
               timeout_s: int = 300) -> bool:
  """Joins the processes into one JAX runtime; a no-op for a single process.

  Args:
    coordinator_address: ``host:port`` of process 0 (default ``$JAX_COORDINATOR_ADDRESS``).
    num_processes: processes in the job (default ``$JAX_NUM_PROCESSES``, else 1).
    process_id: this process (default ``$JAX_PROCESS_ID``; needed with more than one
      process unless ``auto``).
    auto: let JAX detect the cluster (SLURM, MPI, TPU) and whatever is not given.
    timeout_s: how long to wait for all processes to join.

  Returns:
    True when ``jax.distributed.initialize`` ran (now or earlier), False for one process.
  """
  global _initialized
  if _initialized:
    return True
  given = _given(coordinator_address, num_processes, process_id)
  # With auto, what is not given is JAX's to detect (a process id from SLURM_PROCID).
  coordinator, n, pid = _check(*given, need_id=not auto)
  if n == 1 and not auto:
    return False
  jax.distributed.initialize(coordinator_address=coordinator,
                             num_processes=given[1] if auto else n, process_id=pid,
                             initialization_timeout=timeout_s)
  _initialized = True
  logging.info("process %d of %d: %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  """True on process 0 (the one that prints and writes metrics)."""
  return jax.process_index() == 0
