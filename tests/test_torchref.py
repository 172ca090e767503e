"""Tests of the PyTorch reference model in torchref/.

All tests run on CPU in float32 with fixed seeds.
"""

import dataclasses

import pytest
import torch

from torchref import KVCache, Llama, LlamaConfig, cross_entropy, greedy_generate, init_weights

ATOL = 1e-5

# head_dim 16 with rope_theta 1e4 gives wavelengths from 6.3 to 2e4 tokens. With
# original_max_seq_len 256, low_freq_factor 1 and high_freq_factor 4 the band limits
# are 64 and 256, so the frequencies fall in all three Llama 3.1 bands.
ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 256}


def make_config(*, tie_embeddings=False, rope_scaling=ROPE_SCALING, **overrides):
    values = dict(
        vocab_size=97,
        num_layers=2,
        embed_dim=32,
        mlp_dim=48,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
        norm_eps=1e-5,
        max_seq_len=512,
        tie_embeddings=tie_embeddings,
        init_std=0.2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def make_model(config, seed=0):
    """Build a model whose norm weights are random too, so that a swapped norm shows up."""
    model = Llama(config, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
    return model


def max_diff(a, b):
    return (a - b).abs().max().item()


def random_tokens(config, batch, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator)


def left_pad(prompts, pad_id=0):
    """Return tokens and mask [B, T] for 1-D prompts padded on the left."""
    length = max(len(prompt) for prompt in prompts)
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = True
    return tokens, mask


# ----------------------------------------------------------------------------- config


def test_config_from_dict_round_trip():
    config = make_config()
    assert LlamaConfig.from_dict(dataclasses.asdict(config)) == config


def test_config_from_dict_rejects_unknown_key():
    values = dataclasses.asdict(make_config())
    values["hidden_size"] = 32
    with pytest.raises(ValueError, match="hidden_size"):
        LlamaConfig.from_dict(values)


def test_config_from_dict_rejects_missing_key():
    values = dataclasses.asdict(make_config())
    del values["head_dim"]
    with pytest.raises(ValueError, match="head_dim"):
        LlamaConfig.from_dict(values)


def test_config_from_dict_parses_float_strings():
    values = dataclasses.asdict(make_config())
    values["norm_eps"] = "1e-5"
    assert LlamaConfig.from_dict(values).norm_eps == 1e-5


def test_config_rejects_bad_rope_scaling():
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        make_config(rope_scaling={**ROPE_SCALING, "original_max_position_embeddings": 256})
    incomplete = dict(ROPE_SCALING)
    del incomplete["factor"]
    with pytest.raises(ValueError, match="factor"):
        make_config(rope_scaling=incomplete)


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        make_config(num_heads=4, num_kv_heads=3)


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_state_dict_names_and_shapes(tie_embeddings):
    config = make_config(tie_embeddings=tie_embeddings)
    state = Llama(config).state_dict()
    D, F, V = config.embed_dim, config.mlp_dim, config.vocab_size
    NH, KH = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    expected = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        expected[prefix + "input_layernorm.weight"] = (D,)
        expected[prefix + "self_attn.q_proj.weight"] = (NH, D)
        expected[prefix + "self_attn.k_proj.weight"] = (KH, D)
        expected[prefix + "self_attn.v_proj.weight"] = (KH, D)
        expected[prefix + "self_attn.o_proj.weight"] = (D, NH)
        expected[prefix + "post_attention_layernorm.weight"] = (D,)
        expected[prefix + "mlp.gate_proj.weight"] = (F, D)
        expected[prefix + "mlp.up_proj.weight"] = (F, D)
        expected[prefix + "mlp.down_proj.weight"] = (D, F)
    if not tie_embeddings:
        expected["lm_head.weight"] = (V, D)

    assert {name: tuple(tensor.shape) for name, tensor in state.items()} == expected


def test_init_weights_statistics_and_seed():
    config = make_config(init_std=0.02, embed_dim=64, mlp_dim=128)
    model = Llama(config, seed=3)
    embed = model.model.embed_tokens.weight
    assert abs(embed.std().item() - 0.02) < 0.002, f"embedding std {embed.std().item()}"
    assert abs(embed.mean().item()) < 0.002, f"embedding mean {embed.mean().item()}"
    assert torch.equal(model.model.norm.weight, torch.ones(config.embed_dim))

    same_seed = Llama(config, seed=None)
    init_weights(same_seed, 3)
    for (name, a), (_, b) in zip(model.state_dict().items(), same_seed.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs between two inits with seed 3"
    other_seed = Llama(config, seed=4)
    assert not torch.equal(other_seed.model.embed_tokens.weight, embed)


# ----------------------------------------------------------------------------- Hugging Face parity


def build_hf_model(config):
    """Build a random transformers LlamaForCausalLM with the same architecture as config."""
    transformers = pytest.importorskip("transformers")
    # transformers 5.x takes rope_theta and the scaling inside one rope_parameters dict.
    if config.rope_scaling is None:
        rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    else:
        rope_parameters = {
            "rope_type": "llama3",
            "rope_theta": config.rope_theta,
            "factor": config.rope_scaling["factor"],
            "low_freq_factor": config.rope_scaling["low_freq_factor"],
            "high_freq_factor": config.rope_scaling["high_freq_factor"],
            "original_max_position_embeddings": config.rope_scaling["original_max_seq_len"],
        }
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.embed_dim,
        intermediate_size=config.mlp_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters=rope_parameters,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    return hf_model


def load_hf_weights(model, hf_model):
    state = dict(hf_model.state_dict())
    if model.config.tie_embeddings and "lm_head.weight" in state:
        # Tied transformers models may list the shared matrix under both names.
        head = state.pop("lm_head.weight")
        assert torch.equal(head, state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)


HF_CASES = [
    pytest.param(True, ROPE_SCALING, id="tied-llama3_rope"),
    pytest.param(False, ROPE_SCALING, id="untied-llama3_rope"),
    pytest.param(False, None, id="untied-default_rope"),
]


@pytest.mark.parametrize("tie_embeddings, rope_scaling", HF_CASES)
def test_logits_match_transformers(tie_embeddings, rope_scaling):
    config = make_config(tie_embeddings=tie_embeddings, rope_scaling=rope_scaling)
    hf_model = build_hf_model(config)
    model = Llama(config, seed=None).eval()
    load_hf_weights(model, hf_model)
    # Positions up to 299 reach past original_max_seq_len, where the scaled bands matter.
    tokens = random_tokens(config, batch=2, length=300)

    with torch.no_grad():
        expected = hf_model(input_ids=tokens).logits
        logits, _ = model(tokens)
    assert logits.dtype == torch.float32
    assert logits.shape == expected.shape
    diff = max_diff(logits, expected)
    assert diff < ATOL, f"max abs logit difference vs transformers: {diff}"


def test_rope_frequencies_match_transformers():
    pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from torchref import rope_inverse_frequencies

    config = make_config()
    hf_config = build_hf_model(config).config
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, device=None)
    actual = rope_inverse_frequencies(config)
    assert actual.dtype == torch.float32
    diff = max_diff(actual, expected)
    assert diff == 0.0, f"max abs inverse frequency difference vs transformers: {diff}"


def test_left_padded_logits_match_transformers():
    config = make_config()
    hf_model = build_hf_model(config)
    model = Llama(config, seed=None).eval()
    load_hf_weights(model, hf_model)
    prompts = [random_tokens(config, 1, length, seed=length)[0] for length in (9, 4, 1)]
    tokens, mask = left_pad(prompts)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)

    with torch.no_grad():
        expected = hf_model(input_ids=tokens, attention_mask=mask.long(), position_ids=positions).logits
        logits, _ = model(tokens, positions, mask)
    diff = max_diff(logits[mask], expected[mask])
    assert diff < ATOL, f"max abs logit difference on real tokens vs transformers: {diff}"


# ----------------------------------------------------------------------------- KV cache


def test_cached_steps_match_full_forward():
    config = make_config()
    model = make_model(config)
    tokens = random_tokens(config, batch=3, length=12)
    with torch.no_grad():
        expected, _ = model(tokens)
        # A cache longer than the sequence leaves unwritten slots that must stay hidden.
        cache = KVCache.allocate(config, batch=3, max_len=16)
        step_logits = []
        for t in range(tokens.shape[1]):
            logits, cache = model(tokens[:, t:t + 1], cache=cache)
            step_logits.append(logits)
    assert cache.index == 12
    diff = max_diff(torch.cat(step_logits, dim=1), expected)
    assert diff < ATOL, f"max abs difference, one token per step vs full forward: {diff}"


def test_cached_chunks_match_full_forward():
    config = make_config()
    model = make_model(config)
    tokens = random_tokens(config, batch=2, length=15)
    positions = torch.arange(15).expand(2, 15)
    with torch.no_grad():
        expected, _ = model(tokens)
        cache = KVCache.allocate(config, batch=2, max_len=15)
        chunk_logits = []
        start = 0
        for size in (5, 1, 7, 2):
            chunk = slice(start, start + size)
            logits, cache = model(tokens[:, chunk], positions[:, chunk], cache=cache)
            chunk_logits.append(logits)
            start += size
    diff = max_diff(torch.cat(chunk_logits, dim=1), expected)
    assert diff < ATOL, f"max abs difference, chunks (5, 1, 7, 2) vs full forward: {diff}"


def test_cache_overflow_raises():
    config = make_config()
    model = make_model(config)
    cache = KVCache.allocate(config, batch=1, max_len=4)
    with torch.no_grad(), pytest.raises(ValueError, match="max_len 4"):
        model(random_tokens(config, 1, 5), cache=cache)


# ----------------------------------------------------------------------------- padding and generation


def test_left_padded_row_matches_prompt_alone():
    config = make_config()
    model = make_model(config)
    prompts = [random_tokens(config, 1, length, seed=length)[0] for length in (10, 6, 3)]
    tokens, mask = left_pad(prompts)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch_logits, _ = model(tokens, positions, mask)
        assert torch.isfinite(batch_logits).all(), "padded query rows produced non-finite logits"
        for row, prompt in enumerate(prompts):
            alone, _ = model(prompt[None])
            diff = max_diff(batch_logits[row][mask[row]], alone[0])
            assert diff < ATOL, f"row {row} (length {len(prompt)}): max abs difference vs alone: {diff}"


def test_all_padding_row_stays_finite():
    config = make_config()
    model = make_model(config)
    tokens = random_tokens(config, 2, 5)
    mask = torch.tensor([[True] * 5, [False] * 5])
    with torch.no_grad():
        logits, _ = model(tokens, mask=mask)
    assert torch.isfinite(logits).all()


def greedy_without_cache(model, prompt, max_new_tokens):
    """Decode one prompt greedily by rerunning the full forward pass each step."""
    sequence = prompt[None]
    for _ in range(max_new_tokens):
        logits, _ = model(sequence)
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence[0, len(prompt):]


def test_greedy_generate_padded_batch_matches_single_prompts():
    config = make_config()
    model = make_model(config)
    prompts = [random_tokens(config, 1, length, seed=length)[0] for length in (7, 2, 5)]
    tokens, mask = left_pad(prompts)
    with torch.no_grad():
        generated = greedy_generate(model, tokens, mask, max_new_tokens=8)
        assert generated.shape == (3, 8)
        for row, prompt in enumerate(prompts):
            alone = greedy_generate(model, prompt[None], torch.ones(1, len(prompt), dtype=torch.bool), 8)
            assert torch.equal(generated[row], alone[0]), f"row {row}: {generated[row]} vs alone {alone[0]}"
            reference = greedy_without_cache(model, prompt, 8)
            assert torch.equal(alone[0], reference), f"row {row}: cached {alone[0]} vs uncached {reference}"


def test_greedy_generate_repeats_eos_after_stop():
    config = make_config()
    model = make_model(config)
    prompts = [random_tokens(config, 1, length, seed=length)[0] for length in (7, 2)]
    tokens, mask = left_pad(prompts)
    free = greedy_generate(model, tokens, mask, max_new_tokens=6)
    eos_id = int(free[0, 1])
    stopped = greedy_generate(model, tokens, mask, max_new_tokens=6, eos_id=eos_id)
    for row in range(2):
        hits = (free[row] == eos_id).nonzero()
        if len(hits) == 0:
            assert torch.equal(stopped[row], free[row])
            continue
        first = int(hits[0])
        assert torch.equal(stopped[row, :first + 1], free[row, :first + 1])
        assert (stopped[row, first:] == eos_id).all(), f"row {row} after eos: {stopped[row]}"


def test_greedy_generate_zero_new_tokens():
    config = make_config()
    model = make_model(config)
    tokens = random_tokens(config, 2, 3)
    generated = greedy_generate(model, tokens, torch.ones(2, 3, dtype=torch.bool), max_new_tokens=0)
    assert generated.shape == (2, 0)


# ----------------------------------------------------------------------------- loss


def test_cross_entropy_matches_torch():
    generator = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(3, 7, 11, generator=generator)
    targets = torch.randint(0, 11, (3, 7), generator=generator)
    mask = torch.rand(3, 7, generator=generator) > 0.3
    # Masked targets may hold values that are not token ids.
    targets = torch.where(mask, targets, torch.full_like(targets, -100))

    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    actual = cross_entropy(logits, targets, mask)
    diff = abs(actual.item() - expected.item())
    assert diff < 1e-6, f"cross_entropy {actual.item()} vs torch {expected.item()}: difference {diff}"


def test_cross_entropy_all_masked_is_zero():
    logits = torch.randn(2, 3, 5)
    targets = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    assert cross_entropy(logits, targets, mask).item() == 0.0


def test_cross_entropy_upcasts_bfloat16():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 9, generator=generator).to(torch.bfloat16)
    targets = torch.randint(0, 9, (2, 4), generator=generator)
    mask = torch.ones(2, 4, dtype=torch.bool)

    expected = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 9), targets.reshape(-1))
    actual = cross_entropy(logits, targets, mask)
    assert actual.dtype == torch.float32
    diff = abs(actual.item() - expected.item())
    assert diff < 1e-6, f"bfloat16 cross_entropy {actual.item()} vs float32 torch {expected.item()}"
