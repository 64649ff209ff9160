"""The documentation site builds with warnings as errors, and has the pages it promises.

A broken cross-reference, a malformed docstring, an example that no longer has the function a
page includes, or a page left out of the table of contents fails the build (``-W``, with
``nitpicky = True`` in docs/conf.py). The examples the guide includes run in test_examples.py.
"""

import importlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    for module in ("sphinx", "myst_parser", "sphinxarg", "sphinx_rtd_theme"):
        try:
            importlib.import_module(module)
        except ImportError:
            pytest.fail(f"{module} is missing: install the test extra, pip install -e '.[test]'")
    out = tmp_path_factory.mktemp("docs")
    html, doctrees = out / "html", out / "doctrees"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-d", str(doctrees),
               str(DOCS), str(html)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"the docs build failed ({seconds:.0f} s):\n{log[-6000:]}"
    # "build succeeded, N warnings." when any were let through
    assert "build succeeded." in log and not re.search(r"\b(WARNING|ERROR|CRITICAL|SEVERE)\b", log), log[-6000:]
    return html


def page(site, name):
    path = site / name
    assert path.is_file(), f"{name} was not built"
    return path.read_text(encoding="utf-8")


def test_the_pages_exist(site):
    for name in ("index.html", "iwem.html", "guide.html", "reproducing.html", "protocols.html", "results.html",
                 "benchmarks.html", "cli.html", "api/index.html", "api/iwem.html", "api/losses.html",
                 "api/particles.html", "api/missing.html", "api/models.html", "api/data.html"):
        page(site, name)
    assert "IWEM" in page(site, "api/iwem.html")
    assert 'id="pyro_iwem.infer.IWEM"' in page(site, "api/iwem.html")


def test_every_public_name_is_documented(site):
    documented = set()
    for path in (site / "api").glob("*.html"):
        documented |= set(re.findall(r'id="(pyro_iwem\.[\w.]+)"', path.read_text(encoding="utf-8")))
    missing = []
    for package in ("pyro_iwem.infer", "pyro_iwem.models", "pyro_iwem.data"):
        module = importlib.import_module(package)
        missing += [f"{package}.{name}" for name in module.__all__ if f"{package}.{name}" not in documented]
    assert not missing, f"public names without an API entry: {missing}"


def test_the_command_line_reference_is_the_parser(site):
    from pyro_iwem.experiments.cli import build_parser

    text = page(site, "cli.html")
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert set(subparsers.choices) == {"train", "evaluate", "table", "figures", "sweep", "impute"}
    # the options a user types, not the functions behind them
    assert 'id="pyro_iwem.experiments.cli.main"' not in text and 'id="pyro_iwem.experiments.options.build_parser"' not in text
    for name, sub in subparsers.choices.items():
        assert f"pyro-iwem {name}" in text, name
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):  # sphinx-argparse leaves out argparse's own
                    assert option in text, (name, option)


def test_the_guide_includes_every_example(site):
    text = page(site, "guide.html")
    for example in ("train_iwem", "autoguide", "mixture", "two_layer", "missing_data"):
        assert f"examples/{example}.py" in text, example
        assert any((site / "_downloads").rglob(f"{example}.py")), example  # the download link
    # code read from the files, not pasted: one line of each
    for line in ("def make_model_and_guide", "guide = AutoNormal", "def amortised_guide", "class TwoLayerVAE",
                 "class Table"):
        assert re.sub(r"<[^>]+>", "", line) in re.sub(r"<[^>]+>", "", text), line


def test_math_is_rendered_offline(site):
    text = page(site, "iwem.html")
    assert text.count('class="math') >= 8  # the paper's equations, for MathJax
    assert r"\tag{7}" in text
    assert "_static/mathjax/tex-chtml.js" in text and "cdn." not in text
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert "math notranslate" in page(site, "api/iwem.html")  # the docstrings' :math:


def test_no_control_characters_in_the_sources():
    """A LaTeX command written into a page through a non-raw Python string loses its backslash to an
    escape (``\\frac`` becomes a form feed, ``\\nabla`` a newline and ``abla``): the page still
    builds, with the formula broken. No page, README or docstring may hold a control character."""
    sources = [*DOCS.glob("*.md"), *DOCS.glob("*.rst"), ROOT / "README.md", ROOT / "benchmarks" / "README.md",
               *(ROOT / "pyro_iwem").rglob("*.py")]
    bad = {}
    for path in sources:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", line):
                bad.setdefault(str(path.relative_to(ROOT)), []).append(number)
    assert not bad, f"control characters at {bad}"
