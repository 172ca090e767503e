"""Tests of the benchmarks: the --smoke runs of both commands end to end, and their formulas.

The smoke runs start `python -m jaxllm.bench` in a subprocess, as a user would, so its thread
settings apply before JAX starts. They check the output files and fields, never the speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxllm.bench.contenders import StepProfile, bucket_length, project_total_seconds
from jaxllm.bench.decode import check_greedy_tokens
from jaxllm.bench.roofline import cache_bytes_per_token, decode_read_bytes
from jaxllm.bench.train import matmul_params, train_flops_per_token
from jaxllm.config import load_config

RESULT_FIELDS = {
    "contender", "framework", "cached", "layers", "dtype", "batch", "prompt_len", "new_tokens",
    "compile_s", "layout_s", "weight_bytes", "cache_bytes_per_cached_token", "timing",
    "run_seconds",
    "tokens_per_s", "read_bytes", "bytes_per_token", "roofline_tokens_per_s",
    "roofline_fraction", "bandwidth_before_gb_per_s", "load_avg_1m_at_start", "foreign_cpu_cores",
    "attempts",
}
UNCACHED_FIELDS = {"step_profile", "projected_tokens_per_s", "full_run_seconds",
                   "full_run_tokens_per_s"}
COMPARISON_FIELDS = {
    "dtype", "batch", "new_tokens", "jaxllm_cached_over_uncached",
    "torchref_cached_over_uncached", "jaxllm_over_torchref_cached",
    "jaxllm_over_torchref_uncached", "scan_over_unrolled_layers",
}
BANDWIDTH_FIELDS = {"array_bytes", "xla_sum_gb_per_s", "xla_copy_gb_per_s", "numpy_sum_gb_per_s",
                    "numpy_copy_gb_per_s", "runs", "xla_sum_arrays", "roofline_gb_per_s"}
CONTENDERS = {"jaxllm-cached", "jaxllm-cached-scan", "jaxllm-uncached", "torchref-cached",
              "torchref-uncached"}


def run_bench(tmp_path, *arguments: str) -> dict:
    """Run `python -m jaxllm.bench ARGUMENTS --out tmp_path` and return its JSON results."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    completed = subprocess.run(
        [sys.executable, "-m", "jaxllm.bench", *arguments, "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def decode_report(tmp_path_factory):
    return run_bench(tmp_path_factory.mktemp("decode"), "decode", "--smoke")


@pytest.fixture(scope="module")
def train_report(tmp_path_factory):
    return run_bench(tmp_path_factory.mktemp("train"), "train", "--smoke")


# --- decode smoke run ----------------------------------------------------------------------------


def test_decode_smoke_runs_every_contender(decode_report):
    assert {row["contender"] for row in decode_report["results"]} == CONTENDERS
    assert decode_report["settings"]["config"] == "tiny"


def test_decode_smoke_results_have_every_field(decode_report):
    for row in decode_report["results"]:
        missing = RESULT_FIELDS - set(row)
        assert not missing, f"{row['contender']} lacks {sorted(missing)}"
        if not row["cached"]:
            missing = UNCACHED_FIELDS - set(row)
            assert not missing, f"{row['contender']} lacks {sorted(missing)}"
        assert row["tokens_per_s"] > 0
        assert row["roofline_tokens_per_s"] > 0
        assert row["bytes_per_token"] >= row["weight_bytes"] / row["batch"]
        assert (row["compile_s"] is None) == (row["framework"] == "torchref")
        assert (row["layout_s"] is None) == (not row["contender"].startswith("jaxllm-cached"))


def test_decode_smoke_summaries_have_every_field(decode_report):
    for key in ("command", "machine", "versions", "threads", "model", "num_params", "figure",
                "load_avg_before", "load_avg_after", "targets", "bfloat16_over_float32"):
        assert key in decode_report, key
    for when in ("start", "end"):
        assert set(decode_report["bandwidth"][when]) == BANDWIDTH_FIELDS
    assert decode_report["bandwidth"]["roofline_gb_per_s"] > 0
    (comparison,) = decode_report["comparisons"]
    assert set(comparison) == COMPARISON_FIELDS
    assert all(value is not None for value in comparison.values())
    threads = decode_report["threads"]
    assert threads["xla_pool_threads"] == len(threads["cpu_affinity"])
    assert threads["torch_threads"] == len(threads["cpu_affinity"])


def test_decode_smoke_cached_and_uncached_tokens_identical(decode_report):
    checks = {(c["first"], c["second"]): c for c in decode_report["greedy_check"]}
    for pair in [("jaxllm-cached", "jaxllm-uncached"), ("torchref-cached", "torchref-uncached"),
                 ("jaxllm-cached", "jaxllm-cached-scan"), ("jaxllm-cached", "torchref-cached")]:
        assert pair in checks, pair
        assert checks[pair]["compared_tokens"] == decode_report["settings"]["new_tokens"][0]
        assert checks[pair]["identical"], checks[pair]


def test_decode_smoke_writes_figure_png(decode_report):
    with open(decode_report["figure"], "rb") as figure:
        assert figure.read(8) == b"\x89PNG\r\n\x1a\n"


# --- train smoke run -----------------------------------------------------------------------------


def test_train_smoke_results_have_every_field(train_report):
    for key in ("settings", "train_step", "num_params", "matmul_params", "flops_per_token",
                "flops_formula", "compile_s", "step_seconds", "losses", "tokens_per_step",
                "tokens_per_s", "achieved_flop_per_s", "matmul_ceiling", "utilisation",
                "load_avg_1m_at_start", "foreign_cpu_cores", "machine", "threads", "command"):
        assert key in train_report, key
    assert train_report["train_step"] == "jaxllm.train.step.make_train_step"
    assert len(train_report["step_seconds"]) == train_report["settings"]["steps"]
    assert all(np.isfinite(train_report["losses"]))
    assert 0 < train_report["utilisation"]


# --- formulas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, expected", [
    (1, 32), (16, 32), (33, 64), (216, 224), (256, 256), (257, 320), (1015, 1024),
])
def test_bucket_length(length, expected):
    # Width max(32, next_pow2 / 8): 32 up to 256, 64 up to 512, 128 up to 1024.
    assert bucket_length(length) == expected


