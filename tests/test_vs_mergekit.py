"""lorakit's merge methods against the real mergekit (a short benchmarks/vs_mergekit.py): on a
tiny Llama, mergekit merges the full fine-tuned models base + dW_i and lorakit merges the
adapters' dW_i; the merged weights must agree under the settings that make the two methods the
same, and differ (as mergekit's source says they do) under mergekit's TIES defaults.

mergekit is not a lorakit dependency: it lives in its own venv (LORAKIT_MERGEKIT_PYTHON, default
/work/venv-mergekit/bin/python); without it these tests are skipped. Marker: mergekit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vs_mergekit  # noqa: E402

PYTHON = vs_mergekit.mergekit_python()
pytestmark = [
    pytest.mark.mergekit,
    pytest.mark.skipif(not vs_mergekit.mergekit_available(PYTHON), reason=f"mergekit is not installed for {PYTHON}"),
]

SHORT = (
    "task_arithmetic",
    "magnitude_prune",
    "ties, equal weights",
    "ties, unequal weights",
    "dare_linear",
    "dare_ties, equal weights",
)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    cases = [c for c in vs_mergekit.CASES if c.name in SHORT]
    assert len(cases) == len(SHORT)
    found = vs_mergekit.run_cases(cases, tmp_path_factory.mktemp("vs_mergekit"), PYTHON)
    return {r["case"]: r for r in found}


@pytest.mark.parametrize("name", [n for n in SHORT if n != "ties, unequal weights"])
def test_lorakit_equals_mergekit_under_matching_settings(rows, name):
    row = rows[name]
    assert row["untouched_max_abs"] == 0.0  # mergekit left the tensors no adapter touches alone
    # float64 throughout, but mergekit's DARE prunes in float32 on CPU (sparsify.bernoulli)
    assert row["dense"]["max_rel"] < 1e-6, row
    if "combine" in row:  # the adapter file lorakit combine writes (exact SVD, float32 factors)
        assert row["combine"]["max_rel"] < 1e-6, row


def test_dare_cases_really_prune(rows):
    """The DARE comparisons replay masks that drop about half of every update."""
    for name in ("dare_linear", "dare_ties, equal weights"):
        assert 0.45 < rows[name]["mask_kept"] < 0.55


def test_ties_with_unequal_weights_differs_as_mergekit_source_says(rows):
    """mergekit elects the sign from the weighted deltas and divides by the agreeing weights;
    lorakit (like PEFT) elects from the unweighted ones and divides by their count. The rule
    written out from mergekit's source matches mergekit; lorakit does not."""
    row = rows["ties, unequal weights"]
    assert row["dense"]["max_rel"] > 0.05
    assert row["rule"]["max_rel"] < 1e-9
