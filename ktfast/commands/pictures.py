"""`ktfast show`, `ktfast attention`, `ktfast report`: a graph drawn as in the papers (or a model's
parameters and FLOPs), a run's attention maps, a run's curves or a search's study."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ktfast.args import UsageError, positive_int
from ktfast.config import TrainConfig
from ktfast.data import dataset_info
from ktfast.graph import Graph
from ktfast.graph_search.study import find_study
from ktfast.models import is_model_name
from ktfast.pictures.graph_figure import graph_figure
from ktfast.pictures.plots import (
    attention_figure,
    attention_samples,
    check_nodes,
    curves_figure,
    model_cost,
    picture_format,
    read_metrics,
    read_seed_runs,
    run_file,
    save_figure,
)
from ktfast.pictures.study_figure import study_figure


def register(sub) -> None:
    p = sub.add_parser(
        "show", help="draw a graph file as the papers do, or print a model's parameters and FLOPs"
    )
    p.add_argument("graph", nargs="?", help="graph file (JSON)")
    p.add_argument("-o", "--output", help="picture to write (.png, .pdf, .svg, …)")
    p.add_argument("--run", metavar="DIR", help="show each node's final test accuracy from this run")
    p.add_argument("--model", help="instead of a graph: a model name, to print its parameters and FLOPs")
    p.add_argument(
        "--dataset",
        help="with --model: the dataset whose image size and classes to use "
        f"(default {TrainConfig().dataset})",
    )
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("attention", help="attention maps of every model node of a run over test images")
    p.add_argument("run", metavar="RUN", help="run directory")
    p.add_argument("-o", "--output", required=True, help="picture to write")
    p.add_argument("--images", type=positive_int, default=6, help="test images, one row each (default 6)")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("report", help="accuracy and loss curves of every node of a run, or a search drawn")
    p.add_argument("run", metavar="RUN", nargs="?", help="run directory")
    p.add_argument("--storage", help="instead of a run: the storage of a search (as ktfast search takes it)")
    p.add_argument("--study", help="with --storage: the study (default: the storage's only study)")
    p.add_argument(
        "-o", "--output", help="picture to write (default RUN/curves.png; required with --storage)"
    )
    p.set_defaults(func=cmd_report)


def cmd_show(args) -> int:
    if (args.graph is None) == (args.model is None):
        raise UsageError("show: give exactly one of a graph file or --model NAME")
    if args.model is not None:
        return _show_model(args)
    for flag, value in (("--dataset", args.dataset), ("--data-dir", args.data_dir)):
        if value is not None:
            raise UsageError(f"{flag}: only with --model")
    if not args.output:
        raise UsageError("-o: required with a graph file")
    output = Path(args.output)
    picture_format(output)
    graph = Graph.load(args.graph)
    accuracies, title = None, graph.name
    if args.run:
        rows = read_metrics(Path(args.run), "--run")
        check_nodes(graph, rows, "--run")
        accuracies = {name: rows[-1]["test"][name]["acc"] for name in graph.nodes}
        title = f"{graph.name}: test accuracy (%) after epoch {rows[-1]['epoch']}"
    if graph.user_code:  # drawing runs none of it, training would: say so before anyone does
        print(
            f"graph {graph.name} names user code, which training imports and runs: {', '.join(graph.user_code)}"
        )
    save_figure(graph_figure(graph, accuracies, title), output)
    print(output)
    return 0


def _show_model(args) -> int:
    for flag, value in (("-o", args.output), ("--run", args.run)):
        if value is not None:
            raise UsageError(f"{flag}: not with --model (it prints, it draws nothing)")
    if not is_model_name(args.model):
        raise UsageError(f"--model: unknown model {args.model!r}")
    dataset = args.dataset or TrainConfig().dataset
    info = dataset_info(dataset, args.data_dir)
    params, flops = model_cost(args.model, info.num_classes, info.image_size)
    print(
        f"model       {args.model}, {info.num_classes} classes, one 3x{info.image_size}x{info.image_size} "
        f"image ({dataset})"
    )
    print(f"parameters  {params:,} ({params / 1e6:.2f} M)")
    print(
        f"FLOPs       {flops:,} ({flops / 1e6:.2f} M), 2 per multiply-add of convolutions and matrix products"
    )
    print(f"MACs        {flops // 2:,} ({flops / 2e6:.2f} M), multiply-adds: what the EKD paper calls FLOPs")
    return 0


def cmd_attention(args) -> int:
    output = Path(args.output)
    picture_format(output)
    run = Path(args.run)
    samples = attention_samples(run, args.images)
    save_figure(
        attention_figure(samples, f"{run.name}: attention map, prediction and entropy H (nats)"), output
    )
    print(output)
    return 0


def cmd_report(args) -> int:
    if (args.run is None) == (args.storage is None):
        raise UsageError("report: give exactly one of a run directory or --storage URL (a search)")
    if args.storage is not None:
        return _report_study(args)
    if args.study is not None:
        raise UsageError("--study: only with --storage")
    run = Path(args.run)
    output = Path(args.output) if args.output else run / "curves.png"
    picture_format(output)
    runs = read_seed_runs(run)  # a run of several seeds: each seed's curves and their band
    seeds = [s for s in runs if s is not None]
    graph = Graph.load(run_file(run / f"seed{seeds[0]}" if seeds else run, "graph.json"))
    for rows in runs.values():
        check_nodes(graph, rows, "RUN")
    listed = ", ".join(map(str, seeds))
    title = f"{graph.name} ({run}{f', seeds {listed}: mean ± std' if len(seeds) > 1 else ''})"
    save_figure(curves_figure(graph, runs if len(seeds) > 1 else next(iter(runs.values())), title), output)
    print(output)
    return 0


def _report_study(args) -> int:
    if not args.output:
        raise UsageError("-o: required with --storage")
    output = Path(args.output)
    picture_format(output)
    study = find_study(args.storage, args.study)
    counts = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    title = f"study {study.study_name}: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    save_figure(study_figure(study, title), output)
    print(output)
    return 0
