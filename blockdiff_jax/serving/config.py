"""The ``serve`` config section (``--mode=serve``) and its validation."""

import ml_collections


def default_serve_config() -> ml_collections.ConfigDict:
  """Defaults of the ``serve`` section (decoding defaults come from ``sample``)."""
  s = ml_collections.ConfigDict()
  s.host = "127.0.0.1"  # Interface to bind; 127.0.0.1 keeps the server local.
  s.port = 8000  # TCP port; 0 = any free port (printed at start-up).
  s.model_name = "blockdiff"  # The id clients pass as `model` (GET /v1/models lists it).
  s.slots = 4  # Decoding slots: rows of the running batch (a request takes a free one).
  # Forwards per host round trip: 1 = a request joins at the very next forward; k > 1
  # runs up to k forwards per call (until a row finishes): less dispatch overhead.
  s.forwards_per_call = 1
  s.queue_size = 64  # Requests that may wait; more get HTTP 429 with Retry-After.
  s.request_timeout_s = 600.0  # Per-request limit (queue + decoding); then HTTP 504.
  s.max_tokens = 64  # Default max_tokens when a request gives none (capped to fit).
  s.max_len = 0  # Context limit of prompt + new tokens; 0 = data.seq_len.
  s.warmup = True  # Compile the decoders at start-up (and report the compile time).
  return s


def validate(s: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid ``serve`` field."""
  for name, lo in (("slots", 1), ("queue_size", 1), ("max_tokens", 1), ("max_len", 0),
                   ("port", 0), ("forwards_per_call", 1)):
    if int(s[name]) < lo:
      raise ValueError(f"serve.{name} must be >= {lo}, got {s[name]}")
  # The engine needs a prompt token and a new one; 1 passed here and failed only after
  # the model had loaded, naming no serve field.
  if s.max_len == 1:
    raise ValueError(f"serve.max_len must be 0 (data.seq_len) or >= 2, got {s.max_len}")
  if s.port > 65535:
    raise ValueError(f"serve.port must be <= 65535, got {s.port}")
  if not s.request_timeout_s > 0:
    raise ValueError(f"serve.request_timeout_s must be > 0, got {s.request_timeout_s}")
  if not s.model_name:
    raise ValueError("serve.model_name must not be empty")
