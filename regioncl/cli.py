"""The `regioncl` command: one subcommand per pipeline stage.

Snakemake rules call these; users can run the same commands by hand. Heavy imports (torch,
OpenCV) happen inside each subcommand so `regioncl --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def _settings(value: str) -> dict[str, Any]:
    """`--settings` takes inline JSON (what the rules pass) or a path to a YAML/JSON file."""
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"--settings: {value!r} is neither a JSON object nor a file")
        text = path.read_text()
    loaded = yaml.safe_load(text)
    if not isinstance(loaded, dict):
        raise argparse.ArgumentTypeError(f"--settings: expected a mapping, got {type(loaded).__name__}")
    return loaded


def _cmd_embedded(args: argparse.Namespace) -> None:
    from regioncl.data.embedded import EmbeddedSettings, generate_embedded

    generate_embedded(args.out, EmbeddedSettings.from_dict(args.settings))


def _cmd_images(args: argparse.Namespace) -> None:
    from regioncl.data.sources import list_images, write_image_list

    entries = list_images(args.layout, args.root)
    write_image_list(entries, args.out)
    print(f"{len(entries)} images listed from {args.root} ({args.layout}) into {args.out}", file=sys.stderr)


def _cmd_proposals_run(args: argparse.Namespace) -> None:
    from regioncl.proposals import ProposalSettings, run_chunk

    run_chunk(
        args.list,
        int(args.chunk),
        args.num_chunks,
        args.out,
        args.report,
        ProposalSettings.from_dict(args.settings),
        processes=args.processes,
    )


def _cmd_proposals_stats(args: argparse.Namespace) -> None:
    from regioncl.proposals.stats import proposal_stats

    proposal_stats(args.reports, args.proposals, args.out)


def _cmd_shards(args: argparse.Namespace) -> None:
    from regioncl.data.shards import write_shard

    count = write_shard(args.proposals, args.out)
    print(f"{count} samples written to {args.out}", file=sys.stderr)


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from regioncl.launch import relaunch_if_needed

    # One process per device on this node: re-runs this same command under torchrun --standalone.
    relaunch_if_needed(args.nproc_per_node, args.argv)
    from regioncl.engine import PretrainSettings, pretrain, run_identity

    settings = PretrainSettings.from_dict(args.settings)
    # Checkpoints of other settings or data stay beside this run's, never resumed by it.
    workdir = args.workdir / run_identity(settings, args.shards)
    pretrain(settings, args.shards, args.out, workdir, metrics=args.metrics)


def _cmd_convert(args: argparse.Namespace) -> None:
    from regioncl.convert import SupervisedSource, convert_checkpoint, convert_supervised

    if args.checkpoint is not None:
        report = convert_checkpoint(args.checkpoint, args.torchvision, args.detectron2)
    else:
        if args.arch is None:
            raise SystemExit("regioncl convert: --supervised needs --arch (e.g. resnet50)")
        source = SupervisedSource.parse(args.supervised, args.arch)
        report = convert_supervised(source, args.torchvision, args.detectron2)
    print(
        f"{report.method} {report.arch}: {report.torchvision_keys} tensors to {args.torchvision}, "
        f"{report.detectron2_keys} to {args.detectron2}; {len(report.dropped)} dropped on purpose:",
        *report.dropped, sep="\n  ", file=sys.stderr,
    )


def _weights(value: str) -> Path | None:
    return None if value == "none" else Path(value)


def _cmd_finetune(args: argparse.Namespace) -> None:
    from regioncl.transfer.backends import finetune
    from regioncl.transfer.benchmarks import BenchmarkSettings

    launch_options = ("num_gpus", "num_machines", "machine_rank", "dist_url", "num_workers")
    launch = {name: getattr(args, name) for name in launch_options if getattr(args, name) is not None}
    finetune(
        BenchmarkSettings.from_dict(args.settings), args.weights, args.seed, args.out, args.workdir,
        metrics=args.metrics, **launch,
    )


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from regioncl.transfer.backends import evaluate
    from regioncl.transfer.benchmarks import BenchmarkSettings

    launch = {"num_gpus": args.num_gpus} if args.num_gpus is not None else {}
    metrics = evaluate(
        BenchmarkSettings.from_dict(args.settings), args.model, args.out, run=args.run, method=args.method, **launch
    )
    print(json.dumps(metrics["metrics"], indent=2), file=sys.stderr)


def _cmd_probe(args: argparse.Namespace) -> None:
    from regioncl.probe import ProbeSettings, run_probe

    settings = ProbeSettings.from_dict(args.settings, "probe --settings")
    record = run_probe(args.weights, args.arch, args.data, args.out, settings, run=args.run, benchmark=args.benchmark)
    print(f"probe accuracy {record['metrics']['probe']['accuracy']:.1f} % ({record['seconds']} s)", file=sys.stderr)


def _cmd_curves(args: argparse.Namespace) -> None:
    from regioncl.curves import write_curve_plots

    # An empty file list reaches a rule's command as one empty word.
    pretrain, finetune = ([path for path in paths if str(path)] for paths in (args.pretrain, args.finetune))
    written = write_curve_plots(pretrain, finetune, args.out_dir)
    print(f"{len(written)} plots written to {args.out_dir}", file=sys.stderr)


def _cmd_doctor(args: argparse.Namespace) -> None:
    from regioncl.doctor import report

    print(report())


def _cmd_tables(args: argparse.Namespace) -> None:
    from regioncl.tables import write_summary

    table = write_summary(args.metrics, args.markdown, args.csv)
    print(f"{len(table)} rows written to {args.markdown} and {args.csv}", file=sys.stderr)


def _cmd_paper_tables(args: argparse.Namespace) -> None:
    from regioncl.tables.paper import write_paper_tables

    paths = write_paper_tables(args.metrics, args.tables, args.reference_dir, args.out_dir, args.plots_dir)
    print(f"{len(paths)} files written to {args.out_dir} and {args.plots_dir}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regioncl", description=__doc__.splitlines()[0])
    stages = parser.add_subparsers(dest="stage", required=True)

    p = stages.add_parser("embedded", help="generate the embedded default dataset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--settings", type=_settings, default={})
    p.set_defaults(func=_cmd_embedded)

    p = stages.add_parser("images", help="list a dataset's images (sorted keys) into a TSV")
    p.add_argument("--layout", required=True, help="embedded | folder | imagenet | coco | filelist")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_cmd_images)

    p = stages.add_parser("proposals", help="selective-search proposals")
    proposal_cmds = p.add_subparsers(dest="proposals_cmd", required=True)
    q = proposal_cmds.add_parser("run", help="proposals for one chunk of an image list")
    q.add_argument("--list", type=Path, required=True)
    q.add_argument("--chunk", required=True)
    q.add_argument("--num-chunks", type=int, required=True)
    q.add_argument("--processes", type=int, default=1)
    q.add_argument("--settings", type=_settings, default={})
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--report", type=Path, required=True)
    q.set_defaults(func=_cmd_proposals_run)
    q = proposal_cmds.add_parser("stats", help="summarise a dataset's proposal chunks")
    q.add_argument("--reports", type=Path, nargs="+", required=True)
    q.add_argument("--proposals", type=Path, nargs="+", required=True)
    q.add_argument("--out", type=Path, required=True)
    q.set_defaults(func=_cmd_proposals_stats)

    p = stages.add_parser("shards", help="pack a chunk's images and proposals into a WebDataset tar")
    p.add_argument("--proposals", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_cmd_shards)

    p = stages.add_parser("pretrain", help="self-supervised pretraining of one run")
    p.add_argument("--settings", type=_settings, required=True)
    p.add_argument("--shards", type=Path, nargs="+", required=True)
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--workdir", type=Path, required=True, help="resumable checkpoints (not a workflow output)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--metrics", type=Path, help="per-step loss and lr (JSON lines), written with --out")
    p.set_defaults(func=_cmd_pretrain)

    p = stages.add_parser("convert", help="pretrained (or supervised) weights to torchvision and detectron2 weights")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a pretrained checkpoint (checkpoint_final.pt)")
    source.add_argument(
        "--supervised", help="the supervised baseline: 'torchvision' (its ImageNet weights, downloaded), "
        "'torchvision:<weights name>' or a torchvision classification state dict (.pth)",
    )
    p.add_argument("--arch", help="with --supervised: the ResNet, e.g. resnet50")
    p.add_argument("--torchvision", type=Path, required=True)
    p.add_argument("--detectron2", type=Path, required=True)
    p.set_defaults(func=_cmd_convert)

    p = stages.add_parser("finetune", help="finetune a detector (or a segmentation FCN) on a benchmark")
    p.add_argument("--settings", type=_settings, required=True)
    p.add_argument("--weights", type=_weights, required=True, help="converted weights (.tv.pth or .d2.pkl), or 'none'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--metrics", type=Path, help="per-iteration losses and lr (JSON lines), written with --out")
    launch = p.add_argument_group("detectron2 launch (detectron2 benchmarks only)")
    launch.add_argument("--num-gpus", type=int, help="GPUs per machine (0: CPU)")
    launch.add_argument("--num-machines", type=int)
    launch.add_argument("--machine-rank", type=int)
    launch.add_argument("--dist-url", help="'auto' on one machine; tcp://FIRST_HOST:PORT on several")
    launch.add_argument("--num-workers", type=int, help="data loader workers")
    p.set_defaults(func=_cmd_finetune)

    p = stages.add_parser("evaluate", help="COCO-style AP of a finetuned detector (mIoU of an FCN)")
    p.add_argument("--settings", type=_settings, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--num-gpus", type=int, help="detectron2 benchmarks: > 0 evaluates on the GPU (default: the CPU)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_cmd_evaluate)

    p = stages.add_parser("probe", help="linear probe of frozen backbone features of a labeled split's boxes")
    p.add_argument("--weights", type=_weights, required=True, help="converted weights (.tv.pth), or 'none' (random init)")
    p.add_argument("--arch", required=True, help="the backbone, e.g. resnet18 (must match the weights)")
    p.add_argument("--data", type=Path, required=True, help="a dataset in the embedded layout (train/ and val/ labeled)")
    p.add_argument("--settings", type=_settings, default={}, help="regioncl.probe.ProbeSettings")
    p.add_argument("--run", help="the run name the tables show (default: the weights' file stem, or 'random')")
    p.add_argument("--benchmark", default="probe", help="the benchmark name the tables file the probe under")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_cmd_probe)

    p = stages.add_parser("curves", help="per-step loss and lr logs to loss-curve plots")
    p.add_argument("--pretrain", type=str, nargs="*", default=[], help="results/metrics/pretrain/<run>.jsonl")
    p.add_argument("--finetune", type=str, nargs="*", default=[], help="results/metrics/finetune/<run>/<benchmark>/seed<n>.jsonl")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(func=_cmd_curves)

    p = stages.add_parser("doctor", help="what this machine can run: torch/CUDA, GPUs, detectron2, SLURM")
    p.set_defaults(func=_cmd_doctor)

    p = stages.add_parser("tables", help="metrics JSON files to the summary table")
    p.add_argument("--metrics", type=Path, nargs="+", required=True)
    p.add_argument("--markdown", type=Path, required=True)
    p.add_argument("--csv", type=Path, required=True)
    p.set_defaults(func=_cmd_tables)

    p = stages.add_parser("paper-tables", help="metrics JSON files to the papers' tables (md/tex/csv/html) and plots")
    p.add_argument("--metrics", type=Path, nargs="+", required=True)
    p.add_argument("--tables", type=Path, required=True, help="a tables config, e.g. config/tables/paper.yaml")
    p.add_argument("--reference-dir", type=Path, required=True, help="the papers' numbers (config/reference)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--plots-dir", type=Path, required=True)
    p.set_defaults(func=_cmd_paper_tables)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    args.func(args)


if __name__ == "__main__":
    main()
