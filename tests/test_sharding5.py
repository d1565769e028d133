"""Hardening of the mesh config and the multi-process start-up settings.

Both run in this process: the mesh checks resolve axis sizes for a device count
(no devices are used) and the address checks stop before
``jax.distributed.initialize`` is reached.
"""

import ml_collections
import pytest

from blockdiff_jax.model import mesh as mesh_lib
from blockdiff_jax.train import distributed


def _mesh(**sizes) -> ml_collections.ConfigDict:
  c = mesh_lib.default_mesh_config()
  for k, v in sizes.items():
    c[k] = v
  return c


def test_a_misspelt_mesh_field_is_named_not_ignored():
  """``mesh.experts = 4`` ran every expert on every device (expert=1) without a word."""
  c = _mesh()
  c.experts = 4  # A config file may add fields to an unlocked ConfigDict.
  with pytest.raises(ValueError, match=r"unknown mesh fields \['mesh.experts'\]"):
    mesh_lib.mesh_shape(c, 8)
  # Every field of the default section is accepted, and the sizes still resolve.
  assert mesh_lib.mesh_shape(_mesh(expert=4), 8) == (1, 2, 4, 1)


def test_a_mesh_section_without_an_axis_names_it():
  """A hand-written section lacking axes failed with a bare KeyError: 'data'."""
  c = ml_collections.ConfigDict({"fsdp": -1, "tensor": 2})
  with pytest.raises(ValueError, match=r"lacks \['mesh.data', 'mesh.expert'\]"):
    mesh_lib.mesh_shape(c, 8)
  full = ml_collections.ConfigDict({"data": 2, "fsdp": -1, "expert": 1, "tensor": 2})
  assert mesh_lib.mesh_shape(full, 8) == (2, 2, 1, 2)


@pytest.mark.parametrize("value", [2.5, True, "2"])
def test_a_non_integer_axis_size_is_refused(value):
  """int() truncated 2.5 to 2 (a different mesh than asked for) and read True as 1."""
  c = ml_collections.ConfigDict({"data": value, "fsdp": -1, "expert": 1, "tensor": 1})
  with pytest.raises(ValueError, match=rf"mesh.data must be an integer.*got {value!r}"):
    mesh_lib.mesh_shape(c, 8)


@pytest.mark.parametrize("devices", [0, -8])
def test_no_devices_give_no_mesh(devices):
  """0 devices resolved the -1 axis to size 0, -8 to size -8: shapes no mesh can have."""
  with pytest.raises(ValueError, match=f"at least one device, got {devices}"):
    mesh_lib.mesh_shape(_mesh(), devices)


@pytest.mark.parametrize("address", [
    "localhost:abc",  # JAX segfaulted process 0 (getaddrinfo on the port).
    "localhost:99999", "localhost:0", "localhost:",  # Waited 5 min, then aborted.
    "localhost",  # (Refused before too, by a bare ":" test that "::1" passed.)
    ":1234", "::1", "[::1]", "host:-1",
])
def test_a_coordinator_address_without_a_valid_port_is_refused(monkeypatch, address):
  monkeypatch.delenv(distributed.ENV_COORDINATOR, raising=False)
  with pytest.raises(ValueError, match=r"must be host:port with a port in \[1, 65535\]"):
    distributed.settings(address, 2, 1)
  # The same from the environment, as a launcher sets it.
  monkeypatch.setenv(distributed.ENV_COORDINATOR, address)
  with pytest.raises(ValueError, match=distributed.ENV_COORDINATOR):
    distributed.settings(None, 2, 0)


@pytest.mark.parametrize("address", ["localhost:8476", "10.0.0.1:1234", "[::1]:8476",
                                     "node-0.cluster.local:65535"])
def test_valid_coordinator_addresses_pass(address):
  assert distributed.settings(address, 2, 1) == (address, 2, 1)


def test_config_validate_refuses_a_bad_mesh_section_before_any_device():
  from blockdiff_jax import config as config_lib
  from conftest import load_config_file
  c = load_config_file("tiny")
  c.mesh = mesh_lib.default_mesh_config()
  config_lib.validate(c)
  with c.mesh.unlocked():
    c.mesh.experts = 4  # Misspelt: would run with expert = 1.
  with pytest.raises(ValueError, match=r"unknown mesh fields \['mesh\.experts'\]"):
    config_lib.validate(c)
  c.mesh = mesh_lib.default_mesh_config()
  c.mesh.data, c.mesh.fsdp = -1, -1
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    config_lib.validate(c)
