"""Supervised fine-tuning data (prompt/response pairs), offline, for block diffusion SFT.

Sources (``data.sft_source``):

* ``docstrings``: pairs built from this interpreter's standard library without
  importing it: for every public top-level function or class of a public module with a
  docstring (parsed with ``ast``), the prompt asks what ``module.name(signature)`` does and the response
  is the docstring's first paragraph, ended at its last full sentence within
  ``MAX_DOC_CHARS`` when longer (never mid-word: the response is trained with EOS).
* ``synthetic``: the verifiable synthetic tasks (``data.synthetic_tasks``).
* ``distilled``: ``<workdir>/distill/*.jsonl``, a model's own answers written by
  ``--mode=distill`` (``sampling/distill.py``);
* otherwise comma-separated JSONL files, one example per line, either
  ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role", "content"}, ...]}``
  whose last message is the assistant's response (earlier ones form the prompt);
  roles are system, user, assistant or tool, and every content is a string. A bad
  line is refused naming ``path:line``, and so is a file listed twice.
  Either may carry ``"finished": false`` (a chat also on its response message): the
  response was cut (e.g. at a generation limit, as ``--mode=distill`` marks its answers)
  and did not end there. Earlier assistant turns of a chat are prompt: never scored.
* a comma-separated mix of the above (``"distilled,synthetic"``, or
  ``"synthetic,/path/a.jsonl"``): each named source, and all JSONL files together,
  give at most ``data.sft_max_examples`` examples each, interleaved round-robin.

Rendering: with a tokenizer that has ``apply_chat_template`` (interop's
``PretrainedTokenizer``) the prompt is the model's chat template applied to the
user turn(s) with the generation prompt, and the response ends with EOS; other
tokenizers get ``BOS prompt SEP response EOS``.

Held-out split (deterministic, documented): an example belongs to ``validation`` when
``int(sha1(prompt text)) % 1000 < 1000 * data.validation_fraction``
(``corpora.split_of``; the fraction acts in steps of 0.001, so 0.0001 holds out 0.1%),
else to ``train``; a chat record's prompt text is its messages before the response, as
sorted-key JSON. Examples with the same prompt thus share a split. The split of a
record never depends on other lines, so appending lines to a JSONL file moves none.
``docstrings`` validation also leaves out a pair whose answer a train pair has word for
word (``ntpath.dirname`` and ``posixpath.dirname`` share their docstring: 12 of 145
validation pairs at 0.05 on CPython 3.11), so it scores only answers never trained on.
Synthetic examples use the task generator's own disjoint validation stream.

The dataset (``pipeline.PackedSFTDataset``, ``data.corpus="sft"``) packs these rows.

Layout: each example is padded with EOS to a multiple of ``data.sft_block_multiple``
(the diffusion block size, so every example starts on a block boundary); examples
are packed greedily, in order, into rows of ``seq_len`` with their own segment ids,
and a row's tail is EOS padding with loss mask 0 and segment id -1 (padding: attention
and the MoE router statistics skip it, as they skip the trainer's unscored rows). The
loss mask is 1 on response tokens and on the EOS padding of the example (so the model
learns to end). ``sft_score_padding=False`` scores the response and its EOS (a direct
call of ``pack_kept`` with ``block`` > 1 also the rest of that EOS's block): the data config
refuses it where noisy blocks are bidirectional (BD3-LM, Fast-dLLM v2), since a clean
(never masked) EOS in the answer's last block would show where the answer stops, while
the decoder sees that block all MASK. Prompt tokens are never scored. An unfinished
response gets no EOS (it did not end) and no padding: it is cut back to the last block
boundary instead, so the model is never taught to stop mid-sentence, and is dropped if
nothing of it is left. An example longer than ``seq_len`` is dropped too; the dataset
prints how many of each split were dropped, and refuses a split that keeps none.
"""

import ast
import functools
import json
import os
import re
from typing import Any, Iterator, Sequence

