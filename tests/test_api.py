"""The Python API (docs/ARCHITECTURE.md §8) and `ktfast train --like` (§7): `ktfast.train` computes what the command
computes, callbacks see every row, `load_run` reads the run back, `TransferStep` in a user's own loop
is the Trainer's step, `--like RUN` reproduces RUN; bad input is a typed error (API) or exit 2 (CLI)
with nothing written."""

import json
from pathlib import Path

import pytest
import torch
from graphs import LABELS, pair

import ktfast
from ktfast.cli import main
from ktfast.config import TrainConfig
from ktfast.engine.run import make_trainer
from ktfast.models import build_model

TINY = "synthetic:classes=4,size=16,train=64,test=16"
# Two resnet8 with a linear and a correct gate: the time gates need the step count, the correct gate
# reads the source's predictions; both differ at once if a step is taken out of turn.
GRAPH = pair(*LABELS, ("b", "a", "kl", "correct"), ("a", "b", "kl", "linear"))
FLAGS = dict(dataset=TINY, epochs=2, batch_size=32, lr=0.05, device="cpu")
TIMES = ("time_s", "images_per_s")

pytestmark = pytest.mark.usefixtures("private_cache", "in_tmp")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cli_flags(flags: dict) -> list[str]:
    return [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def rows(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def graph_file(tmp_path):
    path = tmp_path / "pair.json"
    path.write_text(json.dumps(GRAPH))
    return path


def test_api_train_equals_the_command_and_calls_back_each_epoch(graph_file, capsys):
    """Same flags, same computation on the CPU (one implementation, seeded): the rows agree exactly
    but for the time fields. The callback gets each row once, in order; load_run reads back the
    same metrics and the models as the run left them."""
    assert main(["train", "--graph", str(graph_file), "--out", "cli", "--quiet", *cli_flags(FLAGS)]) == 0
    seen, _ = [], capsys.readouterr()
    run = ktfast.train(str(graph_file), out="api", callbacks=[seen.append], **FLAGS)
    assert capsys.readouterr() == ("", "")  # the library prints nothing unless progress=True
    assert run.dir == Path("api") and len(run.metrics) == 2
    assert untimed(run.metrics) == untimed(rows(Path("cli")))
    assert seen == run.metrics  # once per epoch, with the row metrics.jsonl holds
    assert run.summary == json.loads(Path("cli/summary.json").read_text())  # every run writes one
    assert run.summary["nodes"]["a"]["last"]["per_seed"] == [run.metrics[-1]["test"]["a"]["acc"]]
    assert json.loads(Path("api/config.json").read_text()) == json.loads(Path("cli/config.json").read_text())
    back = ktfast.load_run("api")
    assert back.metrics == run.metrics and back.per_seed == {0: run.metrics}
    for name, model in run.models.items():
        theirs = back.models[name].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items()), name


def test_like_reproduces_the_run_and_a_flag_given_overrides_it(graph_file, capsys):
    """`--like RUN` trains RUN's graph with RUN's config (its seed too): the same rows, exactly. A flag
    given with it changes that field of config.json and nothing else."""
    assert (
        main(
            [
                "train",
                "--graph",
                str(graph_file),
                "--out",
                "first",
                "--quiet",
                "--seeds",
                "3",
                *cli_flags({**FLAGS, "epochs": 1, "train_fraction": 0.5}),
            ]
        )
        == 0
    )
    assert main(["train", "--like", "first", "--out", "again", "--quiet"]) == 0
    assert untimed(rows(Path("again"))) == untimed(rows(Path("first")))
    assert main(["train", "--like", "first", "--out", "lower", "--lr", "0.02", "--quiet"]) == 0
    first, lower = (json.loads(Path(d, "config.json").read_text()) for d in ("first", "lower"))
    assert lower["lr"] == 0.02 and first["lr"] == 0.05 and lower["seed"] == 3
    assert {k for k in first if first[k] != lower[k]} == {"lr"}
    assert ktfast.train(like="first", out="api-like", lr=0.02).config == TrainConfig.from_dict(lower)


@pytest.mark.parametrize("case", ["missing run", "not a run", "malformed config", "like and resume"])
def test_an_unreadable_like_run_exits_2_with_one_line_and_writes_nothing(case, graph_file, capsys):
    Path("broken").mkdir()
    if case != "not a run":
        (Path("broken") / "graph.json").write_text(json.dumps(GRAPH))
        (Path("broken") / "config.json").write_text("{" if case == "malformed config" else "{}")
    like = "nowhere" if case == "missing run" else "broken"
    extra = ["--resume", "broken"] if case == "like and resume" else []
    assert main(["train", "--like", like, "--out", "new", *extra, *cli_flags(FLAGS)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--like" in err[0], err
    assert not Path("new").exists()
    with pytest.raises(ktfast.ConfigError, match="--like"):
        ktfast.train(like=like, out="new", **({"resume": "broken"} if extra else {}), **FLAGS)
    assert not Path("new").exists()


@pytest.mark.parametrize(
    "keywords, named",
    [
        ({"epoch": 2}, "'epoch'"),
        ({"batch_size": 0}, "--batch-size"),
        ({"seeds": [1, 1]}, "--seeds"),
        ({"optimizer": "adamw"}, "--optimizer"),
        ({"lr": -1.0}, "--lr"),
    ],
)
def test_bad_keywords_raise_config_error_naming_them_and_write_nothing(keywords, named, graph_file, capsys):
    with pytest.raises(ktfast.ConfigError, match=named):
        ktfast.train(graph_file, out="new", **{**FLAGS, **keywords})
    assert not Path("new").exists() and capsys.readouterr().out == ""
    with pytest.raises(ktfast.ConfigError, match="load_run"):
        ktfast.load_run("nowhere")
    with pytest.raises(ktfast.GraphError):
        ktfast.train({**GRAPH, "target": "c"}, out="new", **FLAGS)


def test_transfer_step_in_a_users_loop_equals_the_trainer_step_for_step():
    """The user's loop of docs/ARCHITECTURE.md §8 beside `ktfast train`'s Trainer, from the same seeded models and
    the same batches, with an optimizer the user builds as the run's (Nesterov SGD): the same
    operations in the same order on this CPU, so the weights and each step's losses agree exactly."""
    graph = ktfast.Graph.from_dict(GRAPH)
    cfg = TrainConfig(**{**FLAGS, "epochs": 1}, momentum=0.9, weight_decay=5e-4)
    trainer = make_trainer(graph, cfg, out=None, progress=False)
    models = {k: build_model("resnet8", 4, 16) for k in trainer.models}  # the user's own modules
    for k, m in models.items():
        m.load_state_dict(trainer.models[k].state_dict())
    params = [p for m in models.values() for p in m.parameters()]
    # -- the user's loop --
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    step = ktfast.TransferStep(graph, models, optimizer, total_steps=trainer.total_steps)
    trainer.train_loader.set_epoch(0)
    for k, (x, y) in enumerate(trainer.train_loader, 1):
        losses = step(x, y)
        # -- ktfast train's step on the same batch --
        trainer.loss_sums.zero_()  # the step adds its L_t here
        trainer.train_step(x, y, k)
        assert losses == dict(zip(graph.nodes, trainer.loss_sums.tolist())), k
        for name, model in models.items():
            for (n, p), q in zip(model.state_dict().items(), trainer.models[name].state_dict().values()):
                assert torch.equal(p, q), (k, name, n)
    assert k == trainer.total_steps == 2


def test_transfer_step_needs_every_model_and_the_step_count():
    graph = ktfast.Graph.from_dict(GRAPH)
    models = {"a": torch.nn.Linear(2, 2)}
    with pytest.raises(ktfast.ConfigError, match="'b'"):
        ktfast.TransferStep(graph, models, torch.optim.SGD(models["a"].parameters(), lr=0.1))
    models["b"] = torch.nn.Linear(2, 2)
    with pytest.raises(ktfast.ConfigError, match="total_steps"):
        ktfast.TransferStep(graph, models, torch.optim.SGD(models["a"].parameters(), lr=0.1))


@cuda
def test_transfer_step_is_captured_as_a_cuda_graph_and_equals_the_eager_step(monkeypatch):
    """On CUDA, TransferStep is the fast step: captured once and replayed. Replays compute what the
    eager fast step computes (the same kernels in the same order, deterministic cuDNN): fp32's own
    tolerance, 8 ulps of the values, as tests/test_fast.py derives it."""
    monkeypatch.delenv("KTFAST_KERNELS")  # the fused kernels, as a run on CUDA takes them
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    graph = ktfast.Graph.from_dict(GRAPH)
    trainer = make_trainer(
        graph, TrainConfig(**{**FLAGS, "device": "cuda", "epochs": 1}), out=None, progress=False
    )
    batches = [(x.clone(), y.clone()) for x, y in trainer.train_loader]
    runs = {}
    for captured in (True, False):
        models = {k: build_model("resnet8", 4, 16).cuda() for k in trainer.models}
        for k, m in models.items():
            m.load_state_dict(trainer.models[k].state_dict())
        optimizer = torch.optim.SGD(
            [p for m in models.values() for p in m.parameters()], lr=0.05, momentum=0.9
        )
        step = ktfast.TransferStep(graph, models, optimizer, total_steps=len(batches), cuda_graph=captured)
        losses = [step(x, y) for x, y in batches]
        assert step.paths["cuda_graph"] == ("on" if captured else "off") and step.paths["kernels"] == "triton"
        assert step.step.captures == (1 if captured else 0)
        runs[captured] = losses, {f"{k}.{n}": v for k, m in models.items() for n, v in m.state_dict().items()}
    eps = 8 * torch.finfo(torch.float32).eps
    for a, b in zip(runs[True][0], runs[False][0]):
        torch.testing.assert_close(a, b, rtol=eps, atol=eps)
    for name, value in runs[True][1].items():
        torch.testing.assert_close(value, runs[False][1][name], rtol=eps, atol=eps, msg=name)
