"""The third leg: jaxllm against Hugging Face transformers, through `python -m jaxllm.convert`.

Small random `LlamaForCausalLM`s are built locally from a config (eager attention), saved with
`save_pretrained` next to a byte-level BPE tokenizer.json, imported into run directories, and
their logits compared with transformers' within LOGITS_ATOL (1e-4; about 3e-6 measured on CPU,
see docs/parity.md). jaxllm runs go the other way with `--to-hf`. One import, one export, the
sampler and one rejected input run as separate processes, so exit status and stderr are checked
as a user sees them. The other cases call the same `main` in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxllm.checkpoint import CheckpointWriter, restore_params
from jaxllm.config import Config, DataConfig, ModelConfig, RopeScaling, read_config, save_config
from jaxllm.convert import ConversionError, import_hf_run, model_config_from_hf, tokenizer_from_hf
from jaxllm.convert.__main__ import main as convert_main
from jaxllm.data import Tokenizer, train_tokenizer
from jaxllm.model import forward
from jaxllm.train.state import create_train_state

REPO_ROOT = Path(__file__).resolve().parent.parent
PROCESS_TIMEOUT_S = 300
LOGITS_ATOL = 1e-4
TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine, and the early bird catches the worm",
    "to be or not to be, that is the question",
] * 10
# Llama 3 special tokens plus reserved ones, as in a Llama 3 tokenizer.json; jaxllm's <|pad|>
# and chat tokens must come from the reserved ones.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"] + [
    f"<|reserved_special_token_{i}|>" for i in range(6)
]
VOCAB_SIZE = 320
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


# --- helpers --------------------------------------------------------------------------------


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
        text=True, timeout=PROCESS_TIMEOUT_S,
    )


def train_bpe(specials: list[str]) -> HFTokenizer:
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TEXT, trainer)
    return tokenizer


def build_hf_model(folder: Path, *, num_kv_heads: int, tie: bool, scaled: bool,
                   dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    """Save a seeded random LlamaForCausalLM and a Llama-3-style tokenizer.json into `folder`."""
    rope = dict(LLAMA31_SCALING) if scaled else {"rope_type": "default"}
    rope["rope_theta"] = 10000.0
    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_parameters=rope,
        initializer_range=0.1, bos_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape))
    model = model.to(dtype).eval()
    model.save_pretrained(folder)
    train_bpe(LLAMA3_SPECIALS).save(str(folder / "tokenizer.json"))
    return model


def load_hf(folder: Path) -> transformers.LlamaForCausalLM:
    return transformers.LlamaForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    ).eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()


def jax_logits(run_dir: Path, tokens: np.ndarray) -> np.ndarray:
    config = read_config(run_dir / "config.yaml")
    params = restore_params(run_dir.absolute(), config.model)
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    logits, _ = forward(params, jnp.asarray(tokens), jnp.asarray(positions), config=config.model)
    return np.asarray(logits)


def random_tokens(shape=(2, 24), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB_SIZE, shape).astype(np.int32)


def assert_logits_close(actual: np.ndarray, desired: np.ndarray) -> None:
    diff = np.abs(actual - desired)
    index = tuple(int(i) for i in np.unravel_index(np.argmax(diff), diff.shape))
    assert diff.max() <= LOGITS_ATOL, f"max-abs {diff.max():.3e} at {index} (atol {LOGITS_ATOL})"


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- import ---------------------------------------------------------------------------------


HF_MODELS = {
    "gqa-untied-llama31": {"num_kv_heads": 2, "tie": False, "scaled": True},
    "mha-tied-plain": {"num_kv_heads": 4, "tie": True, "scaled": False},
    "mqa-tied-llama31": {"num_kv_heads": 1, "tie": True, "scaled": True},
}


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, tuple[Path, Path, transformers.LlamaForCausalLM]]:
    """Save each HF_MODELS entry with transformers and import it.

    The first goes through the command line in its own process. The others call the same
    `main` in this process, which saves a JAX start-up per model.
    """
    root = tmp_path_factory.mktemp("hf-import")
    result = {}
    for number, (name, options) in enumerate(HF_MODELS.items()):
        hf_dir, run_dir = root / f"{name}-hf", root / f"{name}-run"
        model = build_hf_model(hf_dir, **options)
        args = ["--from-hf", str(hf_dir), "--run-dir", str(run_dir)]
        if number == 0:
            process = run_module("jaxllm.convert", *args)
            assert process.returncode == 0, process.stderr
        else:
            assert convert_main(args) == 0
        result[name] = (hf_dir, run_dir, model)
    return result


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_imported_logits_match_transformers(imported, name):
    hf_dir, run_dir, model = imported[name]
    tokens = random_tokens()
    assert_logits_close(jax_logits(run_dir, tokens), hf_logits(model, tokens))


def test_import_writes_run_directory(imported):
    _, run_dir, _ = imported["gqa-untied-llama31"]
    config = read_config(run_dir / "config.yaml")
    assert config.model.num_kv_heads == 2
    assert config.model.head_dim == 16
    assert config.model.tie_embeddings is False
    assert config.model.rope_scaling == RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=32
    )
    assert config.data.seq_len == 128
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    # <|pad|> takes the first reserved token's id (2), so the vocabulary does not grow.
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.vocab_size == 300


def test_sample_from_imported_run_is_transformers_greedy(imported):
    hf_dir, run_dir, model = imported["gqa-untied-llama31"]
    prompt, new_tokens = "the quick brown", 8
    process = run_module("jaxllm.sample", "--run-dir", str(run_dir), "--prompt", prompt,
                         "--max-new-tokens", str(new_tokens), "--temperature", "0")
    assert process.returncode == 0, process.stderr

    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    ids = torch.tensor([tokenizer.encode(prompt, add_bos=True)])
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    expected = prompt + tokenizer.decode(output[0, ids.shape[1]:].tolist())
    assert process.stdout.rstrip("\n") == expected


def test_import_reads_bfloat16_safetensors(tmp_path):
    hf_dir = tmp_path / "hf"
    build_hf_model(hf_dir, num_kv_heads=2, tie=False, scaled=True, dtype=torch.bfloat16)
    with safetensors.safe_open(hf_dir / "model.safetensors", framework="numpy") as reader:
        assert reader.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    run_dir = import_hf_run(hf_dir, tmp_path / "run")
    tokens = random_tokens()
    # transformers widens the bfloat16 weights to float32 exactly, as the importer does.
    assert_logits_close(jax_logits(run_dir, tokens), hf_logits(load_hf(hf_dir), tokens))


def test_v4_and_v5_rope_forms_read_alike(imported):
    hf_dir, _, _ = imported["gqa-untied-llama31"]
    v5 = json.loads((hf_dir / "config.json").read_text())
    v4 = dict(v5)
    nested = dict(v4.pop("rope_parameters"))
    v4["rope_theta"] = nested.pop("rope_theta")
    v4["rope_scaling"] = nested
    assert "rope_parameters" in v5
    assert model_config_from_hf(v4) == model_config_from_hf(v5)
    assert model_config_from_hf(v4).rope_scaling is not None


def test_head_dim_defaults_to_embed_over_heads(imported):
    hf_dir, _, _ = imported["mha-tied-plain"]
    values = json.loads((hf_dir / "config.json").read_text())
    values.pop("head_dim", None)
    assert model_config_from_hf(values).head_dim == 64 // 4


# --- export ---------------------------------------------------------------------------------


def make_jaxllm_run(run_dir: Path, *, tie: bool) -> Config:
    """A run directory like training writes: config.yaml, tokenizer.json, checkpoint 0."""
    model = ModelConfig(
        vocab_size=VOCAB_SIZE, num_layers=2, embed_dim=64, mlp_dim=160, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_seq_len=32),
        norm_eps=1e-5, max_seq_len=128, tie_embeddings=tie, init_std=0.1,
    )
    config = Config(model=model, data=DataConfig(seq_len=64))
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / "config.yaml")
    train_tokenizer(TEXT, 300).save(run_dir / "tokenizer.json")
    state = create_train_state(config, jax.random.key(0))
    with CheckpointWriter(run_dir.absolute(), keep=1) as writer:
        writer.save(state, {"step": 0, "windows_consumed": 0})
    return config


@pytest.fixture(scope="module")
def jaxllm_runs(tmp_path_factory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("jaxllm-runs")
    runs = {}
    for tie in (False, True):
        runs[tie] = root / f"run-tied-{tie}"
        make_jaxllm_run(runs[tie], tie=tie)
    return runs


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_exported_run_loads_in_transformers(jaxllm_runs, tmp_path, tie):
    out = tmp_path / "hf"
    args = ["--to-hf", str(jaxllm_runs[tie]), "--out", str(out)]
    if tie:
        assert convert_main(args) == 0
    else:
        process = run_module("jaxllm.convert", *args)
        assert process.returncode == 0, process.stderr
    assert sorted(path.name for path in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]
    values = json.loads((out / "config.json").read_text())
    assert values["rope_parameters"]["rope_type"] == "llama3"
    assert values["rope_scaling"]["rope_type"] == "llama3"
    assert values["tie_word_embeddings"] is tie

    tokens = random_tokens(seed=1)
    assert_logits_close(hf_logits(load_hf(out), tokens), jax_logits(jaxllm_runs[tie], tokens))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    jaxllm_tokenizer = Tokenizer.load(jaxllm_runs[tie] / "tokenizer.json")
    assert hf_tokenizer.pad_token_id == jaxllm_tokenizer.pad_id
    hf_ids = hf_tokenizer(TEXT[0], add_special_tokens=False).input_ids
    assert hf_ids == jaxllm_tokenizer.encode(TEXT[0])


def test_sharded_export_loads_in_transformers(jaxllm_runs, tmp_path):
    out = tmp_path / "hf"
    status = convert_main(["--to-hf", str(jaxllm_runs[False]), "--out", str(out),
                           "--max-shard-size", "40KB", "--dtype", "bfloat16"])
    assert status == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert not (out / "model.safetensors").exists()
    for shard in shards:
        assert (out / shard).stat().st_size <= 40_000 + 10_000, f"{shard} is over the limit"

    model = load_hf(out)
    tokens = random_tokens(seed=2)
    # The weights went through bfloat16; the jaxllm side gets the same rounding to compare.
    config = read_config(jaxllm_runs[False] / "config.yaml")
    params = restore_params(jaxllm_runs[False].absolute(), config.model)
    rounded = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16).astype(jnp.float32), params)
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    logits, _ = forward(rounded, jnp.asarray(tokens), jnp.asarray(positions), config=config.model)
    assert_logits_close(hf_logits(model, tokens), np.asarray(logits))


def test_export_refuses_non_empty_output(jaxllm_runs, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    status = convert_main(["--to-hf", str(jaxllm_runs[True]), "--out", str(out)])
    assert status == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"

    status = convert_main(["--to-hf", str(jaxllm_runs[True]), "--out", str(out), "--overwrite"])
    assert status == 0
    assert not (out / "notes.txt").exists()
    assert (out / "model.safetensors").exists()


# --- rejected input -------------------------------------------------------------------------


@pytest.fixture
def hf_copy(imported, tmp_path) -> Path:
    """A writable copy of an imported HF folder (GQA, untied, Llama 3.1 scaling)."""
    source, _, _ = imported["gqa-untied-llama31"]
    target = tmp_path / "hf"
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


def import_error(folder: Path, capsys) -> str:
    """Run the importer in-process and return its single stderr line (exit status 2)."""
    status = convert_main(["--from-hf", str(folder), "--run-dir", str(folder.parent / "run")])
    err = capsys.readouterr().err
    assert status == 2, err
    assert not (folder.parent / "run").exists()
    return err


def test_rejects_unknown_architecture(hf_copy):
    edit_config(hf_copy, architectures=["MistralForCausalLM"], model_type="mistral")
    process = run_module("jaxllm.convert", "--from-hf", str(hf_copy), "--run-dir",
                         str(hf_copy.parent / "run"))
    assert_user_error(process, "unsupported model", "MistralForCausalLM", "LlamaForCausalLM")


def test_rejects_missing_tensor(hf_copy, capsys):
    state = safetensors.numpy.load_file(hf_copy / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    safetensors.numpy.save_file(state, hf_copy / "model.safetensors", metadata={"format": "pt"})
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in import_error(hf_copy, capsys)


def test_rejects_shape_mismatch(hf_copy, capsys):
    edit_config(hf_copy, intermediate_size=96)
    err = import_error(hf_copy, capsys)
    assert "tensor model.layers.0.mlp.gate_proj.weight has shape [160, 64]" in err
    assert "expects [96, 64]" in err


def test_rejects_bias_config_and_tensor(hf_copy, capsys):
    edit_config(hf_copy, attention_bias=True)
    assert "attention_bias" in import_error(hf_copy, capsys)

    edit_config(hf_copy, attention_bias=False)
    state = safetensors.numpy.load_file(hf_copy / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    safetensors.numpy.save_file(state, hf_copy / "model.safetensors", metadata={"format": "pt"})
    assert "unexpected tensor model.layers.0.self_attn.q_proj.bias" in import_error(hf_copy, capsys)


def test_rejects_pickle_only_folder(hf_copy, capsys):
    (hf_copy / "model.safetensors").unlink()
    # Not a valid pickle: loading it would fail differently, and it must not be opened at all.
    (hf_copy / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle")
    err = import_error(hf_copy, capsys)
    assert "pytorch_model.bin" in err
    assert "pickle" in err
    assert "safetensors" in err


def test_rejects_missing_config_and_weights(hf_copy, capsys):
    (hf_copy / "model.safetensors").unlink()
    assert "no model weights" in import_error(hf_copy, capsys)
    (hf_copy / "config.json").unlink()
    assert "config.json not found" in import_error(hf_copy, capsys)


def test_rejects_unsupported_rope_type(hf_copy, capsys):
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    edit_config(hf_copy, rope_parameters=yarn)
    assert "RoPE type 'yarn'" in import_error(hf_copy, capsys)


# --- tokenizer mapping ----------------------------------------------------------------------


def test_tokenizer_renames_role_tokens_and_appends(tmp_path):
    """A `<s>`/`</s>` tokenizer: BOS and EOS keep their ids under jaxllm names.

    The other jaxllm special tokens are appended.
    """
    tokenizer = train_bpe(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "unk_token": "<unk>"}
    ))
    size = tokenizer.get_vocab_size()
    mapped = tokenizer_from_hf(tmp_path, vocab_size=size + 4)
    assert mapped.bos_id == tokenizer.token_to_id("<s>")
    assert mapped.eos_id == tokenizer.token_to_id("</s>")
    assert mapped.backend.token_to_id("<unk>") == tokenizer.token_to_id("<unk>")
    # <|pad|> and the three chat tokens are appended after the last id.
    assert sorted(mapped.special_ids) == [1, 2, size, size + 1, size + 2, size + 3]
    assert mapped.encode(TEXT[0]) == tokenizer.encode(TEXT[0], add_special_tokens=False).ids


def test_tokenizer_that_does_not_fit_is_rejected(tmp_path):
    tokenizer = train_bpe(["<s>", "</s>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConversionError, match="vocab_size"):
        tokenizer_from_hf(tmp_path, vocab_size=tokenizer.get_vocab_size())
