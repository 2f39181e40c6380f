"""`ktfast search` and `ktfast export` (DESIGN §6): find the knowledge transfer graph that maximises the
accuracy of a target node (or of the ensemble of all nodes) on the held-out search split.

One Optuna study in a shared storage. Each worker is a process that loads the study and runs trials
one after another, so workers on any number of machines join a search by running the same command.
A trial samples a graph — the model of every node but the target, the gate of every edge (label edges
included), optionally the loss of every model-to-model edge — trains it on `search_train` and reports
its `search_val` accuracy after every epoch to the pruner (ASHA by default).

`--trials T` counts the trials that ran their graph (complete or pruned); a trial that fails — its
worker died, or its graph was rejected — is not counted, so re-running the command resumes the
search and T is reached exactly. A trial whose worker died is failed and queued again with the same
graph: through Optuna's heartbeats for SQLite and PostgreSQL; for a journal file (Optuna 5 has no
heartbeat there) by the workers of the same machine, which see that the process is gone.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from ktfast.cli import UsageError, _positive_int, add_recipe_args, config_from_args
from ktfast.config import TrainConfig
from ktfast.data import dataset_info
from ktfast.graph import ATTENTION_TERMS, DEFAULT_CROPS, GAMMA_GATES, GATES, LABEL, LOSS_TERMS, Graph

DEFAULT_STORAGE = "sqlite:///ktfast-search.db"
DEFAULT_MODELS = ("resnet32", "resnet110", "wrn28_2")
DEFAULT_GATES = ("through", "cutoff", "linear", "correct")  # the papers' four; the others on request
OBJECTIVES = ("target", "ensemble")
PRUNERS = ("asha", "hyperband", "median", "none")
SAMPLERS = ("random", "tpe")
TARGET = "n1"  # node 1 of the papers: the node whose accuracy is searched for
ENSEMBLE = "ens"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that --trials counts
# γ of an edge whose sampled gate is gamma or negative_gamma: (k/k_end)^(1/γ) opens late for γ < 1 and
# early for γ > 1; γ = 1 is left out, since it is the linear gates.
GAMMAS = (0.25, 0.5, 2.0, 4.0)
MAX_RETRY = 3  # a graph whose worker keeps dying (killed for memory, say) is given up after this
SQLITE_TIMEOUT_S = 120  # how long an SQLite writer waits for the lock before "database is locked"
LOCK_RETRIES = 5
POLL_S = 1.0


# ---- the search space ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Space:
    nodes: int
    target_model: str
    models: tuple[str, ...]  # the choices for every node but the target
    gates: tuple[str, ...]
    losses: tuple[str, ...] | None  # the choices for model-to-model edges; None: always kl
    objective: str  # "target" | "ensemble"

    @classmethod
    def from_dict(cls, d: dict) -> "Space":
        losses = d["losses"]
        return cls(d["nodes"], d["target_model"], tuple(d["models"]), tuple(d["gates"]),
                   tuple(losses) if losses is not None else None, d["objective"])

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @property
    def names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    def edges(self) -> list[tuple[str, str]]:
        """(source, target) of every edge: N label edges and N(N-1) node edges, N² in all."""
        return [(s, t) for t in self.names for s in (LABEL, *self.names) if s != t]

    def sample(self, trial: optuna.Trial, name: str) -> dict:
        """The graph file of one trial; every edge is listed, cut off or not."""
        nodes = [{"name": TARGET, "model": self.target_model}]
        nodes += [{"name": n, "model": trial.suggest_categorical(f"model {n}", self.models)} for n in self.names[1:]]
        edges = []
        for s, t in self.edges():
            gate = trial.suggest_categorical(f"gate {s}->{t}", self.gates)
            loss = "ce" if s == LABEL else "kl"
            if s != LABEL and self.losses and gate != "cutoff":  # a cut-off edge has no loss to choose
                loss = trial.suggest_categorical(f"loss {s}->{t}", self.losses)
            edge = {"from": s, "to": t, "loss": loss, "gate": gate}
            if gate in GAMMA_GATES:
                edge["gamma"] = trial.suggest_categorical(f"gamma {s}->{t}", GAMMAS)
            edges.append(edge)
        target = TARGET
        if self.objective == "ensemble":
            nodes.append({"name": ENSEMBLE, "ensemble": self.names, "reduce": "mean", "detach": True})
            target = ENSEMBLE
        return {"version": 1, "name": name, "target": target, "nodes": nodes, "edges": edges}


def _listed(flag: str, text: str, valid, noun: str, expected: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not items:
        raise UsageError(f"{flag}: expected a comma-separated list, got {text!r}")
    for item in items:
        if not valid(item):
            raise UsageError(f"{flag}: unknown {noun} {item!r} (expected {expected})")
    return items


def _pair_loss(loss: str) -> bool:
    terms = loss.split("+")
    return len(set(terms)) == len(terms) and all(t in LOSS_TERMS and t != "ce" for t in terms)


def space_from_args(args) -> Space:
    from ktfast.models import MODEL_NAMES, is_model_name

    models = ", ".join(MODEL_NAMES)
    if not is_model_name(args.target_model):
        raise UsageError(f"--target-model: unknown model {args.target_model!r} (expected one of {models})")
    space = Space(
        nodes=args.nodes, target_model=args.target_model,
        models=_listed("--models", args.models, is_model_name, "model", f"one of {models}"),
        gates=_listed("--gates", args.gates, GATES.__contains__, "gate", ", ".join(GATES)),
        losses=_listed("--losses", args.losses, _pair_loss, "loss", "kl, cos, mse, att_mse, att_cos or a sum such as "
                       "kl+att_mse") if args.losses is not None else None,
        objective=args.objective)
    if space.objective == "target" and space.gates == ("cutoff",):
        raise UsageError("--gates: with cutoff alone every edge into the target is cut off, and the target frozen")
    return space


def check_attention_sizes(space: Space, dataset: str, data_dir) -> None:
    """An attention loss needs maps at least as large as its crops: say so now, not in every trial."""
    import torch

    from ktfast.models import build_model

    uses_attention = space.nodes > 1 and any(t in ATTENTION_TERMS for loss in space.losses or ()
                                             for t in loss.split("+"))
    if not uses_attention:
        return
    info = dataset_info(dataset, data_dir)
    x = torch.zeros(2, 3, info.image_size, info.image_size)
    for name in dict.fromkeys((space.target_model, *space.models)):
        with torch.no_grad():
            h, w = build_model(name, info.num_classes, info.image_size).eval()(x, return_attention=True)[1].shape[1:]
        if max(DEFAULT_CROPS) > min(h, w):
            raise UsageError(f"--losses: {name} has a {h}x{w} attention map on {dataset}, smaller than the "
                             f"{max(DEFAULT_CROPS)}x{max(DEFAULT_CROPS)} crop of the attention losses")


def recipe(cfg: TrainConfig) -> dict:
    """What must be the same for every worker of a study: everything but where and how fast it runs."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("device", "data_dir", "loader", "compile", "reference")}


