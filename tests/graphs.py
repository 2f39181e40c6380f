"""The small graph the command and run tests share: nodes a and b, a resnet8 each, target a."""

LABELS = (("label", "a", "ce", "through"), ("label", "b", "ce", "through"))


def pair(*edges: tuple[str, str, str, str]) -> dict:
    """The graph file of a and b with `edges`, each (from, to, loss, gate)."""
    return {
        "version": 1,
        "name": "pair",
        "target": "a",
        "nodes": [{"name": "a", "model": "resnet8"}, {"name": "b", "model": "resnet8"}],
        "edges": [dict(zip(("from", "to", "loss", "gate"), e)) for e in edges],
    }
