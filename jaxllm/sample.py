"""Command line: `python -m jaxllm.sample --run-dir DIR --prompt TEXT [--prompt TEXT ...]`.

Reads the run directory's config.yaml and tokenizer.json, restores only the parameters (the
latest checkpoint unless --step is given) and prints each prompt followed by its completion.
Sampling options default to the config's decode section. Bad input ends with one
`error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from jaxllm.checkpoint import restore_params
from jaxllm.cli import report_user_error
from jaxllm.config import Config, ConfigError, read_config
from jaxllm.data import Tokenizer
from jaxllm.errors import UserInputError
from jaxllm.generate import default_decode_dtype, generate_text

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
# Printed between completions when there are several prompts.
SEPARATOR = "-" * 40


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxllm.sample",
        description="Complete prompts with the parameters of a training run. Options left out "
                    "take their value from the decode section of the run's config.yaml.",
    )
    parser.add_argument("--run-dir", type=Path, required=True, metavar="DIR",
                        help="run directory written by python -m jaxllm.train")
    parser.add_argument("--prompt", dest="prompts", action="append", required=True,
                        metavar="TEXT", help="text to complete; repeat for several prompts")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, metavar="T",
                        help="softmax temperature; 0 means greedy decoding")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help="sample from the K most likely tokens; 0 disables top-k")
    parser.add_argument("--top-p", type=float, metavar="P",
                        help="sample from the smallest token set with probability >= P; "
                             "1.0 disables nucleus sampling")
    parser.add_argument("--seed", type=int, metavar="S", help="random seed for sampling")
    parser.add_argument("--step", type=int, metavar="STEP",
                        help="checkpoint step to load (default: the latest)")
    return parser


def read_run_config(run_dir: Path) -> Config:
    if not run_dir.is_dir():
        raise UserInputError(f"run directory {run_dir} not found; pass the --run-dir of a "
                             "training run")
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise UserInputError(f"{run_dir} has no {CONFIG_FILE}; is it a run directory written "
                             "by python -m jaxllm.train?")
    return read_config(path)


def decode_settings(config: Config, args: argparse.Namespace):
    """Return the config's decode section with the command-line options applied and validated."""
    overrides = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    try:
        return dataclasses.replace(config.decode, **overrides)
    except ConfigError as error:
        # The config names fields as decode.<name>; the user typed --<name>.
        message = str(error)
        for name in overrides:
            message = message.replace(f"decode.{name}", "--" + name.replace("_", "-"))
        raise UserInputError(f"invalid sampling option: {message}") from None


def sample(args: argparse.Namespace) -> list[str]:
    """Return one completion per prompt, each prefixed by its prompt."""
    config = read_run_config(args.run_dir)
    decode = decode_settings(config, args)
    tokenizer = Tokenizer.load(args.run_dir / TOKENIZER_FILE)
    tokenizer.check_fits(config.model.vocab_size)
    params = restore_params(args.run_dir, config.model, args.step)
    completions = generate_text(
        params,
        tokenizer,
        args.prompts,
        config=config.model,
        max_new_tokens=decode.max_new_tokens,
        temperature=decode.temperature,
        top_k=decode.top_k,
        top_p=decode.top_p,
        seed=decode.seed,
        compute_dtype=default_decode_dtype(),
    )
    return [prompt + completion for prompt, completion in zip(args.prompts, completions)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # force: absl, imported through orbax, has configured the root logger already.
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        texts = sample(args)
    except UserInputError as error:
        return report_user_error(error)
    for index, text in enumerate(texts):
        if index > 0:
            print(SEPARATOR)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
