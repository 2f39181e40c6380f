"""The worker processes of a search (docs/ARCHITECTURE.md §6): launched on their devices (with K
trials packed in each, `ktfast.graph_search.packing`), watched until the study has its trials, stopped
whole on an interrupt; and the summary of what they did."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from ktfast.graph_search.packing import MPSDaemon
from ktfast.graph_search.search import POLL_S, TARGET, WORKER
from ktfast.graph_search.study import shown


# ---- the launcher ------------------------------------------------------------------------------------
def launch(spec: dict, devices: list[str | None], extra_env: dict | None = None) -> list[subprocess.Popen]:
    """A worker process per entry of `devices` (its GPU, or None: the CPU), `extra_env` in its environment."""
    threads = max(1, (os.cpu_count() or 1) // len(devices))  # the workers share the CPU cores
    procs = []
    for device in devices:
        env = dict(os.environ, **(extra_env or {}), OMP_NUM_THREADS=str(threads))
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device  # the worker sees its GPU alone, as cuda:0
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(spec)], env=env))
    return procs


def _exit_text(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def watch(
    study: optuna.Study, procs: list[subprocess.Popen], devices: list, trials: int, quiet: bool
) -> None:
    """One bar of counted trials until every worker has exited."""

    def postfix(trial_list):
        counts = Counter(t.state for t in trial_list)
        values = [t.value for t in trial_list if t.state == TrialState.COMPLETE]
        return counts, {
            "complete": counts[TrialState.COMPLETE],
            "pruned": counts[TrialState.PRUNED],
            "failed": counts[TrialState.FAIL],
            "best": f"{max(values):.2%}" if values else "-",
        }

    counts, post = postfix(study.get_trials(deepcopy=False))
    done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    with tqdm(
        total=trials,
        initial=min(done, trials),
        desc="search",
        unit="trial",
        disable=quiet,
        dynamic_ncols=True,
    ) as bar:
        bar.set_postfix(post)
        live = dict(enumerate(procs))
        while live:
            time.sleep(POLL_S)
            for i, p in list(live.items()):
                if p.poll() is not None:
                    del live[i]
                    if p.returncode:
                        where = f"GPU {devices[i]}" if devices[i] is not None else "CPU"
                        tqdm.write(
                            f"worker {i} ({where}, pid {p.pid}) {_exit_text(p.returncode)}", file=sys.stderr
                        )
            counts, post = postfix(study.get_trials(deepcopy=False))
            bar.n = min(counts[TrialState.COMPLETE] + counts[TrialState.PRUNED], trials)
            bar.set_postfix(post)


def _interrupt(*_):
    raise KeyboardInterrupt


def run_workers(
    study: optuna.Study, spec: dict, devices: list[str | None], pack: str, trials: int, quiet: bool
) -> None:
    """Start the workers as `pack` says and watch them to the end; on any exit (Ctrl-C and kill
    included) the workers are stopped, then the MPS daemon."""
    per_device = len(devices) // len(set(devices))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with ExitStack() as stack:
            extra_env = None
            if pack == "threads":
                devices, spec = list(dict.fromkeys(devices)), dict(spec, slots=per_device)
            elif pack == "mps" and per_device > 1:
                extra_env = stack.enter_context(MPSDaemon(devices[0], per_device)).env
            procs = launch(spec, devices, extra_env)
            try:
                watch(study, procs, devices, trials, quiet)
            finally:  # the stopped workers' trials are failed and retried on resume
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                for p in procs:
                    p.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def summary(study: optuna.Study, url: str, trials: int, top: int = 5) -> str:
    all_trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state for t in all_trials)
    done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    reasons = Counter(
        t.user_attrs.get("fail_reason", "worker died or error").split(":")[0]
        for t in all_trials
        if t.state == TrialState.FAIL
    )
    failed = (
        f", {counts[TrialState.FAIL]} failed ({', '.join(f'{n} {r}' for r, n in reasons.items())})"
        if reasons
        else ""
    )
    # A pruned trial's last report is the epoch at which the pruner stopped it.
    pruned_at = Counter(
        max(t.intermediate_values)
        for t in all_trials
        if t.state == TrialState.PRUNED and t.intermediate_values
    )
    when = f" ({', '.join(f'at epoch {e}: {n}' for e, n in sorted(pruned_at.items()))})" if pruned_at else ""
    lines = [
        f"{done} of {trials} trials finished: {counts[TrialState.COMPLETE]} complete, "
        f"{counts[TrialState.PRUNED]} pruned{when}{failed}"
    ]
    best = sorted((t for t in all_trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)[:top]
    store, name = shlex.quote(shown(url)), shlex.quote(study.study_name)
    if best:
        objective = study.user_attrs.get("ktfast", {}).get("objective", "target")
        lines.append(
            f"top graphs: {'ensemble' if objective == 'ensemble' else TARGET} accuracy on search_val"
        )
        lines.append(f"{'trial':>6} {'acc %':>7}  {'models':<36} {'edges on':>8}")
        for t in best:
            g = t.user_attrs["graph"]
            models = ",".join(n["model"] for n in g["nodes"] if "model" in n)
            on = f"{sum(e['gate'] != 'cutoff' for e in g['edges'])}/{len(g['edges'])}"
            lines.append(f"{t.number:>6} {100 * t.value:>7.2f}  {models:<36} {on:>8}")
        lines.append(f"export the best: ktfast export --storage {store} --study {name} -o best.json")
    lines.append(
        f"storage {store}, study {name}; to see it: optuna-dashboard {shlex.quote(shown(url).removeprefix('journal:'))}"
    )
    return "\n".join(lines)