import numpy as np

from blockdiff_jax.data import corpora
from blockdiff_jax.data import synthetic

Pair = tuple[str, str] | tuple[str, str, bool]  # (prompt, response[, finished]).
MAX_DOC_CHARS = 600


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
# A blank line may keep spaces: inspect.cleandoc strips only the common indent from it.
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def _first_paragraph(doc: str) -> str:
  """The docstring's first paragraph on one line, at most ``MAX_DOC_CHARS`` long.

  A longer one ends at its last sentence end within the limit ("" if it has none): the
  answer is trained with EOS after it, and a cut mid-word would teach the model to stop
  there.
  """
  para = _PARAGRAPH_BREAK.split(doc.strip())[0]
  text = " ".join(line.strip() for line in para.splitlines()).strip()
  if len(text) <= MAX_DOC_CHARS:
    return text
  ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() <= MAX_DOC_CHARS]
  return text[:ends[-1]] if ends else ""


def _signature(node: ast.AST) -> str:
  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
    return f"({ast.unparse(node.args)})"
  return ""


def docstring_pairs(root: str | None = None) -> Iterator[Pair]:
  """(prompt, response) pairs from the standard library's docstrings, in file order."""
  root = root or corpora.stdlib_root()
  for rel in corpora.stdlib_files(root):
    path = os.path.join(root, rel)
    # stdlib_files gives POSIX paths on every OS (os.sep is "\\" on Windows).
    module = rel[:-3].replace("/", ".").removesuffix(".__init__")
    if any(part.startswith("_") for part in module.split(".")):
      continue  # Private modules (_pyio, __future__) are not the documented API.
    try:
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    for node in tree.body:
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        continue
      doc = ast.get_docstring(node)
      if node.name.startswith("_") or not doc:
        continue
      answer = _first_paragraph(doc)
      if len(answer) < 20:
        continue
      kind = "class" if isinstance(node, ast.ClassDef) else "function"
      prompt = (f"What does the Python standard library {kind} "
                f"`{module}.{node.name}{_signature(node)}` do?")
      yield prompt, answer


@functools.lru_cache(maxsize=2)
def _all_docstring_pairs(root: str) -> tuple[Pair, ...]:
  """Every docstring pair of ``root``, parsed once per process."""
  return tuple(docstring_pairs(root))


ROLES = ("system", "user", "assistant", "tool")


def _text(value: Any, where: str, what: str) -> str:
  """``value`` if it is a string that encodes as UTF-8, else a ValueError naming it."""
  if not isinstance(value, str):
    raise ValueError(f"{where}: {what} must be a string, got {type(value).__name__} "
                     f"{value!r:.60}")
  corpora.check_unicode(value, f"{where}: {what}")  # Else the tokenizer fails much later.
  return value


def _messages(msgs: Any, where: str) -> list[dict]:
  """A checked chat: a non-empty list of {role, content} ending with the assistant's."""
  if not isinstance(msgs, list) or not msgs:
    raise ValueError(f"{where}: 'messages' must be a non-empty list of "
                     f"{{\"role\", \"content\"}} objects, got {msgs!r:.60}")
  for i, m in enumerate(msgs):
    if not isinstance(m, dict):
      raise ValueError(f"{where}: messages[{i}] must be an object with 'role' and "
                       f"'content', got {type(m).__name__} {m!r:.60}")
    if m.get("role") not in ROLES:
      raise ValueError(f"{where}: messages[{i}] has role {m.get('role')!r}; "
                       f"allowed: {', '.join(ROLES)}")
    if "content" not in m:
      raise ValueError(f"{where}: messages[{i}] ({m['role']}) has no 'content'")
    _text(m["content"], where, f"messages[{i}].content")
    if not isinstance(m.get("finished", True), bool):
      # finished() reads the response message's flag: "false" would count as true.
      raise ValueError(f"{where}: messages[{i}].finished must be true or false, got "
                       f"{m['finished']!r:.60}")
  if msgs[-1]["role"] != "assistant":
    raise ValueError(f"{where}: 'messages' must end with an assistant message")
  return msgs


