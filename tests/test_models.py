import pytest
import torch

from ktfast.models import MODEL_NAMES, build_model, is_model_name


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_and_attention_shapes(name):
    size, att = (64, 2) if name == "resnet18" else (32, 8)
    model = build_model(name, 7, size).eval()
    x = torch.randn(2, 3, size, size)
    logits, attention = model(x, return_attention=True)
    assert logits.shape == (2, 7) and attention.shape == (2, att, att)
    assert torch.equal(model(x), logits)


@pytest.mark.parametrize("name,published", [("resnet32", 0.46e6), ("resnet110", 1.7e6), ("wrn28_2", 1.47e6)])
def test_parameter_counts_match_the_papers(name, published):
    n = sum(p.numel() for p in build_model(name, 100).parameters())
    assert abs(n - published) / published < 0.035, n


@pytest.mark.parametrize("name", ["resnet20", "wrn16_2"])
def test_64px_stem_keeps_an_8x8_attention_map(name):
    _, att = build_model(name, 10, 64)(torch.randn(1, 3, 64, 64), return_attention=True)
    assert att.shape == (1, 8, 8)


def test_registry_names():
    for ok in ("resnet8", "resnet110", "wrn28_2", "wrn16_4", "wrn40_1", "resnet18"):
        assert is_model_name(ok)
    for bad in ("wrn27_2", "wrn28_0", "resnet9", "foo", "wrn28-2"):
        assert not is_model_name(bad)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet9", 10)


@pytest.mark.parametrize("name,stage", [("resnet8", "stages"), ("wrn16_1", "bn")])
def test_attention_is_the_channel_mean_of_the_last_stage(name, stage):
    model = build_model(name, 5).eval()
    seen = {}
    getattr(model, stage).register_forward_hook(lambda m, i, o: seen.__setitem__("f", o))
    _, att = model(torch.randn(3, 3, 32, 32), return_attention=True)
    features = seen["f"] if name.startswith("resnet") else torch.relu(seen["f"])
    torch.testing.assert_close(att, features.mean(1))


def test_gradients_reach_the_stem():
    model = build_model("resnet14", 10)
    logits, att = model(torch.randn(4, 3, 32, 32), return_attention=True)
    (logits.sum() + att.sum()).backward()
    assert model.stem[0].weight.grad.abs().sum() > 0
