"""Sphinx configuration of the pyro_iwem documentation.

Build (from the repository root; warnings are errors, as in ``tests/test_docs.py``)::

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

Nothing is downloaded while building: no intersphinx inventories, and MathJax is the copy that
the ``sphinx-mathjax-offline`` package ships (copied into ``_static/mathjax``), so the pages
render their math offline too.
"""

import importlib
import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))  # the repository root: pyro_iwem without installing

import pyro_iwem  # noqa: E402

# -- project -------------------------------------------------------------------------------
project = "pyro_iwem"
author = "the pyro_iwem developers"
copyright = "the pyro_iwem developers"
release = version = pyro_iwem.__version__

# -- general -------------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",  # the command line reference, generated from the argument parser
    "myst_parser",  # the Markdown pages (docs/iwem.md, docs/results.md, README.md sections)
    "sphinx-mathjax-offline",  # a local MathJax 3 in _static/mathjax, no CDN
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = []
highlight_language = "none"  # literal blocks without a language (usage lines, docstring sketches) stay plain

# Every cross-reference must resolve (a broken one fails the build under -W), except to the
# libraries around us, which have no inventories here (nothing is fetched at build time).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|pyro|numpy|argparse|os|pathlib|enum)(\..*)?"),
    (r"py:class", r"Module"),  # torch.nn.Module.forward's docstring, inherited by the layers
]

# -- autodoc -------------------------------------------------------------------------------
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_preserve_defaults = True  # signatures show defaults as written (``annealing=_PAPER_ANNEALING``)
autodoc_typehints = "none"
autodoc_inherit_docstrings = True
add_module_names = False
python_display_short_literal_types = True

# -- Markdown (MyST) -----------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3  # README's "#missing-data-miss-iwem" style links work when included
myst_dmath_double_inline = True

# -- math ----------------------------------------------------------------------------------
# sphinx-mathjax-offline sets mathjax_path to its bundled tex-chtml.js (MathJax 3.2.2, with
# the ams package: \tag{7} numbers an equation as the paper does).

# -- HTML ----------------------------------------------------------------------------------
html_theme = "sphinx_rtd_theme"
html_title = f"pyro_iwem {release}"
html_theme_options = {"navigation_depth": 3, "collapse_navigation": False}
html_show_sourcelink = False
html_static_path = ["_static"]
html_css_files = ["custom.css"]


# -- cross-references to re-exported objects ----------------------------------------------
# The API pages document each object once, under its public path (``pyro_iwem.infer.IWEM``);
# docstrings also name objects by the module that defines them
# (``pyro_iwem.infer.masked.observe_masked``). A reference that does not resolve is retried
# under the documented name of the same Python object.
def _import_dotted(name):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


_DOCUMENTED = {}  # id(object) -> its documented name; filled once per build, when first needed


def _documented_by_object(env):
    if not _DOCUMENTED:
        for name, entry in env.domains["py"].objects.items():
            if entry.aliased or not name.startswith("pyro_iwem"):
                continue
            obj = _import_dotted(name)
            if obj is not None and not isinstance(obj, (int, float, str, tuple, type(None))):
                _DOCUMENTED.setdefault(id(obj), name)
    return _DOCUMENTED


def resolve_reexported(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    candidates = [target]
    if "." not in target.lstrip("~.") or target.startswith("."):
        module, cls = node.get("py:module"), node.get("py:class")
        short = target.lstrip("~.")
        candidates = [f"{module}.{cls}.{short}" if cls else None, f"{module}.{short}" if module else None]
    for name in filter(None, candidates):
        if not name.startswith("pyro_iwem"):
            continue
        obj = _import_dotted(name)
        if obj is None:
            continue
        documented = _documented_by_object(env).get(id(obj))
        if documented and documented != name:
            return env.domains["py"].resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], documented, node, contnode
            )
    return None


# -- doc comments of re-exported data -----------------------------------------------------
# autodoc reads a ``#:`` comment only in the module a datum is documented under; for a
# constant re-exported by a package (``pyro_iwem.infer.METHODS``, defined in
# ``pyro_iwem.infer.methods``) it would show the docstring of ``dict`` instead. Use the
# ``#:`` comment of the submodule that defines it.
def _defining_module_comment(package_name, attr, obj):
    import pkgutil

    from sphinx.pycode import ModuleAnalyzer

    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
        module_name = f"{package_name}.{info.name}"
        module = importlib.import_module(module_name)
        if getattr(module, attr, None) is not obj:
            continue
        comment = ModuleAnalyzer.for_module(module_name).find_attr_docs().get(("", attr))
        if comment:
            return list(comment)
    return []


def data_doc_comments(app, what, name, obj, options, lines):
    if what != "data" or not name.startswith("pyro_iwem."):
        return
    type_doc = (type(obj).__doc__ or "").strip().splitlines()
    if lines and type_doc and lines[0].strip() == type_doc[0].strip():
        package_name, attr = name.rsplit(".", 1)
        lines[:] = _defining_module_comment(package_name, attr, obj)


# -- the command line reference keeps "--option" ------------------------------------------
# Smart quotes turn " -- " in docstrings into an en dash, as they should, but would also turn
# the "--eval-K" of an option's help text into "–eval-K". The page generated from the parser
# opts out of them.
from docutils.transforms import Transform  # noqa: E402


class KeepOptionDashes(Transform):
    default_priority = 700  # before Sphinx's smart quotes (750)

    def apply(self):
        if self.document.settings.env.docname == "cli":
            self.document["support_smartquotes"] = False


def setup(app):
    app.connect("builder-inited", lambda app: _DOCUMENTED.clear())
    app.add_transform(KeepOptionDashes)
    app.connect("missing-reference", resolve_reexported)
    app.connect("autodoc-process-docstring", data_doc_comments)
    return {"parallel_read_safe": True}