def _pair_of_record(rec: Any, where: str) -> Pair | list[dict]:
  if not isinstance(rec, dict):
    raise ValueError(f"{where}: expected a JSON object with 'prompt' and 'response', or "
                     f"'messages'; got {type(rec).__name__} {rec!r:.60}")
  finished = rec.get("finished", True)
  if not isinstance(finished, bool):
    raise ValueError(f"{where}: 'finished' must be true or false, got {finished!r}")
  if "messages" in rec:
    msgs = _messages(rec["messages"], where)
    # The flag rides on the response message (the chat template never sees it).
    return msgs if finished else msgs[:-1] + [{**msgs[-1], "finished": False}]
  if "prompt" in rec and "response" in rec:
    # No str() coercion: {"prompt": null} would silently train on the text "None".
    pair = (_text(rec["prompt"], where, "'prompt'"),
            _text(rec["response"], where, "'response'"))
    return pair if finished else (*pair, False)
  raise ValueError(f"{where}: expected keys 'prompt' and 'response', or 'messages'; "
                   f"got {sorted(rec)}")


def jsonl_records(paths: str) -> list[Pair | list[dict]]:
  """Records of comma-separated JSONL files (pairs, or chat message lists).

  Blank lines are skipped and a UTF-8 byte order mark is allowed at the start of a file.

  Raises:
    ValueError: naming ``path:line`` for a line that is not UTF-8, not JSON or not a
      valid record; or naming a file listed twice (``a.jsonl,./a.jsonl``), which would
      train on each of its records twice.
  """
  out, seen = [], {}
  for path in [p.strip() for p in paths.split(",") if p.strip()]:
    if not os.path.isfile(path):
      raise ValueError(f"data.sft_source: no such JSONL file {path!r}")
    real = os.path.realpath(path)
    if real in seen:
      raise ValueError(f"data.sft_source lists the JSONL file {path!r} twice (also as "
                       f"{seen[real]!r}): its records would all be read twice; list it once")
    seen[real] = path
    for n, rec in corpora.read_jsonl(path, "data.sft_source"):
      out.append(_pair_of_record(rec, f"{path}:{n}"))
  return out


def finished(record: Pair | list[dict]) -> bool:
  """False for a record marked ``"finished": false`` (its response was cut)."""
  if isinstance(record, list):
    return bool(record[-1].get("finished", True))
  return bool(record[2]) if len(record) > 2 else True


