"""Networks a user might write, for `py:` model nodes (tests/test_user_models.py): plain nn.Modules
that know nothing of ktfast, and factories that go wrong in each way docs/ARCHITECTURE.md §3 names."""

from torch import nn

BUILT = []  # the keywords of every call, for the test of what the factory is handed


class TinyNet(nn.Module):
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def tiny_net(num_classes, image_size):
    BUILT.append({"num_classes": num_classes, "image_size": image_size})
    return TinyNet(num_classes)


def no_image_size(num_classes):
    return TinyNet(num_classes)


def growing(num_classes, _calls=[]):  # noqa: B006 (the list counts the calls, on purpose)
    """Another width on each call: two nodes of it cannot be stacked."""
    _calls.append(1)
    return TinyNet(num_classes, width=4 * len(_calls))


def raises(num_classes):
    raise RuntimeError("no weights here\nsecond line")


def not_a_module(num_classes):
    return "a string"


def wrong_logits(num_classes):
    return TinyNet(num_classes + 1)
