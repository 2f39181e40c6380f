"""Zoo models as graph nodes (docs/ARCHITECTURE.md §1): `timm:NAME` and `torchvision:NAME` validated against their
zoo, their attention map the channel mean of the last feature map before pooling, `"init": "zoo"`
for the published weights (offline: one line naming the node). No test downloads anything."""

import json
import socket

import pytest
import torch
import torchvision

from ktfast import Graph
from ktfast.cli import main
from ktfast.graph import GraphError
from ktfast.models import build_model, is_model_name

SMALL = "synthetic:classes=4,size=32,train=64,test=32"


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("KTFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KTFAST_KERNELS", "0")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights to find
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(tmp_path)


def pair(a: dict, b: dict, edges=()) -> dict:
    return {
        "version": 1,
        "name": "zoo",
        "target": "a",
        "nodes": [dict(a, name="a"), dict(b, name="b")],
        "edges": [
            {"from": "label", "to": "a", "loss": "ce", "gate": "through"},
            {"from": "label", "to": "b", "loss": "ce", "gate": "through"},
            *edges,
        ],
    }


def train(tmp_path, graph: dict, *extra: str) -> int:
    (tmp_path / "g.json").write_text(json.dumps(graph))
    return main(
        [
            "train",
            "--graph",
            "g.json",
            "--dataset",
            SMALL,
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            "run",
            *extra,
        ]
    )


def one_line(err: str, *needles: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_a_timm_and_a_torchvision_node_train_one_epoch(tmp_path, capsys):
    pytest.importorskip("timm")
    graph = pair(
        {"model": "timm:resnet10t"},
        {"model": "torchvision:mobilenet_v3_small"},
        [
            {"from": "b", "to": "a", "loss": "kl", "gate": "through"},
            {"from": "a", "to": "b", "loss": "kl", "gate": "linear"},
        ],
    )
    assert train(tmp_path, graph) == 0
    [row] = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for split in ("train", "test"):
        assert set(row[split]) == {"a", "b"} and all(0 <= v["acc"] <= 1 for v in row[split].values())
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and set(state["models"]) == {"a", "b"}


def test_timm_attention_is_the_channel_mean_of_forward_features():
    pytest.importorskip("timm")
    model = build_model("timm:resnet10t", 4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, att = model(x, return_attention=True)
        features = model.net.forward_features(x)
        torch.testing.assert_close(att, features.mean(1))
        torch.testing.assert_close(logits, model.net(x))
    assert att.shape == (2, 2, 2) and logits.shape == (2, 4)


def test_torchvision_attention_is_the_channel_mean_of_the_last_stage_before_pooling():
    model = build_model("torchvision:resnet18", 4).eval()
    plain = torchvision.models.resnet18(num_classes=4).eval()
    plain.load_state_dict(model.net.state_dict())  # the same tensors under the same names
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, att = model(x, return_attention=True)
        h = plain.maxpool(plain.relu(plain.bn1(plain.conv1(x))))
        layer4 = plain.layer4(plain.layer3(plain.layer2(plain.layer1(h))))
        torch.testing.assert_close(att, layer4.mean(1))
        torch.testing.assert_close(logits, plain(x))
        assert torch.equal(model(x), logits)
    assert att.shape == (2, 2, 2)


def test_attention_edges_between_zoo_nodes_train(tmp_path):
    pytest.importorskip("timm")
    graph = pair(
        {"model": "timm:mobilenetv3_small_050"},
        {"model": "torchvision:resnet18"},
        [{"from": "b", "to": "a", "loss": "kl+att_mse", "gate": "through", "crops": [1, 2]}],
    )
    (tmp_path / "g.json").write_text(json.dumps(graph))
    assert (
        main(
            [
                "train",
                "--graph",
                "g.json",
                "--dataset",
                "synthetic:classes=4,size=64,train=32,test=16",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                "run",
            ]
        )
        == 0
    )


def test_zoo_names_are_validated_against_the_zoo(monkeypatch):
    assert is_model_name("torchvision:mobilenet_v3_small")
    assert not is_model_name("torchvision:fasterrcnn_resnet50_fpn")  # a detector, not a classifier
    assert not is_model_name("keras:resnet50")
    for model, needle in (
        ("torchvision:resnet19", "'torchvision:resnet19'"),
        ("torchvision:fasterrcnn_resnet50_fpn", "classification"),
    ):
        with pytest.raises(GraphError, match=r"nodes\[b\]\.model: .*" + needle):
            Graph.from_dict(pair({"model": "resnet8"}, {"model": model}))
    with pytest.raises(GraphError, match=r"nodes\[b\]\.init: \"zoo\".*'resnet8'"):
        Graph.from_dict(pair({"model": "resnet8"}, {"model": "resnet8", "init": "zoo"}))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)  # as if timm were not installed
    with pytest.raises(
        GraphError, match=r"nodes\[a\]\.model: timm:resnet10t: timm is not installed \(pip install"
    ):
        Graph.from_dict(pair({"model": "timm:resnet10t"}, {"model": "resnet8"}))


def test_unknown_timm_model_exits_2_naming_the_node(tmp_path, capsys):
    pytest.importorskip("timm")
    assert train(tmp_path, pair({"model": "timm:resnet10t"}, {"model": "timm:no_such_net"})) == 2
    one_line(capsys.readouterr().err, "nodes[b].model", "timm:no_such_net")
    assert not (tmp_path / "run").exists()


def no_network(monkeypatch):
    def unreachable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket, "create_connection", unreachable)


@pytest.mark.parametrize("model", ["torchvision:mobilenet_v3_small", "timm:resnet10t"])
def test_zoo_weights_offline_exit_2_naming_the_node(model, tmp_path, capsys, monkeypatch):
    no_network(monkeypatch)
    if model.startswith("timm"):
        pytest.importorskip("timm")
        # The hub's offline mode, as an offline user sets it: without it the hub retries for ~45 s first.
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert train(tmp_path, pair({"model": "resnet8"}, {"model": model, "init": "zoo"})) == 2
    one_line(capsys.readouterr().err, "nodes[b].init", model, "weights")
    assert not (tmp_path / "run").exists()
    assert not any((tmp_path / "torch-home").rglob("*.pth"))


def test_zoo_weights_load_every_tensor_but_the_classifier(monkeypatch):
    torch.manual_seed(0)
    published = torchvision.models.mobilenet_v3_small(num_classes=1000).state_dict()
    fetched = []

    def get_state_dict(self, *args, **kwargs):  # what the download would hand over
        fetched.append(self)
        return published

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", get_state_dict)
    model = build_model("torchvision:mobilenet_v3_small", 4, zoo_weights=True)
    assert fetched == [torchvision.models.MobileNet_V3_Small_Weights.DEFAULT]
    mine = model.net.state_dict()
    differ = sorted(
        k for k in published if not torch.equal(mine[k], published[k]) if mine[k].shape == published[k].shape
    ) + sorted(k for k in published if mine[k].shape != published[k].shape)
    assert differ == ["classifier.3.bias", "classifier.3.weight"]  # the head, sized for 4 classes
    assert mine["classifier.3.weight"].shape == (4, 1024)
