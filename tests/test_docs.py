"""The documentation: the site builds cleanly and its code runs.

* Every ```` ```python ```` block of a guide (``docs/guides/*.md``) and of
  the front page runs, the blocks of one page in order in one namespace, as a
  reader would paste them.
  Blocks that cannot run here (several hosts) are written as
  ```` ```{code-block} python ```` or start with a ``# not run`` line.
* Every ``Example::`` block of a public docstring is listed below, either as
  runnable (it then runs, as doctest would, in the namespace of the module
  that defines it) or as a known fragment (strict xfail).
* The site builds offline with warnings as errors, with an API page for every
  name of ``galore_optax.__all__`` and for every public submodule.
"""

import html
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import markdown_it
import optax
import pytest

import galore_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDES = sorted((DOCS / "guides").glob("*.md"))
# Pages whose python blocks run: the guides and the front page.
CODE_PAGES = [DOCS / "index.md", *GUIDES]

sys.path.insert(0, str(DOCS))
import api_pages  # pylint: disable=g-import-not-at-top,wrong-import-position

NOT_RUN = "# not run"

# Guides that need several devices run in a fresh process with this many
# simulated CPU devices.
MULTI_DEVICE_GUIDES = {"sharding.md": 4}


# ---------------------------------------------------------------------------
# Guide code
# ---------------------------------------------------------------------------


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
  """The runnable ``python`` fences of a MyST file, as ``(line, code)``.

  Args:
    path: a Markdown file.

  Returns:
    ``(0-based line of the code's first line, code)`` per block, in order.
  """
  tokens = markdown_it.MarkdownIt("commonmark").parse(path.read_text())
  blocks = []
  for token in tokens:
    if token.type != "fence" or token.info.strip() != "python":
      continue
    if token.content.lstrip().startswith(NOT_RUN):
      continue
    blocks.append((token.map[0] + 1, token.content))
  return blocks


