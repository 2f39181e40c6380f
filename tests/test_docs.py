"""The documentation runs: every `python` block of docs/python_api.md, in order, in one namespace (the
page is one walk-through), and the API example of examples/custom/. At a tiny size: the `digits`
they train on is swapped for a synthetic set of as many classes and 16-pixel images (the code
paths are the same; building the digits cache and 32-pixel steps would take the most of a minute).
A block that raises, or an assertion in it that fails, fails the test."""

import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
TINY = "synthetic:classes=10,size=16,train=64,test=32"

pytestmark = pytest.mark.usefixtures("private_cache", "in_tmp")


def test_python_api_walk_through_runs():
    page = (ROOT / "docs" / "python_api.md").read_text()
    blocks = BLOCK.findall(page)
    assert len(blocks) >= 6, "the walk-through's blocks were not found"
    namespace = {"__name__": "walkthrough"}
    for i, block in enumerate(blocks):
        block = block.replace('"digits"', f'"{TINY}"')
        exec(compile(block, f"docs/python_api.md, python block {i + 1}", "exec"), namespace)
    assert Path("runs/dml2/checkpoint.pt").is_file() and Path("search.db").is_file()
    assert len(namespace["seen"]) == 2
    # trials=1 finished trial; the random sampler may first draw a graph whose target is cut off from
    # every edge, which the search fails with its reason and does not count (ktfast.search).
    states = [(t.state.name, t.user_attrs.get("fail_reason", "")) for t in namespace["study"].trials]
    assert [s for s, _ in states if s != "FAIL"] in (["COMPLETE"], ["PRUNED"]), states
    assert all(why.startswith("frozen target") for s, why in states if s == "FAIL"), states


def test_api_example_script_runs(monkeypatch, capsys):
    """examples/custom/train_api.py on its own graph (the user's network of examples/custom/, with its
    attention layer, beside a resnet8), one epoch, at 32 px: its attention crops need 8x8 maps."""
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "train_api.py",
            "--epochs",
            "1",
            "--dataset",
            TINY.replace("size=16", "size=32"),
            "--out",
            "runs/example",
        ],
    )
    runpy.run_path(str(ROOT / "examples" / "custom" / "train_api.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "epoch 1" in out and "own loop" in out
    assert Path("runs/example/metrics.jsonl").read_text().count("\n") == 1