# ---- storage -------------------------------------------------------------------------------------
def is_journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith(".log")


def shown(url: str) -> str:
    """The storage URL without its password, for messages."""
    if is_journal(url):
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _root_message(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _with_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads `postgresql://` as psycopg 3; psycopg2 (the `postgres` extra) serves as well."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
        return u.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """The storage a URL names: `journal:PATH` or a `.log` path is an Optuna journal file; anything else
    an SQLAlchemy URL (SQLite, PostgreSQL). Workers pass `heartbeat_interval`: a trial whose worker
    stops beating for `grace_period` seconds (default twice the interval) is failed and queued again."""
    try:
        if is_journal(url):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(_with_driver(url), engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                          grace_period=grace_period,
                                          heartbeat_stale_trial_callback=requeue if heartbeat_interval else None)
    except Exception as e:  # unreachable server, bad URL, missing directory: one line either way
        raise UsageError(f"--storage {shown(url)}: cannot open it: {_root_message(e)}") from None


def _locked(e: BaseException | None) -> bool:
    while e is not None:
        if "database is locked" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def retry_locked(fn, *args):
    """Call fn; when SQLite stays locked past its timeout, wait a little and try again."""
    for attempt in range(LOCK_RETRIES + 1):
        try:
            return fn(*args)
        except Exception as e:
            if not _locked(e) or attempt == LOCK_RETRIES:
                raise
            time.sleep(random.uniform(1, 2) * (attempt + 1))


def open_study(storage, name: str, space: Space, cfg: TrainConfig) -> optuna.Study:
    """Create the study, or join it when it was made by the same search; any other is an error."""
    try:
        study = retry_locked(lambda: optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                                         load_if_exists=True))
    except Exception as e:
        raise UsageError(f"--study {name}: cannot create or load it: {_root_message(e)}") from None
    mine = {**space.to_dict(), **json.loads(json.dumps(recipe(cfg)))}
    theirs = study.user_attrs.get("ktfast")
    if theirs is None:
        if study.get_trials(deepcopy=False):
            raise UsageError(f"--study {name}: the study was not made by ktfast search; choose another name")
        study.set_user_attr("ktfast", mine)
    elif theirs != mine:
        key = next(k for k in {**theirs, **mine} if theirs.get(k) != mine.get(k))
        raise UsageError(f"--study {name}: the study searches with {key}={theirs.get(key)!r}, not "
                         f"{mine.get(key)!r}; re-run it as it was started, or choose another --study")
    return study


