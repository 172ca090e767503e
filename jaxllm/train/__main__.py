"""Command line: `python -m jaxllm.train [pretrain] [--config NAME_OR_PATH] [--run-dir DIR] ...`.

With no arguments it pretrains the `tiny` preset on the built-in Shakespeare corpus into a new
run directory `runs/tiny-<YYYYmmdd-HHMMSS>`. Bad input (config, data, run directory,
checkpoint) ends with one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from jaxllm.cli import report_user_error
from jaxllm.config import available_presets, load_config
from jaxllm.errors import UserInputError
from jaxllm.train.loop import ProgressHooks, RunInfo, RunResult, pretrain

# 128 + SIGINT, the status shells report for a command stopped with Ctrl-C.
EXIT_INTERRUPTED = 130
PROGRESS_FORMAT = "{desc} {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxllm.train",
        description="Pretrain a Llama 3 style model. With no arguments: the tiny preset on the "
                    "built-in Shakespeare corpus, in a new run directory under runs/. Rerunning "
                    "with an existing --run-dir resumes from its latest checkpoint.",
    )
    parser.add_argument("stage", nargs="?", default="pretrain", choices=["pretrain"],
                        help="training stage (default and only stage for now: pretrain)")
    parser.add_argument("--config", default="tiny", metavar="NAME_OR_PATH",
                        help=f"preset name from configs/ ({', '.join(available_presets())}) "
                             "or the path of a YAML config (default: tiny)")
    parser.add_argument("--run-dir", type=Path, metavar="DIR",
                        help="run directory for config, tokenizer, checkpoints and metrics "
                             "(default: runs/<preset>-<YYYYmmdd-HHMMSS>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="section.key=value",
                        help="override one config value, parsed as YAML; repeatable, for "
                             "example --set train.steps=200 --set model.num_layers=2")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the config, tokenizer, checkpoints, metrics and figures of "
                             "an earlier run in --run-dir and start again from step 0")
    parser.add_argument("--stop-at", type=int, metavar="STEP",
                        help="stop after this step and save a checkpoint, as an interruption "
                             "would; rerun with the same --run-dir to resume")
    return parser


def default_run_dir(config_name: str) -> Path:
    preset = Path(config_name).stem if config_name.endswith((".yaml", ".yml")) else config_name
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{preset}-{stamp}"


class _TqdmLogHandler(logging.Handler):
    """Log handler that writes records above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def configure_logging() -> None:
    handler = _TqdmLogHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("jaxllm").setLevel(logging.INFO)


class ProgressBar(ProgressHooks):
    """A tqdm bar over the steps of this process, with loss and tokens/s from logged rows."""

    def __init__(self):
        self._bar: tqdm | None = None

    def on_start(self, info: RunInfo) -> None:
        if info.resumed_from is not None:
            print(f"resuming from step {info.resumed_from}", flush=True)
        if info.start_step >= info.end_step:
            return
        self._bar = tqdm(total=info.end_step, initial=info.start_step, desc="pretrain",
                         unit="step", bar_format=PROGRESS_FORMAT, file=sys.stderr)
        self._bar.set_postfix_str(self._postfix(None, None))

    @staticmethod
    def _postfix(loss: float | None, tokens_per_s: float | None) -> str:
        loss_text = f"{loss:.4f}" if loss is not None else "-"
        rate_text = f"{tokens_per_s:,.0f}" if tokens_per_s is not None else "-"
        return f"loss {loss_text} | {rate_text} tok/s"

    def on_step(self, step: int, row: dict[str, Any] | None) -> None:
        if self._bar is None:
            return
        if row is not None:
            self._bar.set_postfix_str(
                self._postfix(row.get("train/loss"), row.get("train/tokens_per_s")), refresh=False
            )
        self._bar.update(1)

    def on_eval(self, step: int, val_loss: float) -> None:
        tqdm.write(f"step {step}: val loss {val_loss:.4f}", file=sys.stderr)

    def on_end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def print_result(result: RunResult) -> None:
    if result.stopped_early:
        print(f"stopped after step {result.step}; rerun with --run-dir {result.run_dir} to resume")
    else:
        rate = f", {result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s else ""
        print(f"finished step {result.step} in {result.wall_time_s:.1f} s{rate}")
    if result.final_train_loss is not None:
        print(f"train loss: {result.first_train_loss:.4f} at the first logged step, "
              f"{result.final_train_loss:.4f} at the last")
    if result.val_loss is not None:
        gap = result.unigram_entropy - result.val_loss
        relation = "below" if gap >= 0 else "above"
        print(f"val loss: {result.val_loss:.4f}, {abs(gap):.4f} {relation} the unigram entropy "
              f"of {result.unigram_entropy:.4f} nats/token")
    if result.sample is not None:
        print(f"sample:\n{result.sample}")
    if result.figure is not None:
        print(f"loss figure: {result.figure}")
    print(f"run directory: {result.run_dir}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        config = load_config(args.config, args.overrides)
        run_dir = args.run_dir if args.run_dir is not None else default_run_dir(args.config)
        print(f"run directory: {run_dir}", flush=True)
        result = pretrain(config, run_dir, overwrite=args.overwrite, stop_at=args.stop_at,
                          hooks=ProgressBar())
    except UserInputError as error:
        return report_user_error(error)
    except KeyboardInterrupt:
        print("error: interrupted; rerun with the same --run-dir to resume from the latest "
              "checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
