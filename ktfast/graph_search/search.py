"""`ktfast search` and `ktfast export` (docs/ARCHITECTURE.md §6): find the knowledge transfer graph that maximises the
accuracy of a target node (or of the ensemble of all nodes) on the held-out search split.

One Optuna study in a shared storage. Each worker is a process that loads the study and runs trials
one after another (or K at a time, in threads: `ktfast.graph_search.packing`), so workers on any number of machines
join a search by running the same command.
A trial samples a graph — the model of every node but the target, the gate of every edge (label edges
included), optionally the loss of every model-to-model edge with the parameters that loss reads (DKD's β,
logit standardization, the temperature from `--temperatures`) and its weight, log-uniform in `--weights` —
trains it on `search_train` and reports
its `search_val` accuracy after every epoch to the pruner (ASHA by default); its user attr `data`
records both splits and their sizes.

`--trials T` counts the trials that ran their graph (complete or pruned); a trial that fails — its
worker died, or its graph was rejected — is not counted, so re-running the command resumes the
search and T is reached exactly. A trial whose worker died is failed and queued again with the same
graph: through Optuna's heartbeats for SQLite and PostgreSQL; for a journal file (Optuna 5 has no
heartbeat there) by the workers of the same machine, which see that the process is gone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass

import optuna
from optuna.trial import TrialState

from ktfast.config import TrainConfig
from ktfast.engine.run import make_trainer
from ktfast.engine.trainer import NonFiniteLoss
from ktfast.graph import GAMMA_GATES, LABEL, TEMPERED_TERMS, Graph
from ktfast.graph_search.packing import Slots
from ktfast.graph_search.study import is_journal, make_pruner, make_sampler, open_storage, requeue

DEFAULT_MODELS = ("resnet32", "resnet110", "wrn28_2")
OBJECTIVES = ("target", "ensemble")
PRUNERS = ("asha", "hyperband", "median", "none")
SAMPLERS = ("random", "tpe")
TARGET = "n1"  # node 1 of the papers: the node whose accuracy is searched for
ENSEMBLE = "ens"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that --trials counts
# γ of an edge whose sampled gate is gamma or negative_gamma: (k/k_end)^(1/γ) opens late for γ < 1 and
# early for γ > 1; γ = 1 is left out, since it is the linear gates.
GAMMAS = (0.25, 0.5, 2.0, 4.0)
# β of an edge whose sampled loss has a dkd term: DKD's weight of the non-target classes (its paper uses
# 1 to 8 by dataset); α, the weight of the target class, stays 1.
BETAS = (1.0, 2.0, 4.0, 8.0)
STANDARDIZE = ("off", "on", "search")  # `standardize` on the edges whose loss has a tempered term
POLL_S = 1.0
# A worker's program. Not `python -m`: importing ktfast (its API) imports this module, and runpy
# would then run a second copy of it.
WORKER = (
    "import json, sys; from ktfast.graph_search.search import run_worker; run_worker(json.loads(sys.argv[1]))"
)


# ---- the search space ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Space:
    nodes: int
    target_model: str
    models: tuple[str, ...]  # the choices for every node but the target
    gates: tuple[str, ...]
    losses: tuple[str, ...] | None  # the choices for model-to-model edges; None: always kl
    objective: str  # "target" | "ensemble"
    standardize: str = "off"  # "off" | "on" (fixed) | "search" (a choice per edge whose loss allows it)
    # The choices of T of every model-to-model edge whose loss reads it (None: T = 1), and the range
    # (low, high) its weight is drawn from, log-uniformly (None: weight 1).
    temperatures: tuple[float, ...] | None = None
    weights: tuple[float, float] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Space:
        losses, temperatures, weights = d["losses"], d.get("temperatures"), d.get("weights")
        return cls(
            d["nodes"],
            d["target_model"],
            tuple(d["models"]),
            tuple(d["gates"]),
            tuple(losses) if losses is not None else None,
            d["objective"],
            d.get("standardize", "off"),
            tuple(temperatures) if temperatures is not None else None,
            tuple(weights) if weights is not None else None,
        )

    # Fields left out of to_dict at these values, as studies made before them recorded nothing: such a
    # study can still be joined, and a mismatch is told with the value the field stands for.
    UNRECORDED_DEFAULTS = {"standardize": "off", "temperatures": None, "weights": None}

    def to_dict(self) -> dict:
        d = json.loads(json.dumps(asdict(self)))
        for key, default in self.UNRECORDED_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d

    @property
    def names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    def edges(self) -> list[tuple[str, str]]:
        """(source, target) of every edge: N label edges and N(N-1) node edges, N² in all."""
        return [(s, t) for t in self.names for s in (LABEL, *self.names) if s != t]

    def sample(self, trial: optuna.Trial, name: str) -> dict:
        """The graph file of one trial; every edge is listed, cut off or not."""
        nodes = [{"name": TARGET, "model": self.target_model}]
        nodes += [
            {"name": n, "model": trial.suggest_categorical(f"model {n}", self.models)} for n in self.names[1:]
        ]
        edges = []
        for s, t in self.edges():
            gate = trial.suggest_categorical(f"gate {s}->{t}", self.gates)
            loss = "ce" if s == LABEL else "kl"
            if s != LABEL and self.losses and gate != "cutoff":  # a cut-off edge has no loss to choose
                loss = trial.suggest_categorical(f"loss {s}->{t}", self.losses)
            edge = {"from": s, "to": t, "loss": loss, "gate": gate}
            if gate in GAMMA_GATES:
                edge["gamma"] = trial.suggest_categorical(f"gamma {s}->{t}", GAMMAS)
            if gate != "cutoff":  # a cut-off edge computes no loss: nothing of it to choose
                edge.update(self.loss_fields(trial, s, t, loss.split("+")))
            edges.append(edge)
        target = TARGET
        if self.objective == "ensemble":
            nodes.append({"name": ENSEMBLE, "ensemble": self.names, "reduce": "mean", "detach": True})
            target = ENSEMBLE
        return {"version": 1, "name": name, "target": target, "nodes": nodes, "edges": edges}

    def loss_fields(self, trial: optuna.Trial, s: str, t: str, terms: list[str]) -> dict:
        """The fields the loss of edge s->t reads beyond its name, all written out (sampled or fixed by the
        search), so that the exported graph trains this edge even if a default of the graph file changes.
        The label edges (ce) keep weight 1: the transfer edges are weighed against them."""
        fields = {}
        if self.weights and s != LABEL:
            fields["weight"] = trial.suggest_float(f"weight {s}->{t}", *self.weights, log=True)
        if self.temperatures and any(term in TEMPERED_TERMS for term in terms):
            fields["temperature"] = trial.suggest_categorical(f"temperature {s}->{t}", self.temperatures)
        if "dkd" in terms:
            fields["alpha"] = 1.0
            fields["beta"] = trial.suggest_categorical(f"beta {s}->{t}", BETAS)
        if any(term in TEMPERED_TERMS for term in terms):
            fields["standardize"] = (
                trial.suggest_categorical(f"standardize {s}->{t}", (False, True))
                if self.standardize == "search"
                else self.standardize == "on"
            )
        return fields

    def allows_standardize(self) -> bool:
        """Whether any edge of the space may have a loss that `standardize` changes (label edges never do)."""
        return self.nodes > 1 and any(
            term in TEMPERED_TERMS for loss in self.losses or ("kl",) for term in loss.split("+")
        )


# ---- trials of dead workers ----------------------------------------------------------------------
def worker_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    return True


def fail_stale(study: optuna.Study, journal: bool) -> None:
    """Fail the trials of dead workers and queue them again."""
    if not journal:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # heartbeats: the workers of every machine
        return
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tag_host, _, pid = t.user_attrs.get("worker", "").rpartition(":")
        if tag_host == host and not _alive(int(pid)):
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another worker failed it first, and queued it again
            requeue(study, t)


# ---- a worker --------------------------------------------------------------------------------------
class SkippedTrial(Exception):
    """A trial that does not train: FAIL with its reason, not counted, not retried."""


def _skip(trial: optuna.Trial, kind: str, why: str):
    trial.set_user_attr("fail_reason", f"{kind}: {why}")
    raise SkippedTrial(f"{kind}: {why}")


def objective(trial: optuna.Trial, space: Space, cfg: TrainConfig, trials: int) -> float:
    study = trial.study
    trial.set_user_attr("worker", worker_tag())
    # Workers that start at the same moment may together pass --trials; the later ones give way.
    ahead = [
        t
        for t in study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
        if t.number < trial.number
    ]
    if len(ahead) >= trials:
        _skip(trial, "surplus", f"{trials} trials were already finished or running")
    spec = space.sample(trial, f"{study.study_name}-trial{trial.number}")
    trial.set_user_attr("graph", spec)  # what `ktfast export` writes, exactly
    graph = Graph.from_dict(spec)
    if space.objective == "target" and graph.nodes[TARGET].frozen:
        # The reference code raised an error for such a graph (its trial FAILED) and drew the next one.
        _skip(
            trial, "frozen target", f"every edge into {TARGET} is cut off: it would be a pre-trained teacher"
        )
    quiet = lambda _: None  # noqa: E731

    def report(epoch: int, row: dict) -> None:
        trial.report(row["test"][graph.target]["acc"], epoch)
        # Asked every epoch, ASHA only decides at its rungs, epochs m, 2m, 4m, … (m = --min-resource):
        # below the next rung it answers no without looking. The last epoch is no decision: the trial is done.
        if epoch < cfg.epochs and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")

    # Pre-trained teachers are trained once on search_train, then cached for every trial.
    try:
        trainer = make_trainer(graph, cfg, out=None, log=quiet, progress=False)
        # What the trial trains on and is scored on, as its loaders hold them (the test set is never one).
        train, scored = trainer.train_loader, trainer.eval_loader
        trial.set_user_attr(
            "data",
            {
                "train": train.split,
                "train_images": train.num_samples,
                "scored_on": scored.split,
                "scored_images": scored.num_samples,
            },
        )
        rows = trainer.fit(on_epoch=report)
    except NonFiniteLoss as e:  # a graph that diverges is a result of the search, not a worker's fault
        _skip(trial, "non-finite loss", str(e))
    return rows[-1]["test"][graph.target]["acc"]


def _counts(study: optuna.Study) -> Counter:
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def run_worker(spec: dict) -> None:
    """Run trials until the study has spec["trials"] counted ones, spec["slots"] at a time (threads of
    this process, `ktfast.graph_search.packing`)."""
    # Ctrl-C is the launcher's: it stops the workers, and their trials are retried on resume.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials keep their reason as a user attr
    cfg = TrainConfig.from_dict(spec["config"])
    space = Space.from_dict(spec["space"])
    trials, journal = spec["trials"], is_journal(spec["storage"])
    slots = Slots(spec.get("slots", 1), cfg.device.startswith("cuda"))
    study = worker_study(spec, cfg, slots)
    slots.run(lambda stop: trial_loop(study, space, cfg, trials, journal, slots, stop))


def worker_study(spec: dict, cfg: TrainConfig, slots: Slots) -> optuna.Study:
    storage = open_storage(spec["storage"], spec["heartbeat_interval"], spec["grace_period"])
    study = optuna.load_study(
        study_name=spec["study"],
        storage=storage,
        sampler=make_sampler(spec["sampler"]),
        pruner=make_pruner(spec["pruner"], cfg.epochs, spec["min_resource"]),
    )
    # On SQLite, Optuna reads that a queued trial (enqueued, or a retry) waits and marks it running in
    # two steps: two slots asking at once would both take it. Optuna's optimize calls study.ask.
    study.ask = slots.in_turn(study.ask)
    return study


def trial_loop(
    study: optuna.Study, space: Space, cfg: TrainConfig, trials: int, journal: bool, slots: Slots, stop
) -> None:
    """One slot of a worker: trials one after another, until the study is done or `stop` is set."""
    while not stop.is_set():
        fail_stale(study, journal)
        counts = _counts(study)
        done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        if done >= trials:
            return
        if done + counts[TrialState.RUNNING] >= trials:
            time.sleep(POLL_S)  # the last trials run elsewhere: wait until they finish, or die and come back
            continue
        with slots.trial():
            study.optimize(lambda t: objective(t, space, cfg, trials), n_trials=1, catch=(SkippedTrial,))