def make_sampler(name: str) -> optuna.samplers.BaseSampler:
    # constant_liar: parallel TPE workers do not all sample around the same running trial
    return optuna.samplers.TPESampler(constant_liar=True) if name == "tpe" else optuna.samplers.RandomSampler()


def make_pruner(name: str, epochs: int, min_resource: int = 1) -> optuna.pruners.BasePruner:
    """The first decision at epoch `min_resource` (DESIGN §6): gates that act late in training
    look bad early, and a pruner that judges at epoch 1 is biased against them."""
    if name == "asha":  # the papers' ASHA: rungs at epochs m, 2m, 4m, …, the top half goes on
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_resource, max_resource=epochs, reduction_factor=2)
    if name == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=min_resource - 1)
    return optuna.pruners.NopPruner()


# ---- trials of dead workers ----------------------------------------------------------------------
def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a dead worker's trial again with the same graph, through Optuna's retry callback. The
    copy trains from epoch 0: it must not inherit the dead run's ASHA rungs, nor its worker."""
    trial = copy.deepcopy(trial)
    trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith("completed_rung_")}
    trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != "worker"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


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
    retry_locked(trial.set_user_attr, "fail_reason", f"{kind}: {why}")
    raise SkippedTrial(f"{kind}: {why}")


def objective(trial: optuna.Trial, space: Space, cfg: TrainConfig, trials: int) -> float:
    from ktfast.pretrain import pretrain
    from ktfast.train import Trainer

    study = trial.study
    retry_locked(trial.set_user_attr, "worker", worker_tag())
    # Workers that start at the same moment may together pass --trials; the later ones give way.
    ahead = [t for t in study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
             if t.number < trial.number]
    if len(ahead) >= trials:
        _skip(trial, "surplus", f"{trials} trials were already finished or running")
    spec = space.sample(trial, f"{study.study_name}-trial{trial.number}")
    retry_locked(trial.set_user_attr, "graph", spec)  # what `ktfast export` writes, exactly
    graph = Graph.from_dict(spec)
    if space.objective == "target" and graph.nodes[TARGET].frozen:
        # The reference code raised an error for such a graph (its trial FAILED) and drew the next one.
        _skip(trial, "frozen target", f"every edge into {TARGET} is cut off: it would be a pre-trained teacher")
    quiet = lambda _: None  # noqa: E731
    for node in graph.model_nodes:
        if node.frozen and node.init == "pretrained":
            pretrain(node.model, cfg, log=quiet, progress=False)  # trained once on search_train, then cached

    def report(epoch: int, row: dict) -> None:
        retry_locked(trial.report, row["test"][graph.target]["acc"], epoch)
        # Asked every epoch, ASHA only decides at its rungs, epochs m, 2m, 4m, … (m = --min-resource):
        # below the next rung it answers no without looking. The last epoch is no decision: the trial is done.
        if epoch < cfg.epochs and retry_locked(trial.should_prune):
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")

    rows = Trainer(graph, cfg, out=None, log=quiet, progress=False).fit(on_epoch=report)
    return rows[-1]["test"][graph.target]["acc"]