def render(tokenizer: Any, record: Pair | list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """(prompt ids, response ids) of one record; the response ends with EOS if ``finished``."""
  if isinstance(record, list):
    prompt_msgs, response = record[:-1], record[-1]["content"]
  else:
    prompt_msgs, response = [{"role": "user", "content": record[0]}], record[1]
  if hasattr(tokenizer, "encode_chat"):
    # The template's specials (<|im_start|>...) become their ids; the same names typed
    # inside the record's text stay text (interop's PretrainedTokenizer.encode_chat).
    head = tokenizer.encode_chat(prompt_msgs, add_generation_prompt=True)
  elif hasattr(tokenizer, "apply_chat_template"):
    # The template spells its special tokens out (<|im_start|>...): they must become
    # their ids, not text, or the model sees a prompt it was never trained on.
    encode = getattr(tokenizer, "encode_with_specials", tokenizer.encode)
    head = encode(tokenizer.apply_chat_template(prompt_msgs, add_generation_prompt=True))
  else:
    text = "\n".join(m["content"] for m in prompt_msgs)
    head = np.concatenate([[tokenizer.bos_id], tokenizer.encode(text), [tokenizer.sep_id]])
  body = np.concatenate([tokenizer.encode(response),
                         [tokenizer.eos_id] if finished(record) else []])
  return np.asarray(head, np.int32), np.asarray(body, np.int32)


def prompt_text(record: Pair | list[dict]) -> str:
  if isinstance(record, list):
    return json.dumps(record[:-1], sort_keys=True)
  return record[0]


def distilled_files(workdir: str | None) -> str:
  """The comma-separated JSONL files of ``sft_source="distilled"`` in ``workdir``."""
  folder = os.path.join(workdir or "", "distill")
  # Hidden names are editor or OS debris (emacs's ".#answers.jsonl" lock link, macOS's
  # "._answers.jsonl"), never answers: skipped as corpora._walk skips them.
  files = sorted(os.path.join(folder, n) for n in (os.listdir(folder) if os.path.isdir(folder)
                                                   else [])
                 if n.endswith(".jsonl") and not n.startswith("."))
  if workdir is None or not files:
    raise ValueError(f"data.sft_source='distilled' but {folder!r} holds no .jsonl file; "
                     "run --mode=distill with this workdir first")
  return ",".join(files)


NAMED_SOURCES = ("docstrings", "synthetic", "distilled")


def source_groups(source: str) -> list[str]:
  """The sources a ``data.sft_source`` string mixes, in order of first appearance.

  Comma-separated items: each named source (``NAMED_SOURCES``) is its own source, and
  all JSONL paths together form one more (the order of its files is kept).
  """
  items = [s.strip() for s in source.split(",") if s.strip()]
  if not items:
    raise ValueError(f"data.sft_source={source!r} names no source")
  named = list(dict.fromkeys(s for s in items if s in NAMED_SOURCES))
  paths = [s for s in items if s not in NAMED_SOURCES]
  return named + ([",".join(paths)] if paths else [])


def _load_group(source: str, split: str, validation_fraction: float, max_examples: int,
                tasks: str, seed: int, digits: int, workdir: str | None) -> list:
  if source == "distilled":
    source = distilled_files(workdir)
  if source == "synthetic":
    n = max_examples or 10000
    return [synthetic.mixed_example(synthetic.parse_tasks(tasks), seed, j, split=split,
                                    digits=digits)[1:] for j in range(n)]
  train_answers = frozenset()
  if source == "docstrings" and split == "validation":
    records = _all_docstring_pairs(corpora.stdlib_root())
    train_answers = frozenset(a for p, a in records
                              if corpora.split_of(p, validation_fraction) == "train")
  elif source == "docstrings":
    records = docstring_pairs()  # Lazily: a capped train split stops reading early.
  else:
    records = jsonl_records(source)
  out = []
  for rec in records:
    if (corpora.split_of(prompt_text(rec), validation_fraction) == split
        and not (train_answers and rec[1] in train_answers)):
      out.append(rec)
      if max_examples and len(out) >= max_examples:
        break
  if not out:
    raise ValueError(f"data.sft_source={source!r} has no {split} example "
                     f"(validation_fraction={validation_fraction})")
  return out


def load_records(source: str, split: str, validation_fraction: float, max_examples: int,
                 tasks: str = "sort,add,copy_edit", seed: int = 0,
                 digits: int = synthetic.DEFAULT_DIGITS,
                 workdir: str | None = None) -> list[Pair | list[dict]]:
  """The records of ``split`` (module docstring).

  ``source`` may mix sources (``source_groups``, e.g. ``"distilled,synthetic"``): each
  gives at most ``max_examples`` (0 = all) and their records are interleaved round-robin,
  so packed rows (and the first validation batches) hold every source.
  """
  corpora.validate_split(split)
  groups = [_load_group(g, split, validation_fraction, max_examples, tasks, seed, digits,
                        workdir) for g in source_groups(source)]
  if len(groups) == 1:
    return groups[0]
  out = []
  for i in range(max(len(g) for g in groups)):
    out.extend(g[i] for g in groups if i < len(g))
  return out


def pack(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, multiple: int,
         eos_id: int, score_padding: bool = True,
         done: Sequence[bool] | None = None,
         block: int | None = None) -> tuple[dict, int]:
  """Packs (prompt ids, response ids) into rows; returns (arrays [N, seq_len], dropped).

  ``pack_kept`` with the count of dropped examples; raises ValueError if none is kept.
  """
  rows, kept = pack_kept(examples, seq_len, multiple, eos_id, score_padding, done, block)
  dropped = len(examples) - len(kept)
  if not kept:
    raise ValueError(f"no SFT example fits in seq_len={seq_len} ({dropped} dropped)")
  return rows, dropped


def pack_kept(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, multiple: int,
              eos_id: int, score_padding: bool = True,
              done: Sequence[bool] | None = None,
              block: int | None = None) -> tuple[dict, list[int]]:
  """Packs (prompt ids, response ids) into rows; returns (arrays [N, seq_len], kept).

  Each example is padded with EOS to a multiple of ``multiple``; an unfinished one
  (``done[i]`` False) is cut back to one instead. An example longer than ``seq_len``,
  or unfinished with no response token before its last block boundary, is dropped:
  ``kept`` lists the indices of the others, in order (N = 0 rows when it is empty).
  Not ``score_padding``, the padding is scored up to the end of the ``block``-token
  block the response's EOS falls in (module docstring); ``block`` (default 1: the
  response and its EOS only, right where attention inside a block is causal: the AR
  objective, I-DLM's noisy blocks) must divide ``multiple``.

  Raises:
    ValueError: ``seq_len``, ``multiple`` or ``block`` is not a positive int (0
      divided by zero, a negative one made negative padding), ``multiple`` does not
      divide ``seq_len`` or ``block`` does not divide ``multiple``.
  """
  block = 1 if block is None else block
  for name, value in (("seq_len", seq_len), ("sft_block_multiple", multiple),
                      ("block", block)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"pack: {name} must be a positive int, got {value!r}")
  if seq_len % multiple:
    raise ValueError(f"seq_len={seq_len} is not a multiple of sft_block_multiple={multiple}")
  if multiple % block:
    raise ValueError(f"pack: block={block} does not divide sft_block_multiple={multiple}")
  rows, cur, kept = [], [], []

  def flush():
    toks = np.full(seq_len, eos_id, np.int32)
    loss = np.zeros(seq_len, np.float32)
    seg = np.zeros(seq_len, np.int32)
    at = 0
    for s, (t, m) in enumerate(cur):
      toks[at:at + len(t)], loss[at:at + len(t)], seg[at:at + len(t)] = t, m, s
      at += len(t)
    seg[at:] = -1  # Padding, as trainer._unscore_rows_from marks it: no router statistic.
    rows.append((toks, loss, seg))

  used = 0
  if done is not None and len(done) != len(examples):
    raise ValueError(f"pack: {len(done)} done flags for {len(examples)} examples")
  for i, (head, body) in enumerate(examples):
    n = len(head) + len(body)
    if done is None or done[i]:
      padded = -(-n // multiple) * multiple
      toks = np.concatenate([head, body, np.full(padded - n, eos_id, np.int32)])
      # Not the padding past the EOS's block: the answer's blocks never see it.
      scored = padded if score_padding else -(-n // block) * block
    else:
      padded = scored = n // multiple * multiple
      toks = np.concatenate([head, body])[:padded]
    if padded > seq_len or scored <= len(head):
      continue
    kept.append(i)
    loss = np.zeros(padded, np.float32)
    loss[len(head):scored] = 1.0
    if used + padded > seq_len:
      flush()
      cur, used = [], 0
    cur.append((toks, loss))
    used += padded
  if cur:
    flush()
  dtypes = (np.int32, np.float32, np.int32)
  stack = lambda i: (np.stack([r[i] for r in rows]) if rows
                     else np.zeros((0, seq_len), dtypes[i]))
  return {"tokens": stack(0), "loss_mask": stack(1), "segment_ids": stack(2)}, kept
