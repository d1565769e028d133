"""Every command the config files document runs through the real flags, and every field is commented.

Commands are read from the docstrings of ``configs/*.py`` and the markdown of
``notebooks/*.ipynb``, parsed by ``blockdiff_jax.main``'s own flag definitions (absl +
ml_collections' config_flags) on a fresh ``FlagValues``, then checked field by field and
by ``config.validate``; the cheap ones (``--mode=plan``) also run in a subprocess.
"""

import ast
import glob
import importlib.util
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tokenize

from absl import app
from absl import flags
import pytest

from blockdiff_jax import config as config_lib
from blockdiff_jax import main as main_lib
from conftest import ROOT, load_config_file, load_repo_module

# ml_collections' config_flags loads each config file with the deprecated
# ``load_module()`` (once per parsed command here): its warning, not ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")

CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
ENTRY = "python -m blockdiff_jax.main"
# A ``--config.a.b=value`` override anywhere in prose (trailing punctuation is not part
# of the value).
OVERRIDE = re.compile(r"--config\.([\w.]+)=([^\s`'\"]+?)[,.;:)]*(?=[\s`'\"]|$)")


def _docstring(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return ast.get_docstring(ast.parse(f.read())) or ""


def _notebook_markdown(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    cells = json.load(f)["cells"]
  return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def commands_in(text: str) -> list[str]:
  """The ``python -m blockdiff_jax.main ...`` commands of a text (``\\`` lines joined)."""
  text = re.sub(r"\\\n\s*", " ", text)
  found = []
  for line in text.splitlines():
    for part in line.split("&&"):
      start = part.find(ENTRY)
      if start >= 0:
        found.append(part[start:].strip().strip("`").strip())
  return found


def _documented():
  for path in CONFIG_FILES:
    yield path, _docstring(path)
  for path in NOTEBOOKS:
    yield path, _notebook_markdown(path)


COMMANDS = [(os.path.relpath(p, ROOT), cmd) for p, text in _documented()
            for cmd in commands_in(text)]


def parse_command(command: str, workdir: str):
  """(flag holders, config file path) of a documented command, via main's flags."""
  words = shlex.split(command)
  assert words[:3] == ENTRY.split(), command
  argv = ["blockdiff_jax.main"] + [
      f"--workdir={workdir}" if w.startswith("--workdir=") else w for w in words[3:]]
  values = flags.FlagValues()
  holders = main_lib.define_flags(values, sys_argv=argv)
  unparsed = values(argv)
  assert unparsed == argv[:1], f"stray arguments {unparsed[1:]} in {command}"
  main_lib.check_flags(holders, values)
  path = next(w for w in argv if w.startswith("--config="))[len("--config="):]
  return holders, path.partition(":")[0]


def _field(config, dotted: str):
  node = config
  for part in dotted.split("."):
    assert part in node, f"no field {dotted!r} ({part!r} is not in {sorted(node.keys())})"
    node = node[part]
  return node


def check_command(command: str, workdir: str) -> None:
  """Raises AssertionError / ValueError / absl errors when ``command`` is stale."""
  holders, path = parse_command(command, workdir)
  assert holders.mode.value in main_lib.MODES
  assert holders.workdir.value == workdir
  # The same file without the overrides: every override names one of its fields and
  # arrives with that field's type.
  plain = [w for w in shlex.split(command)[3:] if not w.startswith("--config.")]
  untouched, _ = parse_command(" ".join([ENTRY] + [shlex.quote(w) for w in plain]), workdir)
  for name, _ in OVERRIDE.findall(command):
    default, value = _field(untouched.config.value, name), _field(holders.config.value, name)
    assert type(value) is type(default), (
        f"--config.{name}: {type(value).__name__}, the field is {type(default).__name__}")
  config_lib.validate(holders.config.value)
  module = load_repo_module("configs", os.path.splitext(os.path.basename(path))[0])
  if hasattr(module, "validate"):  # The file's own checks (e.g. long_context_extension).
    module.validate(holders.config.value)


@pytest.fixture
def in_repo(monkeypatch):
  monkeypatch.chdir(ROOT)  # The commands name config files relative to the repository.


def test_every_config_file_documents_a_command():
  documented = {source for source, _ in COMMANDS}
  missing = [os.path.relpath(p, ROOT) for p in CONFIG_FILES
             if os.path.relpath(p, ROOT) not in documented]
  assert not missing, f"config files whose docstring has no {ENTRY} command: {missing}"


@pytest.mark.parametrize("source, command", COMMANDS,
                         ids=[f"{s}:{i}" for i, (s, _) in enumerate(COMMANDS)])
def test_documented_command_parses_and_validates(source, command, in_repo, tmp_path):
  del source
  check_command(command, str(tmp_path / "run"))


@pytest.mark.parametrize("stale, error", [
    ("--config.train.step=5", AttributeError),  # A misspelt field...
    ("--config.train.steps=1.5", flags.IllegalFlagValueError),  # ...a float for an int...
    ("--mode=training", flags.IllegalFlagValueError),  # ...a mode that does not exist...
    ("--config.data.seq_len=60", ValueError),  # ...a value validate refuses...
    ("--port=8000", app.UsageError),  # ...and a serve flag outside --mode=serve.
])
def test_a_stale_command_is_caught(stale, error, in_repo, tmp_path):
  base = f"{ENTRY} --config=configs/tiny.py --workdir=runs/tiny --mode=train"
  check_command(base, str(tmp_path))  # The control: the same command without the change.
  with pytest.raises(error):
    check_command(f"{base} {stale}", str(tmp_path))


def _fragments():
  for path in CONFIG_FILES:
    for name, value in OVERRIDE.findall(_docstring(path)):
      yield os.path.relpath(path, ROOT), name, value


@pytest.mark.parametrize("source, name, value", list(_fragments()))
def test_every_override_in_prose_names_a_field_of_its_config(source, name, value, in_repo,
                                                             tmp_path):
  """Overrides quoted outside whole commands ("add --config.x=y to ...") parse too."""
  command = f"{ENTRY} --config={source} --workdir=w --config.{name}={shlex.quote(value)}"
  if "long_context_extension" in source:
    command = command.replace(source, source + ":tiny,4")
  holders, _ = parse_command(command, str(tmp_path))
  default = _field(load_config_file(os.path.splitext(os.path.basename(source))[0]), name)
  assert type(_field(holders.config.value, name)) is type(default)


def test_plan_commands_run(tmp_path):
  """``--mode=plan`` builds nothing: run each documented one for real."""
  plans = [(s, c) for s, c in COMMANDS if "--mode=plan" in c]
  assert plans
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for i, (source, command) in enumerate(plans):
    workdir = tmp_path / f"plan{i}"
    words = [f"--workdir={workdir}" if w.startswith("--workdir=") else w
             for w in shlex.split(command)[3:]]
    out = subprocess.run([sys.executable, "-m", "blockdiff_jax.main"] + words, cwd=ROOT,
                         env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    plan = json.loads((workdir / "plan.json").read_text())
    # The parameter count the config file states is the one the plan builds.
    assert f"{plan['params']:,} parameters" in _docstring(os.path.join(ROOT, source))


def _uncommented_fields(path: str, functions=("get_config", "base_config")) -> list[str]:
  """Assignments to config fields in ``functions`` with no comment on or right above them."""
  with open(path, encoding="utf-8") as f:
    source = f.read()
  comments = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type == tokenize.COMMENT}

  def is_field(target):
    if isinstance(target, ast.Tuple):
      return any(is_field(t) for t in target.elts)
    return isinstance(target, (ast.Attribute, ast.Subscript))

  lines, bare = source.splitlines(), []
  for function in ast.walk(ast.parse(source)):
    if not (isinstance(function, ast.FunctionDef) and function.name in functions):
      continue
    for node in ast.walk(function):
      targets = (node.targets if isinstance(node, ast.Assign) else
                 [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
      if not any(is_field(t) for t in targets):
        continue  # Local names (m = c.model) are not fields.
      span = set(range(node.lineno - 1, node.end_lineno + 1))  # The line above counts.
      if not span & comments:
        bare.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: "
                    f"{lines[node.lineno - 1].strip()}")
  return bare


@pytest.mark.parametrize("path", CONFIG_FILES + [os.path.join(ROOT, "blockdiff_jax",
                                                              "config.py")],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_field_has_a_comment(path):
  assert not _uncommented_fields(path)


def test_the_comment_check_sees_a_bare_field(tmp_path):
  path = tmp_path / "c.py"
  path.write_text("def get_config():\n  c = make()  # Local.\n  m = c.model\n"
                  "  c.a = 1  # Commented.\n  # Above.\n  c.b, c.c = 2, 3\n  m.d = 4\n")
  assert [line.split(": ", 1)[1] for line in _uncommented_fields(str(path))] == ["m.d = 4"]


def _set(config, dotted, value):
  section, _, name = dotted.rpartition(".")
  node = config
  for part in filter(None, section.split(".")):
    node = node[part]
  node[name] = value


# Sections no other test samples (test_hardening_config covers model/data/train/sample).
BAD_SECTION_FIELDS = [
    ("seed", -1), ("eval.batch_size", 0), ("eval.max_len", -1), ("eval.timeout_s", 0.0),
    ("eval.timeout_s", float("nan")), ("eval.samples_per_problem", 0),
    ("eval.long_context_per_cell", -2), ("serve.slots", 0), ("serve.queue_size", -1),
    ("serve.port", 70000), ("serve.request_timeout_s", -1.0), ("serve.max_tokens", 0),
    ("distill.num_prompts", 0), ("distill.batch_size", -1), ("distill.max_len", 0),
]


@pytest.mark.parametrize("field, value", BAD_SECTION_FIELDS,
                         ids=[f"{f}={v!r}" for f, v in BAD_SECTION_FIELDS])
def test_validate_names_every_sections_bad_field_and_value(field, value):
  c = load_config_file("tiny")
  config_lib.validate(c)
  _set(c, field, value)
  with pytest.raises(ValueError) as e:
    config_lib.validate(c)
  message = str(e.value)
  assert re.search(rf"(^|\W){re.escape(field)}\b", message), message
  shown = "nan" if isinstance(value, float) and math.isnan(value) else str(value)
  assert shown in message, message


def test_a_negative_seed_is_refused_before_the_workdir_is_touched(tmp_path):
  """numpy refused it only once the model was built, after config.json was written."""
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run(
      [sys.executable, "-m", "blockdiff_jax.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", "--mode=train", "--config.seed=-1"],
      cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert out.returncode != 0
  assert "seed must be an integer >= 0, got -1" in out.stderr, out.stderr[-2000:]
  assert not workdir.exists()


def test_importing_main_defines_no_global_flags():
  """A test worker that imports main may later load a script defining its own --config."""
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location("main_imported_again", main_lib.__file__)
  spec.loader.exec_module(importlib.util.module_from_spec(spec))
  assert set(flags.FLAGS) == before