def _counts(study: optuna.Study) -> Counter:
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def run_worker(spec: dict) -> None:
    """Run trials until the study has spec["trials"] counted ones."""
    import torch

    # Ctrl-C is the launcher's: it stops the workers, and their trials are retried on resume.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials keep their reason as a user attr
    cfg = TrainConfig.from_dict(spec["config"])
    space = Space.from_dict(spec["space"])
    trials, journal = spec["trials"], is_journal(spec["storage"])
    storage = open_storage(spec["storage"], spec["heartbeat_interval"], spec["grace_period"])
    study = optuna.load_study(study_name=spec["study"], storage=storage, sampler=make_sampler(spec["sampler"]),
                              pruner=make_pruner(spec["pruner"], cfg.epochs, spec["min_resource"]))
    while True:
        retry_locked(fail_stale, study, journal)
        counts = retry_locked(_counts, study)
        done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        if done >= trials:
            return
        if done + counts[TrialState.RUNNING] >= trials:
            time.sleep(POLL_S)  # the last trials run elsewhere: wait until they finish, or die and come back
            continue
        try:
            study.optimize(lambda t: objective(t, space, cfg, trials), n_trials=1, catch=(SkippedTrial,))
        except Exception as e:
            if not _locked(e):
                raise
            # SQLite stayed locked past the retries: not this worker's fault. A trial left RUNNING
            # comes back once stale; one that got FAILED is not counted, and another takes its place.
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # the workers packed on this GPU share its memory between trials