def test_project_total_seconds_bucket_rule():
    profile = StepProfile(lengths=[32, 64], seconds=[1.0, 3.0], rule="bucket")
    # Lengths 30, 31, 32 cost 1 s each (bucket 32); 33 and 34 cost 3 s (bucket 64).
    assert project_total_seconds(profile, prompt_len=30, new_tokens=5) == pytest.approx(9.0)


def test_project_total_seconds_interpolate_rule():
    profile = StepProfile(lengths=[10, 20], seconds=[1.0, 2.0], rule="interpolate")
    # Lengths 10..20 cost 1.0, 1.1, ..., 2.0 s: 11 steps with mean 1.5 s.
    assert project_total_seconds(profile, prompt_len=10, new_tokens=11) == pytest.approx(16.5)


def test_decode_read_bytes_counts_weights_and_cache():
    config = load_config("tiny").model
    # tiny: 4 layers, 4 kv heads of size 32, float32: 2 * 4 * 4 * 32 * 4 = 4096 bytes per token.
    assert cache_bytes_per_token(config, 4) == 4096
    # 3 steps read the weights 3 times; 2 rows hold 5, 6 and 7 cached tokens at those steps.
    total = decode_read_bytes(weight_bytes=1000, config=config, batch=2, prompt_len=5,
                              new_tokens=3, cache_itemsize=4, cached=True)
    assert total == 3 * 1000 + 2 * (5 + 6 + 7) * 4096
    uncached = decode_read_bytes(weight_bytes=1000, config=config, batch=2, prompt_len=5,
                                 new_tokens=3, cache_itemsize=4, cached=False)
    assert uncached == 3 * 1000


def test_train_flops_per_token_formula():
    config = load_config("tiny").model
    # tiny: D 256, F 704, N 8, K 4, H 32, L 4, V 4096. Per layer: q and o 256*256 each, k and v
    # 256*128 each, MLP 3*256*704; head 256*4096.
    per_layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 704
    assert matmul_params(config) == 4 * per_layer + 256 * 4096
    # Attention at T = 128: 12 * L * T * N * H = 12 * 4 * 128 * 8 * 32.
    assert train_flops_per_token(config, 128) == 6 * matmul_params(config) + 12 * 4 * 128 * 8 * 32


def test_check_greedy_tokens_reports_first_mismatch():
    cached = np.array([[1, 2, 3, 4]])
    uncached = np.array([[1, 2, 9, 4, 5]])
    tokens = {("float32", 1, 4, "jaxllm-cached"): cached,
              ("float32", 1, 5, "jaxllm-uncached"): uncached}
    (check,) = check_greedy_tokens(tokens)
    assert check["compared_tokens"] == 4
    assert not check["identical"]
    assert check["first_mismatch_step"] == 2
    assert check["matching_fraction"] == pytest.approx(0.75)