def run_blocks(filename: str, blocks: list[tuple[int, str]]) -> dict:
  """Executes blocks in order in one namespace; tracebacks name file lines.

  Args:
    filename: shown in tracebacks (the guide's path).
    blocks: ``(first line, code)`` pairs.

  Returns:
    The namespace.
  """
  namespace = {"__name__": "__guide__"}
  for line, code in blocks:
    padded = "\n" * line + code  # so that tracebacks show the guide's lines
    exec(compile(padded, filename, "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_blocks_are_found_and_skipped_as_documented(tmp_path):
  guide = tmp_path / "guide.md"
  guide.write_text(textwrap.dedent("""\
      # Title

      ```python
      a = 1
      ```

      ```{code-block} python
      b = 2
      ```

      ```python
      # not run: needs two hosts
      c = 3
      ```

      ```bash
      d=4
      ```

      ```python
      e = a + 1
      ```
      """))
  assert python_blocks(guide) == [(3, "a = 1\n"), (20, "e = a + 1\n")]
  assert run_blocks(str(guide), python_blocks(guide))["e"] == 2


def test_every_guide_has_code():
  assert len(GUIDES) >= 8
  for guide in GUIDES:
    assert python_blocks(guide), f"{guide.name} has no runnable python block"


# Longer code lines scroll sideways in the book theme's column.
MAX_CODE_LINE = 79


def test_code_lines_fit_the_page():
  too_long = []
  for page in sorted(DOCS.rglob("*.md")):
    if "_build" in page.parts:
      continue
    tokens = markdown_it.MarkdownIt("commonmark").parse(page.read_text())
    for token in tokens:
      if token.type != "fence" or token.info.strip().startswith("{figure}"):
        continue
      for i, line in enumerate(token.content.splitlines()):
        if len(line) > MAX_CODE_LINE:
          too_long.append(f"{page.relative_to(ROOT)}:{token.map[0] + 2 + i}")
  assert not too_long, f"code lines over {MAX_CODE_LINE} characters: {too_long}"


@pytest.mark.parametrize("page", [
    str(p.relative_to(DOCS)) for p in CODE_PAGES
    if p.name not in MULTI_DEVICE_GUIDES])
def test_guide_code_runs(page):
  path = DOCS / page
  run_blocks(str(path.relative_to(ROOT)), python_blocks(path))


@pytest.mark.parametrize("guide", sorted(MULTI_DEVICE_GUIDES))
def test_multi_device_guide_code_runs(guide, tmp_path):
  path = DOCS / "guides" / guide
  script = tmp_path / "run_guide.py"
  script.write_text(
      "import json, sys\n"
      f"blocks = json.loads({json.dumps(json.dumps(python_blocks(path)))})\n"
      "namespace = {'__name__': '__guide__'}\n"
      "for line, code in blocks:\n"
      f"  exec(compile('\\n' * line + code, {str(path.relative_to(ROOT))!r},"
      " 'exec'), namespace)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={MULTI_DEVICE_GUIDES[guide]}"))
  result = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


# ---------------------------------------------------------------------------
# Docstring examples
# ---------------------------------------------------------------------------

# Examples that run as written in the namespace of the module that defines
# them (as doctest runs them). One that defines ``tx`` is then stepped on a
# small model.
RUNNABLE_EXAMPLES = frozenset({
    "galore_optax.aliases.galore_adafactor",
    "galore_optax.aliases.galore_adamw",
    "galore_optax.layerwise.make_layerwise_step",
    "galore_optax.names.create_optimizer",
    "galore_optax.targets.galore_labels",
})

FRAGMENT_EXAMPLES: dict[str, str] = {}

_EXAMPLE = re.compile(r"^( *)Examples?::\s*$")


def example_code(doc: str | None) -> str | None:
  """The literal block after an ``Example::`` line, dedented, or None.

  Args:
    doc: a docstring.

  Returns:
    The example's code, or None if the docstring has no example.
  """
  lines = inspect.cleandoc(doc or "").splitlines()
  for i, line in enumerate(lines):
    match = _EXAMPLE.match(line)
    if not match:
      continue
    body = []
    for following in lines[i + 1:]:
      indent = len(following) - len(following.lstrip())
      if following.strip() and indent <= len(match.group(1)):
        break
      body.append(following)
    return textwrap.dedent("\n".join(body)).strip() + "\n"
  return None


def _public_objects():
  """``{"galore_optax.<module>.<qualname>": obj}`` for documented objects."""
  found = {}
  for module in [galore_optax, *api_pages.public_submodules()]:
    found[module.__name__] = module
    for name in api_pages.module_members(module):
      obj = getattr(module, name)
      if inspect.ismodule(obj):
        continue
      members = [obj] + ([m for m in vars(obj).values() if inspect.isfunction(m)]
                         if inspect.isclass(obj) else [])
      for member in members:
        home = ".".join((getattr(member, "__module__", "") or "").split(".")[:2])
        if home.startswith("galore_optax.") and hasattr(member, "__qualname__"):
          found[f"{home}.{member.__qualname__}"] = member
  return found


EXAMPLES = {name: code for name, obj in _public_objects().items()
            if (code := example_code(getattr(obj, "__doc__", None)))}


def test_example_extraction():
  doc = """Summary.

  Example::

    a = 1
    if a:
      b = 2

  Args:
    x: not part of it.
  """
  assert example_code(doc) == "a = 1\nif a:\n  b = 2\n"
  assert example_code("Summary only.") is None


def test_every_docstring_example_is_listed():
  listed = RUNNABLE_EXAMPLES | set(FRAGMENT_EXAMPLES)
  assert not RUNNABLE_EXAMPLES & set(FRAGMENT_EXAMPLES)
  assert sorted(EXAMPLES) == sorted(listed), (
      "unlisted examples: " f"{sorted(set(EXAMPLES) - listed)}; listed but "
      f"gone: {sorted(listed - set(EXAMPLES))}")


def _defining_namespace(name: str) -> dict:
  obj = _public_objects()[name]
  module = sys.modules[obj.__module__]
  return dict(vars(module))


def _step_small_model(tx: optax.GradientTransformation) -> None:
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"self_attn": {"kernel": jax.random.normal(keys[0], (16, 24))},
            "mlp": {"kernel": jax.random.normal(keys[1], (24, 16)),
                    "bias": jnp.zeros((16,))},
            "norm": {"scale": jnp.ones((16,))}}
  grads = jax.tree.map(lambda p: jax.random.normal(keys[2], p.shape), params)
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.shape == p.shape and bool(jnp.all(jnp.isfinite(u)))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


