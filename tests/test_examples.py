"""The examples run as a user would copy them (shortened)."""

import importlib.util
import pathlib
import re

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_data_example_imputes(capsys):
    load("missing_data").main(steps=200)
    out = capsys.readouterr().out
    mse = dict(re.findall(r"imputation MSE, (.+?)\s*: ([0-9.]+)", out))
    assert set(mse) == {"miss-IWEM", "column means"}
    assert float(mse["miss-IWEM"]) < float(mse["column means"])  # the fitted model beats column means
