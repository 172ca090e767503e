"""Convert between Hugging Face Llama folders and jaxllm run directories.

    python -m jaxllm.convert --from-hf HF_DIR --run-dir RUN_DIR [--overwrite]
    python -m jaxllm.convert --to-hf RUN_DIR --out HF_DIR [--step N] [--dtype DTYPE]
                             [--max-shard-size SIZE] [--overwrite]

Bad input prints `error: <message>` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from jaxllm.cli import report_user_error
from jaxllm.convert.hf import EXPORT_DTYPES, export_run_to_hf, import_hf_run
from jaxllm.convert.safetensors_io import DEFAULT_MAX_SHARD_BYTES
from jaxllm.errors import UserInputError

# Decimal and binary size units accepted by --max-shard-size.
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}
_SIZE_PATTERN = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Parse a size such as `2GB`, `500MB`, `64KiB` or `1000` (bytes) into bytes."""
    match = _SIZE_PATTERN.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise UserInputError(
            f"invalid size {text!r}; write a number with an optional unit B, KB, MB, GB, "
            "KiB, MiB or GiB, for example 2GB"
        )
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise UserInputError(f"invalid size {text!r}; it must be at least 1 byte")
    return size


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserInputError(f"{message} (see python -m jaxllm.convert --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="python -m jaxllm.convert",
        description="Convert a Hugging Face LlamaForCausalLM folder (safetensors) into a jaxllm "
        "run directory, or a run directory's checkpoint into such a folder.",
    )
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="HF_DIR",
                           help="Hugging Face folder with config.json, safetensors weights and "
                           "tokenizer.json to import")
    direction.add_argument("--to-hf", metavar="RUN_DIR", help="jaxllm run directory to export")
    parser.add_argument("--run-dir", help="run directory that --from-hf writes")
    parser.add_argument("--out", metavar="HF_DIR", help="Hugging Face folder that --to-hf writes")
    parser.add_argument("--step", type=int,
                        help="checkpoint step that --to-hf exports (default: the latest)")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES),
                        help="dtype of the exported weights (default: float32)")
    parser.add_argument("--max-shard-size", metavar="SIZE",
                        help="largest safetensors file that --to-hf writes before splitting the "
                        f"weights into shards, for example 500MB (default: "
                        f"{DEFAULT_MAX_SHARD_BYTES // 10**9}GB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty output directory")
    return parser


def run(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.from_hf is not None:
        export_only = [flag for flag, value in (("--out", args.out), ("--step", args.step),
                                                ("--dtype", args.dtype),
                                                ("--max-shard-size", args.max_shard_size))
                       if value is not None]
        if export_only:
            raise UserInputError(f"{export_only[0]} applies to --to-hf only")
        if args.run_dir is None:
            raise UserInputError("--from-hf needs --run-dir, the run directory to write")
        run_dir = import_hf_run(args.from_hf, args.run_dir, overwrite=args.overwrite)
        print(f"wrote run directory {run_dir}")
        return

    if args.run_dir is not None:
        raise UserInputError("--run-dir applies to --from-hf only; --to-hf takes the run directory")
    if args.out is None:
        raise UserInputError("--to-hf needs --out, the Hugging Face folder to write")
    max_shard_bytes = DEFAULT_MAX_SHARD_BYTES
    if args.max_shard_size is not None:
        max_shard_bytes = parse_size(args.max_shard_size)
    written = export_run_to_hf(
        args.to_hf, args.out, step=args.step, dtype=args.dtype or "float32",
        max_shard_bytes=max_shard_bytes, overwrite=args.overwrite,
    )
    print(f"wrote {len(written)} files to {args.out}: {', '.join(path.name for path in written)}")


def main(argv: list[str] | None = None) -> int:
    # force: an imported library (absl, through orbax) has configured the root logger already.
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("jaxllm").setLevel(logging.INFO)
    try:
        run(argv)
    except UserInputError as error:
        return report_user_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
