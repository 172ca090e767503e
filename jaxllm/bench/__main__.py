"""Command line: `python -m jaxllm.bench {decode,train} [options]`.

Thread settings are applied before JAX or torch compute anything (see `jaxllm.bench.machine`).
Each command prints progress lines to stderr, then its tables in Markdown, and writes its
results as JSON (the decode command also writes Figure C as a PNG) under --out. Invalid options
end with one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jaxllm.bench import machine
from jaxllm.bench.contenders import CONTENDER_NAMES
from jaxllm.bench.decode import DTYPES, DecodeSettings, run_decode_benchmark
from jaxllm.bench.figures import plot_figure_c
from jaxllm.bench.train import TrainSettings, run_train_benchmark
from jaxllm.errors import UserInputError

EXIT_USER_ERROR = 2
MIB = 2**20

# Defaults of a measurement run and of --smoke (a few seconds on the tiny preset). Options
# given on the command line override either set. The decode defaults are the batch-1 float32
# comparison, about 14 minutes for seed-190m on 2 CPU cores; docs/benchmarks.md lists the
# commands for the batch, dtype and layer-scan measurements.
DECODE_DEFAULTS = dict(
    config="seed-190m", new_tokens=[200, 1000], batch=[1], dtype=["float32"],
    contenders=["jaxllm-cached", "jaxllm-uncached", "torchref-cached", "torchref-uncached"],
    runs=3, prompt_len=16, uncached_max_batch=1, uncached_dtypes=["float32"],
    uncached_full_max_new_tokens=200, uncached_full_runs=1, bandwidth_mib=1024,
    bandwidth_runs=5, max_foreign_cores=0.25, retries=1,
)
DECODE_SMOKE_DEFAULTS = dict(
    DECODE_DEFAULTS, config="tiny", new_tokens=[6], contenders=list(CONTENDER_NAMES),
    prompt_len=8, uncached_full_max_new_tokens=6, uncached_full_runs=3, bandwidth_mib=32,
    bandwidth_runs=2, retries=0,
)
TRAIN_DEFAULTS = dict(config="seed-190m", batch=4, seq_len=256, steps=3, dtype="float32",
                      matmul_size=4096, matmul_runs=3)
TRAIN_SMOKE_DEFAULTS = dict(TRAIN_DEFAULTS, config="tiny", batch=2, seq_len=32, steps=2,
                            matmul_size=256)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxllm.bench",
        description="Measure decoding and training speed against memory-bandwidth and matmul "
                    "ceilings measured in the same run.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    decode = commands.add_parser(
        "decode", help="greedy decoding tokens/s: jaxllm and torchref, with and without a KV cache")
    _add_common_options(decode, DECODE_DEFAULTS, DECODE_SMOKE_DEFAULTS)
    decode.add_argument("--new-tokens", type=int, nargs="+", metavar="N",
                        help="new tokens per generation (default: 200 1000)")
    decode.add_argument("--batch", type=int, nargs="+", metavar="B",
                        help="batch sizes (default: 1)")
    decode.add_argument("--dtype", nargs="+", choices=DTYPES,
                        help="compute dtypes; weights are stored in it too (default: float32)")
    decode.add_argument("--runs", type=int, metavar="R",
                        help="timed runs per case after one warm-up; tokens/s is their median "
                             "(default: 3)")
    decode.add_argument("--prompt-len", type=int, metavar="T",
                        help="prompt tokens per row (default: 16)")
    decode.add_argument("--contenders", nargs="+", choices=CONTENDER_NAMES,
                        help="contenders to run (default: all but jaxllm-cached-scan; "
                             "with --smoke: all)")
    decode.add_argument("--uncached-max-batch", type=int, metavar="B",
                        help="largest batch size for the uncached contenders (default: 1)")
    decode.add_argument("--uncached-dtypes", nargs="+", choices=DTYPES,
                        help="dtypes for the uncached contenders (default: float32)")
    decode.add_argument("--uncached-full-max-new-tokens", type=int, metavar="N",
                        help="time complete uncached generations only up to N new tokens; "
                             "longer ones are projected from step times (default: 200)")
    decode.add_argument("--uncached-full-runs", type=int, metavar="R",
                        help="complete uncached generations timed per case; with at least "
                             "--runs of them their median replaces the projection (default: 1)")
    decode.add_argument("--bandwidth-mib", type=int, metavar="MIB",
                        help="size of the array streamed to measure bandwidth, in MiB "
                             "(default: 1024)")
    decode.add_argument("--bandwidth-runs", type=int, metavar="R",
                        help="timed passes per bandwidth measurement; the best counts (default: 5)")
    decode.add_argument("--max-foreign-cores", type=float, metavar="CORES",
                        help="measure a case again when other processes kept more than CORES "
                             "cores busy during it (default: 0.25)")
    decode.add_argument("--retries", type=int, metavar="R",
                        help="extra attempts per case for --max-foreign-cores; the attempt with "
                             "the least interference counts (default: 1; with --smoke: 0)")

    train = commands.add_parser("train", help="training tokens/s and FLOP/s utilisation")
    _add_common_options(train, TRAIN_DEFAULTS, TRAIN_SMOKE_DEFAULTS)
    train.add_argument("--batch", type=int, metavar="B", help="sequences per step (default: 4)")
    train.add_argument("--seq-len", type=int, metavar="T",
                       help="tokens per sequence (default: 256)")
    train.add_argument("--steps", type=int, metavar="S",
                       help="timed steps after one warm-up step; the median counts (default: 3)")
    train.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="compute dtype of the train step (default: float32)")
    train.add_argument("--matmul-size", type=int, metavar="N",
                       help="size of the square float32 matmul that sets the ceiling "
                            "(default: 4096)")
    train.add_argument("--matmul-runs", type=int, metavar="R",
                       help="timed matmuls; the best counts (default: 3)")
    return parser


def _add_common_options(parser, defaults: dict, smoke_defaults: dict) -> None:
    parser.add_argument("--config", metavar="PRESET",
                        help=f"preset name or YAML path (default: {defaults['config']}; "
                             f"with --smoke: {smoke_defaults['config']})")
    parser.add_argument("--smoke", action="store_true",
                        help="a few-second run on the tiny preset with small settings, to check "
                             "that everything works")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), metavar="DIR",
                        help="directory for the JSON results and figures (default: bench-results)")
    parser.add_argument("--name", metavar="NAME",
                        help="file name stem of the outputs (default: <command>-<config>)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="threads for XLA and torch alike (default: every CPU this "
                             "process may use)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the random weights and tokens (default: 0)")
    parser.add_argument("--wait-load", type=float, metavar="LOAD",
                        help="before measuring, wait until the 1-minute load average is below "
                             "LOAD (polled every 30 s)")
    parser.add_argument("--wait-timeout", type=float, default=1200.0, metavar="SECONDS",
                        help="give up waiting for --wait-load after this long and measure "
                             "anyway (default: 1200)")


def _resolve(args: argparse.Namespace, defaults: dict, smoke_defaults: dict) -> dict:
    """Return the option values: explicit ones, else the --smoke or measurement defaults."""
    chosen = smoke_defaults if args.smoke else defaults
    return {key: getattr(args, key) if getattr(args, key) is not None else default
            for key, default in chosen.items()}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_number(value) for value in row) + " |")
    return "\n".join(lines)


def decode_tables(report: dict) -> str:
    results = markdown_table(
        ["contender", "dtype", "batch", "new tokens", "tokens/s", "timing", "compile s",
         "layout s", "MB read/token", "roofline tokens/s", "of roofline", "GB/s before",
         "other procs (cores)"],
        [[r["contender"], r["dtype"], r["batch"], r["new_tokens"], r["tokens_per_s"],
          r["timing"], r["compile_s"], r["layout_s"], r["bytes_per_token"] / 1e6,
          r["roofline_tokens_per_s"], r["roofline_fraction"], r["bandwidth_before_gb_per_s"],
          r["foreign_cpu_cores"]]
         for r in report["results"]],
    )
    uncached = markdown_table(
        ["contender", "dtype", "new tokens", "projected tokens/s", "complete-run tokens/s",
         "complete runs"],
        [[r["contender"], r["dtype"], r["new_tokens"], r["projected_tokens_per_s"],
          r["full_run_tokens_per_s"], len(r["full_run_seconds"])]
         for r in report["results"] if not r["cached"]],
    )
    comparisons = markdown_table(
        ["dtype", "batch", "new tokens", "jaxllm cached/uncached", "torchref cached/uncached",
         "jaxllm/torchref cached", "jaxllm/torchref uncached", "scan/unrolled layers"],
        [[c["dtype"], c["batch"], c["new_tokens"], c["jaxllm_cached_over_uncached"],
          c["torchref_cached_over_uncached"], c["jaxllm_over_torchref_cached"],
          c["jaxllm_over_torchref_uncached"], c["scan_over_unrolled_layers"]]
         for c in report["comparisons"]],
    )
    greedy = markdown_table(
        ["dtype", "batch", "first", "second", "tokens compared", "identical", "first mismatch"],
        [[g["dtype"], g["batch"], g["first"], g["second"], g["compared_tokens"], g["identical"],
          g["first_mismatch_step"]] for g in report["greedy_check"]],
    )
    targets = markdown_table(
        ["target (batch 1, float32)", "new tokens", "value", "threshold", "met"],
        [[t["target"], t["new_tokens"], t["value"], t["threshold"], t["met"]]
         for t in report["targets"]],
    )
    bandwidth = report["bandwidth"]
    lines = [
        f"memory bandwidth (GB/s, best of {bandwidth['start']['runs']}): "
        + ", ".join(f"{key.removesuffix('_gb_per_s')} {bandwidth[when][key]:.1f} ({when})"
                    for when in ("start", "end")
                    for key in ("xla_sum_gb_per_s", "xla_copy_gb_per_s", "numpy_sum_gb_per_s",
                                "numpy_copy_gb_per_s")),
        f"roofline bandwidth: {bandwidth['roofline_gb_per_s']:.1f} GB/s (the best sum of the run, "
        "including those just before each case)",
        "", results, "", "Uncached timing", uncached, "", comparisons, "", greedy, "", targets,
    ]
    if report["bfloat16_over_float32"]:
        lines += ["", markdown_table(
            ["contender", "batch", "new tokens", "bfloat16/float32 tokens/s"],
            [[d["contender"], d["batch"], d["new_tokens"], d["ratio"]]
             for d in report["bfloat16_over_float32"]])]
    return "\n".join(lines)


def train_tables(report: dict) -> str:
    settings = report["settings"]
    return markdown_table(
        ["config", "dtype", "batch x seq", "tokens/s", "GFLOP/token", "achieved GFLOP/s",
         "matmul ceiling GFLOP/s", "utilisation", "compile s", "other procs (cores)"],
        [[settings["config"], settings["dtype"], f"{settings['batch']} x {settings['seq_len']}",
          report["tokens_per_s"], report["flops_per_token"] / 1e9,
          report["achieved_flop_per_s"] / 1e9, report["matmul_ceiling"]["flop_per_s"] / 1e9,
          report["utilisation"], report["compile_s"], report["foreign_cpu_cores"]]],
    ) + f"\ntrain step: {report['train_step']}"


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Apply the thread settings, run the chosen benchmark and write its outputs."""
    threads = args.threads or len(machine.available_cpus())
    machine.configure_threads(threads)
    load_before = machine.load_average()
    if args.wait_load is not None:
        load_before = machine.wait_for_load(args.wait_load, args.wait_timeout, log=_log)
    _log(f"load average before measuring: {load_before}")

    if args.command == "decode":
        options = _resolve(args, DECODE_DEFAULTS, DECODE_SMOKE_DEFAULTS)
        settings = DecodeSettings(
            config=options["config"], new_tokens=tuple(options["new_tokens"]),
            batches=tuple(options["batch"]), dtypes=tuple(options["dtype"]),
            contenders=tuple(options["contenders"]), runs=options["runs"],
            prompt_len=options["prompt_len"], uncached_max_batch=options["uncached_max_batch"],
            uncached_dtypes=tuple(options["uncached_dtypes"]),
            uncached_full_max_new_tokens=options["uncached_full_max_new_tokens"],
            uncached_full_runs=options["uncached_full_runs"],
            bandwidth_bytes=options["bandwidth_mib"] * MIB,
            bandwidth_runs=options["bandwidth_runs"],
            max_foreign_cores=options["max_foreign_cores"], retries=options["retries"],
            seed=args.seed,
        )
        report = run_decode_benchmark(settings, _log)
    else:
        options = _resolve(args, TRAIN_DEFAULTS, TRAIN_SMOKE_DEFAULTS)
        settings = TrainSettings(seed=args.seed, **options)
        report = run_train_benchmark(settings, _log)

    report["command"] = " ".join(["python -m jaxllm.bench", *argv])
    report["machine"] = machine.describe_machine()
    report["versions"] = machine.package_versions()
    report["threads"] = machine.thread_report()
    report["load_avg_before"] = load_before
    report["load_avg_after"] = machine.load_average()

    name = args.name or f"{args.command}-{Path(options['config']).stem}"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "decode":
        title = f"{options['config']}: greedy decoding, {threads} threads"
        figure = plot_figure_c(report["results"], title, args.out / f"{name}-figure-c.png")
        report["figure"] = None if figure is None else str(figure)
    json_path = args.out / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    report["json"] = str(json_path)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        report = run(args, argv)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(decode_tables(report) if args.command == "decode" else train_tables(report))
    print(f"\nthreads: {report['threads']}")
    print(f"results: {report['json']}")
    if report.get("figure"):
        print(f"figure: {report['figure']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
