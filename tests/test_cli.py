"""The train and sample command lines, run as separate processes on a slice of the real corpus.

Compilation dominates, so the training processes are few and shared through module fixtures:
one uninterrupted reference run, one run stopped with --stop-at and resumed, and one run killed
with SIGKILL after its first checkpoint and resumed. Both resumed runs must end with the
reference's parameters, bit for bit. The bad-input commands run concurrently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm.checkpoint import available_steps, restore_params
from jaxllm.config import read_config

REPO_ROOT = Path(__file__).resolve().parent.parent
STEPS = 16
# A 2-layer model on the first 20,000 characters of each of the 42 plays. Every training
# process below shares these trajectory fields, so their final parameters must agree.
TINY = [
    "model.num_layers=2",
    "model.embed_dim=64",
    "model.mlp_dim=128",
    "model.vocab_size=512",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.max_chars_per_doc=20000",
    f"train.steps={STEPS}",
    "train.batch_size=4",
    "train.log_every=4",
    "train.eval_every=8",
    "train.eval_batches=2",
    "train.checkpoint_every=4",
    "train.sample_tokens=12",
    "optimizer.warmup_steps=4",
]
PROCESS_TIMEOUT_S = 300
# JAX's persistent compilation cache, shared by the processes of this module: the first
# training process compiles, the later ones load the same executables (about 16 s -> 5 s each).
_jit_cache_dir: Path | None = None


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    if _jit_cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(_jit_cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def train_command(run_dir: Path, *extra: str, sets: list[str] = TINY) -> list[str]:
    command = [sys.executable, "-m", "jaxllm.train", "--run-dir", str(run_dir)]
    for value in sets:
        command += ["--set", value]
    return command + list(extra)


def sample_command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxllm.sample", "--run-dir", str(run_dir), *extra]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=PROCESS_TIMEOUT_S, check=False)


def run_all(commands: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run commands concurrently; most of their time is importing JAX."""
    processes = {
        name: subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for name, command in commands.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=PROCESS_TIMEOUT_S)
        results[name] = subprocess.CompletedProcess(commands[name], process.returncode, stdout, stderr)
    return results


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def final_params(run_dir: Path):
    config = read_config(run_dir / "config.yaml")
    return restore_params(run_dir, config.model, step=STEPS)


def assert_same_params(actual_dir: Path, desired_dir: Path) -> None:
    actual = jax.tree_util.tree_flatten_with_path(final_params(actual_dir))[0]
    desired = jax.tree_util.tree_flatten_with_path(final_params(desired_dir))[0]
    assert [path for path, _ in actual] == [path for path, _ in desired]
    for (path, a), (_, d) in zip(actual, desired):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(d),
                                      err_msg=f"parameter {jax.tree_util.keystr(path)}")


