import pytest
import torch

from ktfast.models import MODEL_NAMES, build_model, is_model_name

# The stem conv and the module whose output is the last stage's feature map, per family. A WRN's
# last map is the one after its final BN + ReLU, so the hook sits on that BN and the test adds the ReLU.
STEM = {
    "resnet8": lambda m: m.stem[0],
    "resnet8x4": lambda m: m.stem[0],
    "wrn16_1": lambda m: m.stem,
    "resnet18": lambda m: m.conv1,
}
LAST = {
    "resnet8": lambda m: m.stages[-1],
    "resnet8x4": lambda m: m.stages[-1],
    "wrn16_1": lambda m: m.bn,
    "resnet18": lambda m: m.layer4,
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_logits_and_attention_shapes(name):
    # resnet18's small stem gives a 4x4 layer4 map at 32 px.
    size, att = (32, 4) if name == "resnet18" else (32, 8)
    model = build_model(name, 7, size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, attention = model(x, return_attention=True)
        assert logits.shape == (2, 7) and attention.shape == (2, att, att)
        assert torch.equal(model(x), logits)


def test_resnet18_at_224px_has_a_7x7_attention_map():
    with torch.no_grad():
        logits, att = build_model("resnet18", 3, 224).eval()(
            torch.randn(1, 3, 224, 224), return_attention=True
        )
    assert logits.shape == (1, 3) and att.shape == (1, 7, 7)


def test_resnet18_small_stem_at_64px_for_tinyimagenet():
    model = build_model("resnet18", 200, 64).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    with torch.no_grad():
        _, att = model(torch.randn(1, 3, 64, 64), return_attention=True)
    assert att.shape == (1, 8, 8)
    assert build_model("resnet18", 200, 224).conv1.kernel_size == (7, 7)


@pytest.mark.parametrize(
    "name,exact,published",
    [("resnet32", 466_906, 0.46e6), ("resnet110", 1_730_714, 1.7e6), ("wrn28_2", 1_467_610, 1.47e6)],
)
def test_parameter_counts_match_the_papers(name, exact, published):
    n = n_params(build_model(name, 10))  # the papers' figures are for CIFAR-10
    assert n == exact
    # He et al.'s zero-padding shortcuts have no parameters; our two 1x1 projections (+ BN) add 2,752.
    assert abs(n - published) / published < 0.02


# The sizes the CRD (Tian et al., 2020) and DKD (Zhao et al., 2022) tables print for CIFAR-100, in millions
# and rounded to two decimals; the exact counts are RepDistiller's networks at 100 classes (its ResNets
# project the shortcut by a 1x1 convolution + BN where the shape changes, as ours do).
LITERATURE_100 = {
    "resnet8x4": (1_233_540, 1.23),
    "resnet32x4": (7_433_860, 7.43),
    "wrn40_2": (2_255_156, 2.26),
    "wrn16_2": (703_284, 0.70),
    "resnet56": (861_620, 0.86),
    "resnet20": (278_324, 0.28),
    "resnet110": (1_736_564, 1.74),
    "resnet32": (472_756, 0.47),
}


@pytest.mark.parametrize("name", sorted(LITERATURE_100))
def test_parameter_counts_of_the_distillation_literature_at_100_classes(name):
    exact, published_m = LITERATURE_100[name]
    n = n_params(build_model(name, 100))
    assert n == exact
    assert round(n / 1e6, 2) == published_m


@pytest.mark.parametrize("name", ["resnet8x4", "resnet32x4"])
def test_wide_cifar_resnets_as_repdistiller_defines_them(name):
    """A 32-channel stem, then (depth − 2) / 6 basic blocks at each of 64, 128, 256 channels; the
    first block of every stage projects its shortcut (the stem's 32 channels differ from 64 too)."""
    model = build_model(name, 100)
    n = (int(name[len("resnet") : -len("x4")]) - 2) // 6
    assert model.stem[0].out_channels == 32
    assert [len(stage) for stage in model.stages] == [n, n, n]
    assert [stage[0].conv1.out_channels for stage in model.stages] == [64, 128, 256]
    assert [stage[0].conv1.stride for stage in model.stages] == [(1, 1), (2, 2), (2, 2)]
    assert all(not isinstance(stage[0].shortcut, torch.nn.Identity) for stage in model.stages)
    assert model.fc.in_features == 256


@pytest.mark.parametrize(
    "name,size,side", [("resnet20", 64, 8), ("wrn16_2", 64, 8), ("resnet8", 16, 4), ("wrn10_1", 8, 2)]
)
def test_stem_strides_only_above_32px(name, size, side):
    with torch.no_grad():
        _, att = build_model(name, 10, size).eval()(torch.randn(1, 3, size, size), return_attention=True)
    assert att.shape == (1, side, side)


def test_registry_names():
    for ok in (
        "resnet8",
        "resnet8x4",
        "resnet32x4",
        "resnet110",
        "resnet18",
        "wrn28_2",
        "wrn16_4",
        "wrn40_1",
        "wrn10_8",
    ):
        assert is_model_name(ok), ok
    for bad in (
        "wrn27_2",
        "wrn28_0",
        "wrn4_1",
        "wrn028_2",
        "wrn28-2",
        "wrn28_2x",
        "resnet9",
        "resnet",
        "foo",
        "",
        "resnet20x4",
        "resnet8x2",
    ):
        assert not is_model_name(bad), bad
    assert all(is_model_name(n) for n in MODEL_NAMES)
    assert n_params(build_model("wrn16_4", 10)) > n_params(build_model("wrn16_2", 10))
    for bad in ("resnet9", "wrn27_2"):
        with pytest.raises(ValueError, match=f"unknown model '{bad}'"):
            build_model(bad, 10)


@pytest.mark.parametrize("name", sorted(LAST))
def test_attention_is_the_channel_mean_of_the_last_stage(name):
    model = build_model(name, 5).eval()
    seen = []
    LAST[name](model).register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.no_grad():
        _, att = model(torch.randn(3, 3, 32, 32), return_attention=True)
    features = torch.relu(seen[0]) if name.startswith("wrn") else seen[0]
    assert len(seen) == 1  # no extra forward pass
    torch.testing.assert_close(att, features.mean(1))


@pytest.mark.parametrize("name", sorted(STEM))
def test_gradients_reach_the_stem(name):
    model = build_model(name, 10)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert STEM[name](model).weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(STEM))
def test_compiles_as_one_graph(name):
    # fullgraph=True fails on any graph break; the eager backend keeps this fast on a CPU.
    model = build_model(name, 5).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, att = compiled(x, return_attention=True)
        ref_logits, ref_att = model(x, return_attention=True)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(att, ref_att)