# ---- the launcher ------------------------------------------------------------------------------------
def worker_devices(args, cfg: TrainConfig) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker to start (None: a CPU worker)."""
    if cfg.device == "cpu":
        if args.gpus or args.trials_per_gpu:
            raise UsageError("--gpus/--trials-per-gpu: GPU workers need --device cuda; on the CPU use --workers")
        return [None] * (args.workers or 1)
    if args.workers:
        raise UsageError("--workers: counts CPU workers; on GPUs use --gpus and --trials-per-gpu")
    if args.gpus:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    elif os.environ.get("CUDA_VISIBLE_DEVICES"):
        gpus = os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    else:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if not gpus:
        raise UsageError(f"--gpus: expected GPU ids such as 0,1, got {args.gpus!r}")
    return [g for g in gpus for _ in range(args.trials_per_gpu or 1)]


def launch(spec: dict, devices: list[str | None]) -> list[subprocess.Popen]:
    threads = max(1, (os.cpu_count() or 1) // len(devices))  # the workers share the CPU cores
    procs = []
    for device in devices:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device  # the worker sees its GPU alone, as cuda:0
        procs.append(subprocess.Popen([sys.executable, "-m", "ktfast.search", json.dumps(spec)], env=env))
    return procs


def _exit_text(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def watch(study: optuna.Study, procs: list[subprocess.Popen], devices: list, trials: int, quiet: bool) -> None:
    """One bar of counted trials until every worker has exited."""
    def postfix(trial_list):
        counts = Counter(t.state for t in trial_list)
        values = [t.value for t in trial_list if t.state == TrialState.COMPLETE]
        return counts, {"complete": counts[TrialState.COMPLETE], "pruned": counts[TrialState.PRUNED],
                        "failed": counts[TrialState.FAIL], "best": f"{max(values):.2%}" if values else "-"}

    counts, post = postfix(study.get_trials(deepcopy=False))
    done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    with tqdm(total=trials, initial=min(done, trials), desc="search", unit="trial", disable=quiet,
              dynamic_ncols=True) as bar:
        bar.set_postfix(post)
        live = dict(enumerate(procs))
        while live:
            time.sleep(POLL_S)
            for i, p in list(live.items()):
                if p.poll() is not None:
                    del live[i]
                    if p.returncode:
                        where = f"GPU {devices[i]}" if devices[i] is not None else "CPU"
                        tqdm.write(f"worker {i} ({where}, pid {p.pid}) {_exit_text(p.returncode)}", file=sys.stderr)
            counts, post = postfix(retry_locked(lambda: study.get_trials(deepcopy=False)))
            bar.n = min(counts[TrialState.COMPLETE] + counts[TrialState.PRUNED], trials)
            bar.set_postfix(post)


def summary(study: optuna.Study, url: str, trials: int, top: int = 5) -> str:
    all_trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state for t in all_trials)
    done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    reasons = Counter(t.user_attrs.get("fail_reason", "worker died or error").split(":")[0]
                      for t in all_trials if t.state == TrialState.FAIL)
    failed = f", {counts[TrialState.FAIL]} failed ({', '.join(f'{n} {r}' for r, n in reasons.items())})" if reasons else ""
    # A pruned trial's last report is the epoch at which the pruner stopped it.
    pruned_at = Counter(max(t.intermediate_values) for t in all_trials
                        if t.state == TrialState.PRUNED and t.intermediate_values)
    when = f" ({', '.join(f'at epoch {e}: {n}' for e, n in sorted(pruned_at.items()))})" if pruned_at else ""
    lines = [f"{done} of {trials} trials finished: {counts[TrialState.COMPLETE]} complete, "
             f"{counts[TrialState.PRUNED]} pruned{when}{failed}"]
    best = sorted((t for t in all_trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)[:top]
    store, name = shlex.quote(shown(url)), shlex.quote(study.study_name)
    if best:
        objective = study.user_attrs.get("ktfast", {}).get("objective", "target")
        lines.append(f"top graphs: {'ensemble' if objective == 'ensemble' else TARGET} accuracy on search_val")
        lines.append(f"{'trial':>6} {'acc %':>7}  {'models':<36} {'edges on':>8}")
        for t in best:
            g = t.user_attrs["graph"]
            models = ",".join(n["model"] for n in g["nodes"] if "model" in n)
            on = f"{sum(e['gate'] != 'cutoff' for e in g['edges'])}/{len(g['edges'])}"
            lines.append(f"{t.number:>6} {100 * t.value:>7.2f}  {models:<36} {on:>8}")
        lines.append(f"export the best: ktfast export --storage {store} --study {name} -o best.json")
    lines.append(f"storage {store}, study {name}; to see it: optuna-dashboard {shlex.quote(shown(url).removeprefix('journal:'))}")
    return "\n".join(lines)


def cmd_search(args) -> int:
    space = space_from_args(args)
    cfg = config_from_args(args).replace(split="search")
    dataset_info(cfg.dataset, cfg.data_dir)
    check_attention_sizes(space, cfg.dataset, cfg.data_dir)
    devices = worker_devices(args, cfg)
    if args.min_resource > cfg.epochs:
        raise UsageError(f"--min-resource: the first rung, epoch {args.min_resource}, is past --epochs {cfg.epochs}")
    if args.grace_period is not None and args.grace_period <= args.heartbeat_interval:
        raise UsageError("--grace-period: must be longer than --heartbeat-interval")
    name = args.study or f"{cfg.dataset}-{space.nodes}n-{space.target_model}-{space.objective}"
    study = open_study(open_storage(args.storage), name, space, cfg)
    done = sum(1 for _ in study.get_trials(deepcopy=False, states=COUNTED))
    if done < args.trials:
        spec = {"storage": args.storage, "study": name, "trials": args.trials, "space": space.to_dict(),
                "config": cfg.to_dict(), "sampler": args.sampler, "pruner": args.pruner,
                "min_resource": args.min_resource,
                "heartbeat_interval": args.heartbeat_interval, "grace_period": args.grace_period}
        procs = launch(spec, devices)
        try:
            watch(study, procs, devices, args.trials, args.quiet)
        finally:  # on Ctrl-C too: the stopped workers' trials are failed and retried on resume
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait()
    print(summary(study, args.storage, args.trials), flush=True)
    done = sum(1 for _ in study.get_trials(deepcopy=False, states=COUNTED))
    if done < args.trials:
        print(f"ktfast: the workers stopped with {done} of {args.trials} trials finished; run the same command "
              f"again to resume", file=sys.stderr)
        return 1
    return 0


# ---- export ------------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    storage = open_storage(args.storage)
    names = optuna.get_all_study_names(storage)
    name = args.study
    if name is None:
        if len(names) != 1:
            raise UsageError(f"--study: required, the storage holds {len(names)} studies: {', '.join(names) or '-'}")
        name = names[0]
    if name not in names:
        raise UsageError(f"--study: no study {name!r} in {shown(args.storage)}")
    study = optuna.load_study(study_name=name, storage=storage)
    if args.trial is None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise UsageError(f"--study {name}: no complete trial yet")
        trial = max(complete, key=lambda t: t.value)
    else:
        trial = next((t for t in study.get_trials(deepcopy=False) if t.number == args.trial), None)
        if trial is None:
            raise UsageError(f"--trial: study {name} has no trial {args.trial}")
    if "graph" not in trial.user_attrs:
        raise UsageError(f"--trial: trial {trial.number} of {name} holds no graph")
    value = f"{trial.value:.2%} on search_val" if trial.value is not None else trial.state.name.lower()
    graph = dict(trial.user_attrs["graph"], description=f"ktfast search, study {name}, trial {trial.number}: {value}")
    Graph.from_dict(graph)  # what `ktfast train` will check
    try:
        Path(args.output).write_text(json.dumps(graph, indent=2) + "\n")
    except OSError as e:
        raise UsageError(f"-o: cannot write {args.output}: {e.strerror}") from None
    print(f"wrote {args.output}: trial {trial.number} of {name}, {value}")
    return 0


# ---- command line ------------------------------------------------------------------------------------
def add_search_commands(sub) -> None:
    p = sub.add_parser("search", help="search the graph that maximises the target's (or the ensemble's) "
                       "validation accuracy")
    p.add_argument("--nodes", type=_positive_int, required=True, help="number of model nodes, the target included")
    p.add_argument("--target-model", required=True, help="model of node 1, the target (the papers: resnet32)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="choices for the other nodes")
    p.add_argument("--gates", default=",".join(DEFAULT_GATES),
                   help=f"choices for every edge, label edges included, of {', '.join(GATES)} (default: "
                        f"%(default)s); an edge given gamma or negative_gamma also draws γ from {GAMMAS}")
    p.add_argument("--losses", default=None, help="choices for every model-to-model edge, e.g. "
                   "kl,cos,att_mse,att_cos,kl+att_mse,cos+att_cos (default: kl only)")
    p.add_argument("--objective", choices=OBJECTIVES, default="target",
                   help="the accuracy of node 1, or of an ensemble node (mean of all nodes' logits)")
    p.add_argument("--trials", type=_positive_int, required=True,
                   help="finished (complete or pruned) trials the study must have; re-running resumes")
    p.add_argument("--gpus", help="GPU ids as CUDA_VISIBLE_DEVICES takes them (default: all visible)")
    p.add_argument("--trials-per-gpu", type=_positive_int, help="workers per GPU (default 1)")
    p.add_argument("--workers", type=_positive_int, help="CPU workers (--device cpu; default 1)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="sqlite:///FILE (default %(default)s), journal:FILE or FILE.log, postgresql://…")
    p.add_argument("--study", help="study name (default: DATASET-Nn-TARGET_MODEL-OBJECTIVE)")
    p.add_argument("--pruner", choices=PRUNERS, default="asha")
    p.add_argument("--min-resource", type=_positive_int, default=1, metavar="N",
                   help="epoch of the pruner's first decision: ASHA's rungs at N, 2N, 4N, … (default 1)")
    p.add_argument("--sampler", choices=SAMPLERS, default="random")
    p.add_argument("--heartbeat-interval", type=_positive_int, default=60, metavar="S",
                   help="seconds between a worker's heartbeats (SQLite, PostgreSQL)")
    p.add_argument("--grace-period", type=_positive_int, default=None, metavar="S",
                   help="seconds without a heartbeat before a trial is failed and retried (default: twice the "
                        "interval)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_recipe_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="write a searched graph (the best complete trial) as a graph file")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--study", help="default: the storage's only study")
    p.add_argument("--trial", type=int, help="trial number (default: the best complete trial)")
    p.add_argument("-o", "--output", required=True, help="graph file to write")
    p.set_defaults(func=cmd_export)


if __name__ == "__main__":  # a worker, started by the launcher with its spec
    run_worker(json.loads(sys.argv[1]))