def metrics_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "train/tokens_per_s"} for row in rows]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Modification time and sha256 of every file under `folder`, to prove a command left it
    untouched."""
    return {
        str(path.relative_to(folder)): (path.stat().st_mtime_ns,
                                        hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


# --- shared training processes ------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    global _jit_cache_dir
    folder = tmp_path_factory.mktemp("cli")
    _jit_cache_dir = folder / "jit_cache"
    return folder


@pytest.fixture(scope="module")
def reference_run(workdir):
    # A relative --run-dir, as users type it; the process runs in `workdir`.
    result = run(train_command(Path("reference")), workdir)
    assert result.returncode == 0, describe(result)
    return workdir / "reference", result


@pytest.fixture(scope="module")
def stopped_and_resumed_run(workdir):
    run_dir = workdir / "stopped"
    stopped = run(train_command(run_dir, "--stop-at", "6"), workdir)
    assert stopped.returncode == 0, describe(stopped)
    steps_after_stop = available_steps(run_dir)
    resumed = run(train_command(run_dir), workdir)
    assert resumed.returncode == 0, describe(resumed)
    return run_dir, stopped, steps_after_stop, resumed


@pytest.fixture(scope="module")
def killed_and_resumed_run(workdir):
    run_dir = workdir / "killed"
    # Checkpoints every 2 steps keep the process saving, so the kill may land inside a save.
    sets = [value for value in TINY if not value.startswith("train.checkpoint_every")]
    command = train_command(run_dir, sets=sets + ["train.checkpoint_every=2"])
    process = subprocess.Popen(command, cwd=workdir, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = run_dir / "checkpoints" / "2"
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while not first_checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps_after_kill = available_steps(run_dir)
    resumed = run(command, workdir)
    assert resumed.returncode == 0, describe(resumed)
    return run_dir, process.returncode, steps_after_kill, resumed


# --- end to end ---------------------------------------------------------------------------


def test_pretrain_writes_run_directory(reference_run):
    run_dir, result = reference_run
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "figures/loss.png"):
        assert (run_dir / name).is_file(), name
    # keep_checkpoints is 3 in the tiny preset.
    assert available_steps(run_dir) == [8, 12, 16]
    assert result.stdout.splitlines()[0] == "run directory: reference"
    assert result.stdout.splitlines()[-1] == "run directory: reference"
    assert f"finished step {STEPS}" in result.stdout
    assert "unigram entropy" in result.stdout
    assert "sample:\nROMEO:" in result.stdout
    assert "Traceback" not in result.stderr


def test_saved_config_is_resolved(reference_run):
    run_dir, _ = reference_run
    config = read_config(run_dir / "config.yaml")
    assert config.model.num_layers == 2
    assert config.train.steps == STEPS
    assert config.model.rope_theta == 10000.0


def test_metrics_jsonl_keys(reference_run):
    run_dir, _ = reference_run
    rows = metrics_rows(run_dir)
    train_rows = [row for row in rows if "train/loss" in row]
    val_rows = [row for row in rows if "val/loss" in row]

    assert [row["step"] for row in train_rows] == [1, 4, 8, 12, 16]
    for row in train_rows:
        assert {"step", "train/loss", "train/lr", "train/grad_norm"} <= set(row)
    assert all("train/tokens_per_s" in row for row in train_rows[1:])
    assert [row["step"] for row in val_rows] == [8, 16]
    for row in val_rows:
        assert set(row) == {"step", "val/loss", "val/unigram_entropy"}
        assert row["val/unigram_entropy"] > 0
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]


def test_sample_prints_completions(reference_run, workdir):
    run_dir, _ = reference_run
    result = run(sample_command(run_dir, "--prompt", "ROMEO:", "--prompt", "JULIET:",
                                "--max-new-tokens", "8", "--temperature", "0"), workdir)
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ROMEO:")
    assert any(line.startswith("JULIET:") for line in lines[1:])
    assert "Traceback" not in result.stderr


# --- resume -------------------------------------------------------------------------------


def test_stop_at_saves_a_checkpoint(stopped_and_resumed_run):
    run_dir, stopped, steps_after_stop, _ = stopped_and_resumed_run
    assert steps_after_stop == [4, 6]
    assert f"stopped after step 6; rerun with --run-dir {run_dir}" in stopped.stdout


def test_resume_after_stop_is_bit_identical(stopped_and_resumed_run, reference_run):
    run_dir, _, _, resumed = stopped_and_resumed_run
    assert "resuming from step 6" in resumed.stdout
    assert_same_params(run_dir, reference_run[0])


def test_resume_keeps_one_metrics_row_per_step(stopped_and_resumed_run, reference_run):
    run_dir, *_ = stopped_and_resumed_run
    assert without_timing(metrics_rows(run_dir)) == without_timing(metrics_rows(reference_run[0]))


def test_resume_after_sigkill_is_bit_identical(killed_and_resumed_run, reference_run):
    run_dir, returncode, steps_after_kill, resumed = killed_and_resumed_run
    assert returncode == -signal.SIGKILL
    assert steps_after_kill, "the process was killed before its first checkpoint"
    assert steps_after_kill[-1] < STEPS, "the kill came after training had finished"
    assert f"resuming from step {steps_after_kill[-1]}" in resumed.stdout
    assert_same_params(run_dir, reference_run[0])
    assert without_timing(metrics_rows(run_dir)) == without_timing(metrics_rows(reference_run[0]))


def test_finished_run_reruns_without_training(reference_run, workdir, tmp_path):
    run_dir = tmp_path / "finished"
    shutil.copytree(reference_run[0], run_dir)
    rows_before = metrics_rows(run_dir)
    result = run(train_command(run_dir), workdir)
    assert result.returncode == 0, describe(result)
    assert f"resuming from step {STEPS}" in result.stdout
    assert metrics_rows(run_dir) == rows_before


# --- bad input ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(reference_run, workdir):
    """Each case: (command, run directory that must stay untouched or None, expected text)."""
    reference_dir = reference_run[0]
    cases_dir = workdir / "cases"
    cases_dir.mkdir()

    def copy_of_reference(name: str) -> Path:
        target = cases_dir / name
        shutil.copytree(reference_dir, target)
        return target

    empty_file = cases_dir / "empty.txt"
    empty_file.write_text("  \n\n", encoding="utf-8")
    latin1_file = cases_dir / "latin1.txt"
    latin1_file.write_bytes("Fran\u00e7ois et No\u00ebl\n".encode("latin-1"))

    mismatch = copy_of_reference("mismatch")
    corrupt_resume = copy_of_reference("corrupt_resume")
    victim = max((checkpoint for checkpoint in (corrupt_resume / "checkpoints/16/params/d").iterdir()),
                 key=lambda path: path.stat().st_size)
    with victim.open("r+b") as stream:
        stream.truncate(10)
    corrupt_sample = copy_of_reference("corrupt_sample")
    shutil.copy(victim, corrupt_sample / victim.relative_to(corrupt_resume))
    no_checkpoints = copy_of_reference("no_checkpoints")
    shutil.rmtree(no_checkpoints / "checkpoints")
    wider = copy_of_reference("wider")
    config_text = (wider / "config.yaml").read_text(encoding="utf-8")
    (wider / "config.yaml").write_text(config_text.replace("embed_dim: 64", "embed_dim: 96"),
                                       encoding="utf-8")
    long_prompt = "To be, or not to be, that is the question. " * 40

    cases = {
        "unknown_key": (train_command(cases_dir / "new1", sets=["train.stepz=5"]), None,
                        "unknown config key train.stepz"),
        "unknown_preset": ([sys.executable, "-m", "jaxllm.train", "--config", "tiniest",
                            "--run-dir", str(cases_dir / "new2")], None, "unknown preset 'tiniest'"),
        "wrong_type": (train_command(cases_dir / "new3", sets=TINY + ["train.steps=many"]), None,
                       "train.steps must be an integer"),
        "missing_data_file": (train_command(cases_dir / "new4", sets=TINY + [
                              f"data.files=[{cases_dir / 'absent.txt'}]"]), None, "absent.txt"),
        "empty_corpus": (train_command(cases_dir / "new5", sets=TINY + [
                         f"data.files=[{empty_file}]"]), None, "empty corpus"),
        "not_utf8": (train_command(cases_dir / "new6", sets=TINY + [f"data.files=[{latin1_file}]"]),
                     None, "not UTF-8"),
        "tokenizer_too_big": (train_command(cases_dir / "new7", sets=TINY + [
                              f"data.tokenizer={reference_dir / 'tokenizer.json'}",
                              "model.vocab_size=300"]), None,
                              "the tokenizer has 512 tokens but model.vocab_size is 300"),
        "config_mismatch": (train_command(mismatch, sets=TINY + ["train.batch_size=8"]), mismatch,
                            "train.batch_size"),
        "corrupt_resume": (train_command(corrupt_resume), corrupt_resume,
                           "checkpoint step 16"),
        "sample_corrupt": (sample_command(corrupt_sample, "--prompt", "ROMEO:"), corrupt_sample,
                           "checkpoint step 16"),
        "sample_no_checkpoints": (sample_command(no_checkpoints, "--prompt", "ROMEO:"),
                                  no_checkpoints, "no checkpoints in"),
        "sample_step_not_found": (sample_command(reference_dir, "--prompt", "A", "--step", "5"),
                                  None, "available steps: 8, 12, 16"),
        "sample_shape_mismatch": (sample_command(wider, "--prompt", "ROMEO:"), wider,
                                  "embed.embedding has shape (512, 64) in the checkpoint but (512, 96)"),
        "sample_prompt_too_long": (sample_command(reference_dir, "--prompt", long_prompt), None,
                                   "more than model.max_seq_len (64)"),
        "sample_missing_run_dir": (sample_command(cases_dir / "absent_run", "--prompt", "A"), None,
                                   "not found"),
    }
    before = {name: snapshot(case[1]) for name, case in cases.items() if case[1] is not None}
    results = run_all({name: case[0] for name, case in cases.items()}, workdir)
    after = {name: snapshot(cases[name][1]) for name in before}
    return cases, results, before, after, cases_dir


BAD_INPUT_CASES = [
    "unknown_key", "unknown_preset", "wrong_type", "missing_data_file", "empty_corpus",
    "not_utf8", "tokenizer_too_big", "config_mismatch", "corrupt_resume", "sample_corrupt",
    "sample_no_checkpoints", "sample_step_not_found", "sample_shape_mismatch",
    "sample_prompt_too_long", "sample_missing_run_dir",
]


@pytest.mark.parametrize("name", BAD_INPUT_CASES)
def test_bad_input_exits_2_with_one_line(bad_inputs, name):
    cases, results, before, after, _ = bad_inputs
    _, run_dir, expected = cases[name]
    result = results[name]
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, describe(result)
    assert expected in error_lines[0]
    assert result.stderr.rstrip().endswith(error_lines[0])
    if run_dir is not None:
        assert after[name] == before[name], "the command changed files in the run directory"


def test_bad_input_leaves_no_new_run_directory(bad_inputs):
    _, _, _, _, cases_dir = bad_inputs
    for index in range(1, 8):
        assert not (cases_dir / f"new{index}").exists()


def test_config_mismatch_message_suggests_fixes(bad_inputs):
    _, results, *_ = bad_inputs
    message = results["config_mismatch"].stderr.strip().splitlines()[-1]
    assert "train.batch_size=4" in message
    assert "train.batch_size=8" in message
    assert "--overwrite" in message
    assert "--run-dir" in message


def test_overwrite_starts_over(reference_run, workdir, tmp_path):
    run_dir = tmp_path / "overwritten"
    shutil.copytree(reference_run[0], run_dir)
    result = run(train_command(run_dir, "--overwrite", "--stop-at", "1",
                               sets=TINY + ["train.batch_size=2"]), workdir)
    assert result.returncode == 0, describe(result)
    assert available_steps(run_dir) == [1]
    assert read_config(run_dir / "config.yaml").train.batch_size == 2
    assert [row["step"] for row in metrics_rows(run_dir)] == [1]
    assert not (run_dir / "figures").exists()
