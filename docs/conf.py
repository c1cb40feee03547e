"""Sphinx configuration of the galore-optax documentation.

Build (offline, warnings are errors, as ``tests/test_docs.py`` does)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
# The checkout's own package, not an installed copy.
sys.path[:0] = [str(DOCS.parent), str(DOCS)]


import api_pages  # pylint: disable=g-import-not-at-top,wrong-import-position
import galore_optax  # pylint: disable=g-import-not-at-top,wrong-import-position


project = "galore-optax"
author = "the galore-optax authors"
copyright = "the galore-optax authors"  # pylint: disable=redefined-builtin
release = galore_optax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]

# MyST: directives as ```{name} fences; headings get anchors for #links.
myst_heading_anchors = 3

# Google-style docstrings. "Attributes:" of the NamedTuple states become a
# field list (``:ivar:``) rather than attribute entries, which would clash
# with the fields that autodoc itself lists.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Show long type aliases by name, not expanded (optax.ScalarOrSchedule would
# otherwise fill five lines of every signature).
autodoc_type_aliases = {
    alias: alias for alias in (
        "optax.ScalarOrSchedule", "optax.Params", "optax.Updates",
        "optax.OptState", "DTypeLike", "KeyPath")
} | {
    "TargetModules": "galore_optax.targets.TargetModules",
    "targets.TargetModules": "galore_optax.targets.TargetModules",
    "MatrixAxes": "galore_optax.transform.MatrixAxes",
    "PerLayerSpec": "galore_optax.layerwise.PerLayerSpec",
}

# Every cross-reference must resolve (the guides link to the API pages), except
# types of other packages, which have no pages here (offline: no intersphinx),
# and type aliases, which are not documented objects.
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"(jax|optax|numpy|np|collections\.abc|argparse|os)\..*"),
    ("py:class", r"(galore_optax\.\w+\.)?"
     r"(TargetModules|MatrixAxes|PerLayerSpec|DTypeLike|KeyPath)"),
]

# "f()" rather than "SomeClass.f()" in the page's table of contents, which
# is narrow.
toc_object_entries_show_parents = "hide"

html_theme = "sphinx_book_theme"
html_title = "galore-optax"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
html_show_sourcelink = False


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """Hides ``Alias for field number N``: the class docstring lists fields."""
  del app, what, name, options
  doc = getattr(obj, "__doc__", None) or ""
  return True if doc.startswith("Alias for field number") else skip


# Reprs that Sphinx writes into signatures, and what a reader would write.
_SIGNATURE_REPRS = (
    # Aliases inside ``X | None`` or ``Callable[[X], ...]``.
    (re.compile(r"TypeAliasForwardRef\('([^']+)'\)"), r"\1"),
    # Class defaults such as ``jnp.float32``.
    (re.compile(r"<class '([\w.]+)'>"), r"\1"),
)


def _tidy_signature(app, what, name, obj, options, signature,
                    return_annotation):
  """Replaces object reprs in a signature by the names they stand for."""
  del app, what, name, obj, options

  def tidy(text):
    for pattern, replacement in _SIGNATURE_REPRS:
      text = text and pattern.sub(replacement, text)
    return text

  return tidy(signature), tidy(return_annotation)


def setup(app):
  api_pages.write_api_pages(DOCS / "api")
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
  app.connect("autodoc-process-signature", _tidy_signature)
