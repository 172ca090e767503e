"""The parity ladder as tests: every registered rung in each of its dtypes, on each device."""

import numpy as np
import pytest
import torch

from parity.harness import RungContext, check_weight_identity, compare, make_models
from parity.rungs import RUNGS, run_rung
from parity.tolerances import TOLERANCES

CASES = [(name, dtype) for name, entry in RUNGS.items() for dtype in entry.dtypes]


@pytest.mark.parametrize(("name", "dtype"), CASES, ids=[f"{name}-{dtype}" for name, dtype in CASES])
def test_rung_within_tolerance(name, dtype, device):
    comparison = run_rung(name, dtype, device)
    assert comparison.passed, comparison.report()


def test_every_rung_has_a_tolerance():
    needed = {(entry.tolerance_key, dtype) for entry in RUNGS.values() for dtype in entry.dtypes}
    missing = sorted(needed - set(TOLERANCES))
    unused = sorted(set(TOLERANCES) - needed)
    assert not missing, f"rungs without a tolerance: {missing}"
    assert not unused, f"tolerances of no rung: {unused}"


def test_every_tolerance_has_a_reason():
    for key, entry in TOLERANCES.items():
        assert entry.reason.strip(), f"tolerance {key} has no reason"


def test_float32_logit_tolerances_meet_target():
    for key in ("logits", "decode", "cache_consistency", "left_padded"):
        assert TOLERANCES[(key, "float32")].atol <= 1e-5
        assert TOLERANCES[(key, "float32")].rtol == 0.0


def test_weight_precheck_rejects_one_ulp_change():
    pair = make_models(RungContext(device="cpu", dtype="float32"))
    name = "model.layers.1.mlp.up_proj.weight"
    with torch.no_grad():
        weight = dict(pair.torch_model.named_parameters())[name]
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(1.0))
    with pytest.raises(AssertionError, match=r"up_proj\.weight differs at index \(3, 5\)"):
        check_weight_identity(pair.params, pair.torch_model, pair.config)


def test_compare_reports_max_and_location():
    desired = np.zeros((2, 3), np.float32)
    actual = desired.copy()
    actual[1, 2] = 0.5
    comparison = compare("example", actual, desired, atol=0.1, rtol=0.0)
    assert not comparison.passed
    assert comparison.max_abs == 0.5
    assert comparison.max_abs_at == "[1, 2]"
    assert "max-abs 5.000e-01 at [1, 2]" in comparison.report()


def test_compare_names_tensor_of_dict_output():
    desired = {"a": np.ones(3, np.float32), "b": np.full(4, 2.0, np.float32)}
    actual = {"a": np.ones(3, np.float32), "b": np.array([2.0, 2.0, 2.5, 2.0], np.float32)}
    comparison = compare("example", actual, desired, atol=0.0, rtol=0.3)
    assert comparison.passed
    assert comparison.max_abs_at == "b[2]"
    assert comparison.max_rel == pytest.approx(0.25)


def test_compare_fails_on_shape_and_nan():
    shape = compare("example", np.zeros(3), np.zeros(4), atol=1.0, rtol=0.0)
    assert not shape.passed
    assert "shape" in shape.problem
    nan = compare("example", np.array([np.nan]), np.array([0.0]), atol=1.0, rtol=0.0)
    assert not nan.passed
    assert "NaN" in nan.problem