@pytest.mark.parametrize("name", [
    *sorted(RUNNABLE_EXAMPLES),
    *[pytest.param(name, marks=pytest.mark.xfail(
        strict=True, raises=NameError, reason=reason))
      for name, reason in sorted(FRAGMENT_EXAMPLES.items())]])
def test_docstring_example_runs(name):
  namespace = _defining_namespace(name)
  exec(compile(EXAMPLES[name], f"<example of {name}>", "exec"), namespace)  # pylint: disable=exec-used
  if isinstance(namespace.get("tx"), optax.GradientTransformation):
    _step_small_model(namespace["tx"])


# ---------------------------------------------------------------------------
# The site
# ---------------------------------------------------------------------------

# Submodules that must have an API page (the discovery finds them and any
# other public one; this guards the discovery itself).
DOCUMENTED_SUBMODULES = ("adafactor", "aliases", "layerwise", "memory",
                         "names", "projection", "quantization", "state_8bit",
                         "targets", "transform", "weight_quantization")


def visible_text(page: str) -> str:
  """The text of an HTML page outside code blocks, tags removed.

  Args:
    page: HTML.

  Returns:
    The text a reader sees in prose, tables and signatures.
  """
  page = re.sub(r"<pre.*?</pre>", "", page, flags=re.S)
  return html.unescape(re.sub(r"<[^>]+>", "", page))


def test_visible_text_finds_raw_markup():
  assert "``" in visible_text("<p>QuantizedArray``s that ``inner</p>")
  assert "``" not in visible_text(
      "<p><code>x</code>s</p><pre>a = '``'</pre>")


def test_site_builds_with_an_api_page_per_public_name(tmp_path):
  out = tmp_path / "html"
  start = time.perf_counter()
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
       "-q", str(DOCS), str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  seconds = time.perf_counter() - start
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
  print(f"docs built in {seconds:.1f} s")

  api = out / "api"
  for name in galore_optax.__all__:
    page = api / f"galore_optax.{name}.html"
    assert page.exists(), f"no API page for galore_optax.{name}"
    anchor = (f'id="module-galore_optax.{name}"'
              if inspect.ismodule(getattr(galore_optax, name))
              else f'id="galore_optax.{name}"')
    assert anchor in page.read_text(), f"{page.name} lacks {anchor}"
  modules = [m.__name__ for m in api_pages.public_submodules()]
  assert {f"galore_optax.{m}" for m in DOCUMENTED_SUBMODULES} <= set(modules)
  for module in modules:
    page = api / f"{module}.html"
    assert page.exists(), f"no API page for {module}"
    assert f'id="module-{module}"' in page.read_text()
    for member in api_pages.module_members(sys.modules[module]):
      assert member in page.read_text(), f"{module} page lacks {member}"

  # Markup that did not render (an unclosed literal in a docstring, a
  # Markdown fence MyST did not parse) shows up as backticks in the text.
  for page in sorted(out.rglob("*.html")):
    if "_modules" not in page.parts:
      assert "``" not in visible_text(page.read_text()), (
          f"raw markup in {page.relative_to(out)}")
  for guide in GUIDES:
    assert (out / "guides" / f"{guide.stem}.html").exists(), guide.name
  benchmarks = (out / "benchmarks.html").read_text()
  for figure in sorted(DOCS.glob("*.png")):
    assert (out / "_images" / figure.name).exists(), figure.name
    assert f"_images/{figure.name}" in benchmarks, figure.name
