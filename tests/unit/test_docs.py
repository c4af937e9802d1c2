"""The reference parts of docs/ are generated from the code (docs/generate.py): they
must be what the generator makes from the code now."""

import importlib.util
import os

import pytest

HERE = os.path.dirname(__file__)
GEN = os.path.join(HERE, "..", "..", "docs", "generate.py")


def _generator():
    spec = importlib.util.spec_from_file_location("hanet_docs_generate", GEN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["metrics.md", "pillar.md", "reference.md"])
def test_generated_docs_are_current(name):
    gen = _generator()
    with open(os.path.join(os.path.dirname(GEN), name), encoding="utf-8") as fh:
        have = fh.read()
    assert have == gen.generated(name), f"docs/{name} is out of date: run ./dev docs"


def test_every_model_key_and_metric_is_documented():
    gen = _generator()
    from _hanet import metrics

    text = gen.pillar_reference()
    for path, _ in gen._model_keys():
        assert f"| `{path}` |" in text
    mtext = gen.metrics_reference()
    for name in metrics.CATALOGUE:
        assert f"| `{name}` |" in mtext
