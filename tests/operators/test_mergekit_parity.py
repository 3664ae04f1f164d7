"""Differential test against mergekit 0.1.5 on the same YAML.

``make test`` (and so CI) installs mergekit 0.1.5 into a virtual environment of its
own and points ``MERGEKIT_YAML`` at it, with ``EVOMERGE_REQUIRE_MERGEKIT=1``: there,
a missing mergekit fails these tests. Run by hand without it (plain ``pytest``), they
skip. Every deterministic method must give the same tensors to float32 rounding;
random methods (DARE, DELLA) are compared in distribution.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.operators import kernels
from evomerge.operators.engine import run_merge
from evomerge.operators.recipe import Recipe

MERGEKIT = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
REQUIRED = os.environ.get("EVOMERGE_REQUIRE_MERGEKIT") == "1" or os.environ.get("CI") == "true"


def mergekit() -> str:
    """The mergekit-yaml executable: a failure where it is required, else a skip."""
    if MERGEKIT and os.access(MERGEKIT, os.X_OK):
        return MERGEKIT
    if REQUIRED:
        where = MERGEKIT or "MERGEKIT_YAML unset, not on PATH"
        pytest.fail(f"mergekit-yaml not found ({where}): `make test` installs it")
    pytest.skip("mergekit-yaml not installed (make test installs it)")

CASES = {
    "linear": "models:\n  - {{model: {a}, parameters: {{weight: 0.3}}}}\n"
    "  - {{model: {b}, parameters: {{weight: 0.6}}}}",
    "task_arithmetic": "base_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.7}}}}\n"
    "  - {{model: {b}, parameters: {{weight: [0.2, 0.9]}}}}",
    "ties": "base_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.7, density: 0.4}}}}\n"
    "  - {{model: {b}, parameters: {{weight: 0.5, density: 0.6}}}}\n"
    "  - {{model: {c}, parameters: {{weight: [{{filter: mlp, value: 0.2}}, {{value: 0.4}}], density: 0.8}}}}",
    "breadcrumbs_ties": "base_model: {base}\nmodels:\n"
    "  - {{model: {a}, parameters: {{weight: 0.7, density: 0.5, gamma: 0.02}}}}\n"
    "  - {{model: {b}, parameters: {{weight: 0.5, density: 0.6, gamma: 0.02}}}}",
    "slerp": "base_model: {base}\nparameters: {{t: [0.1, 0.8]}}\nmodels:\n  - model: {base}\n  - model: {a}",
    "nuslerp": "base_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.3}}}}\n"
    "  - {{model: {b}, parameters: {{weight: 0.7}}}}",
    "multislerp": "models:\n  - {{model: {a}, parameters: {{weight: 0.3}}}}\n"
    "  - {{model: {b}, parameters: {{weight: 0.7}}}}",
    "model_stock": "base_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}",
    "karcher": "models:\n  - model: {a}\n  - model: {b}\n  - model: {c}",
    "sce": "base_model: {base}\nparameters: {{select_topk: 0.5}}\nmodels:\n  - model: {a}\n  - model: {b}",
    "nearswap": "base_model: {base}\nparameters: {{t: 0.003}}\nmodels:\n  - model: {a}",
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CASES))
def test_same_tensors_as_mergekit(family, tmp_path, method):
    _same_as_mergekit(family, tmp_path, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "breadcrumbs_ties", "sce"])
def test_the_cpu_kernels_give_mergekit_tensors(family, tmp_path, method, monkeypatch):
    """The test models' tensors are below the kernels' size floor; lower it so every
    tensor goes through the numba kernels."""
    monkeypatch.setattr(kernels, "MIN_NUMEL", 1)
    _same_as_mergekit(family, tmp_path, method)


def _same_as_mergekit(family, tmp_path, method):
    base, a, b, c = family
    text = f"merge_method: {method}\ndtype: float32\n" + CASES[method].format(base=base, a=a, b=b, c=c) + "\n"
    path = tmp_path / "r.yml"
    path.write_text(text)
    theirs = tmp_path / "mergekit"
    res = subprocess.run([mergekit(), str(path), str(theirs)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    ours = tmp_path / "ours"
    run_merge(Recipe.from_yaml(path), ours)
    expected = {}
    for f in theirs.glob("*.safetensors"):
        expected.update(load_file(str(f)))
    got = load_file(str(ours / "model.safetensors"))
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name].to(got[name].dtype), rtol=1e-5, atol=1e-6, msg=name)


def _merge_both(text: str, tmp_path: Path, seed: int = 0) -> None:
    """Merge the recipe ``text`` with mergekit into ``tmp_path / "mk"`` and with
    evomerge (DARE's masks seeded by ``seed``) into ``tmp_path / "ours"``."""
    path = tmp_path / "r.yml"
    path.write_text(text)
    res = subprocess.run([mergekit(), str(path), str(tmp_path / "mk")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    run_merge(Recipe.from_yaml(path), tmp_path / "ours", seed=seed)


def _kept_and_l1(out_dir: Path, base: dict, ft: dict, names: list[str]) -> tuple[float, float]:
    """Of a one-model merge in ``out_dir``: the fraction of the task vector's nonzero
    elements kept, and the L1 norm of the merged task vector over the task vector's."""
    out = load_file(str(out_dir / "model.safetensors"))
    kept = sum(int(((out[k].float() - base[k].float()).abs() > 0).sum()) for k in names)
    changed = sum(int((ft[k] != base[k]).sum()) for k in names)
    l1 = sum(float((out[k].float() - base[k].float()).abs().sum()) for k in names)
    return kept / changed, l1 / sum(float((ft[k].float() - base[k].float()).abs().sum()) for k in names)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, params, density",
    [("dare_linear", "density: 0.3", 0.3), ("della_linear", "density: 0.5, epsilon: 0.1", 0.5)],
)
def test_random_methods_match_mergekit_in_distribution(family, tmp_path, method, params, density):
    """Same keep fraction (to sampling noise) and the same L1 norm of the task vector."""
    base, a, _, _ = family
    text = f"merge_method: {method}\nbase_model: {base}\ndtype: float32\nmodels:\n"
    text += f"  - {{model: {a}, parameters: {{weight: 1.0, {params}}}}}\n"
    _merge_both(text, tmp_path, seed=3)  # into tmp_path / "mk" and tmp_path / "ours"
    sb, sa = load_file(str(base / "model.safetensors")), load_file(str(a / "model.safetensors"))
    stats = {who: _kept_and_l1(tmp_path / who, sb, sa, list(sb)) for who in ("mk", "ours")}
    assert abs(stats["ours"][0] - density) < 0.01 and abs(stats["mk"][0] - density) < 0.01
    assert stats["ours"][1] == pytest.approx(stats["mk"][1], rel=0.02)


SMOL_CASES = {
    "linear": "tokenizer_source: {a}\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.3}}}}\n"
    "  - {{model: {c}, parameters: {{weight: 0.6}}}}",
    "task_arithmetic": "base_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.7}}}}\n"
    "  - {{model: {b}, parameters: {{weight: 0.4}}}}",
    "slerp": "base_model: {base}\nparameters: {{t: 0.4}}\nmodels:\n  - model: {base}\n  - model: {a}",
    "union": "merge_method: task_arithmetic\ntokenizer_source: union\nbase_model: {base}\nmodels:\n"
    "  - {{model: {a}, parameters: {{weight: 0.5}}}}\n  - {{model: {c}, parameters: {{weight: 0.5}}}}",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SMOL_CASES))
def test_smollm2_in_bfloat16_as_mergekit(smol_zoo, tmp_path, case):
    """A real checkpoint (the SmolLM2 zoo's two-layer copy: bfloat16, tied embeddings, a
    49,152-token BPE vocabulary, one specialist adding two tokens), merged in bfloat16.
    evomerge computes in float32 and rounds once; mergekit computes in the recipe's
    dtype and rounds at every step (task arithmetic: difference, weighting, sum,
    addition), so an element may differ by up to four bfloat16 roundings of the largest
    input there (2**-6 of its magnitude; measured: at most 3.98 * 2**-8)."""
    base, a, b, c = (smol_zoo / n for n in ("base", "cmp", "next", "senti"))
    head = "" if case == "union" else f"merge_method: {case}\n"
    text = head + "dtype: bfloat16\n" + SMOL_CASES[case].format(base=base, a=a, b=b, c=c) + "\n"
    _merge_both(text, tmp_path)  # into tmp_path / "mk" and tmp_path / "ours"
    expected = {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        expected.update(load_file(str(f)))
    got = load_file(str(tmp_path / "ours" / "model.safetensors"))
    if "lm_head.weight" in expected and "lm_head.weight" not in got:  # tied: the same rows
        assert torch.equal(expected.pop("lm_head.weight"), expected["model.embed_tokens.weight"])
    assert set(got) == set(expected)
    sources = [load_file(str(m / "model.safetensors")) for m in (base, a, b, c)]
    for name in expected:
        ours, theirs = got[name].float(), expected[name].float()
        assert ours.shape == theirs.shape, name
        rows = min([s[name].shape[0] for s in sources if name in s] + [ours.shape[0]])
        scale = torch.stack([s[name][:rows].float().abs() for s in sources if name in s]).amax(dim=0)
        bound = torch.maximum(scale, ours[:rows].abs()) * 2**-6 + 1e-8
        gap = (ours[:rows] - theirs[:rows]).abs()
        assert bool((gap <= bound).all()), f"{name}: {int((gap > bound).sum())} elements beyond bfloat16 rounding"
        assert torch.equal(ours[rows:], theirs[rows:]), name  # added tokens' rows: copied from their one model
    if case == "union":
        assert got["model.embed_tokens.weight"].shape[0] == 49154


def _kth_magnitude(delta: torch.Tensor, density: float) -> float:
    """The magnitude of the k-th largest |delta| (k = density * numel, as TIES keeps)."""
    k = int(delta.numel() * density)
    return float(delta.abs().flatten().kthvalue(delta.numel() - k + 1).values) if k > 0 else float("inf")


@pytest.mark.slow
def test_smollm2_ties_differs_from_mergekit_only_at_threshold_ties(smol_zoo, tmp_path):
    """bfloat16 task vectors take few distinct magnitudes, so many elements tie at the
    top-k threshold and either choice among them is a valid TIES merge (mergekit keeps
    whichever its unstable sort returns; evomerge those of lowest tie priority). Every element
    where the two merges differ must be such a tie for one of the models."""
    base, a, b = (smol_zoo / n for n in ("base", "cmp", "next"))
    density = {a: 0.4, b: 0.6}
    text = f"merge_method: ties\nbase_model: {base}\ndtype: float32\nmodels:\n"
    text += "".join(f"  - {{model: {m}, parameters: {{weight: 0.8, density: {d}}}}}\n" for m, d in density.items())
    _merge_both(text, tmp_path)  # into tmp_path / "mk" and tmp_path / "ours"
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    sources = {m: load_file(str(m / "model.safetensors")) for m in (base, a, b)}
    differing = 0
    for name, got in ours.items():
        gap = got.float() != theirs[name].float()
        if not gap.any():
            continue
        tie = torch.zeros_like(gap)
        for model, d in density.items():
            delta = sources[model][name].float() - sources[base][name].float()
            tie |= delta.abs() == _kth_magnitude(delta, d)
        assert bool(tie[gap].all()), f"{name}: {int((gap & ~tie).sum())} differing elements are not threshold ties"
        differing += int(gap.sum())
    assert differing > 0  # the ties are real here: the check had something to check


@pytest.mark.slow
def test_smollm2_ties_keeps_as_many_as_mergekit_with_ties_spread_evenly(smol_zoo, tmp_path):
    """One bfloat16 task vector trimmed to density 0.4 (one model: the output is the
    fine-tune where kept, the base elsewhere): per tensor, exactly as many elements kept
    as mergekit keeps, every element kept by one and not the other a threshold tie, and
    evomerge keeps the same share of the ties in every quarter of a tensor's elements
    (lowest-index ties would keep all of the first quarters' and none of the last's)."""
    base, a = smol_zoo / "base", smol_zoo / "cmp"
    text = f"merge_method: ties\nbase_model: {base}\ndtype: float32\nmodels:\n"
    text += f"  - {{model: {a}, parameters: {{weight: 0.8, density: 0.4}}}}\n"
    _merge_both(text, tmp_path)  # into tmp_path / "mk" and tmp_path / "ours"
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    sb, sa = load_file(str(base / "model.safetensors")), load_file(str(a / "model.safetensors"))
    spread = []
    for name, got in ours.items():
        delta = sa[name].float() - sb[name].float()
        if not delta.any():
            continue
        kept_ours, kept_theirs = got.float() != sb[name].float(), theirs[name].float() != sb[name].float()
        assert int(kept_ours.sum()) == int(kept_theirs.sum()), name
        tie = delta.abs() == _kth_magnitude(delta, 0.4)
        assert bool(tie[kept_ours != kept_theirs].all()), name
        ties, kept_ties = (t.flatten()[: tie.numel() // 4 * 4].view(4, -1).sum(dim=1) for t in (tie, kept_ours & tie))
        if int(ties.min()) >= 2000 and 0 < int(kept_ties.sum()) < int(ties.sum()):
            spread.append(kept_ties / ties - kept_ties.sum() / ties.sum())  # each quarter's keep rate, less the whole's
    assert spread  # bfloat16 deltas tie at the threshold: the check had something to check
    assert float(torch.stack(spread).abs().max()) < 0.03


@pytest.mark.slow
def test_smollm2_dare_ties_matches_mergekit_in_distribution(smol_zoo, tmp_path):
    """DARE-TIES on bfloat16 sources: the same keep fraction (to sampling noise) and L1
    norm of the merged task vector as mergekit, whose random stream differs."""
    base, a = smol_zoo / "base", smol_zoo / "cmp"
    text = f"merge_method: dare_ties\nbase_model: {base}\ndtype: float32\nmodels:\n"
    text += f"  - {{model: {a}, parameters: {{weight: 1.0, density: 0.3}}}}\n"
    _merge_both(text, tmp_path, seed=3)  # into tmp_path / "mk" and tmp_path / "ours"
    sb, sa = load_file(str(base / "model.safetensors")), load_file(str(a / "model.safetensors"))
    tuned = [k for k in sb if not torch.equal(sb[k], sa[k])]  # the trained layers
    stats = {who: _kept_and_l1(tmp_path / who, sb, sa, tuned) for who in ("mk", "ours")}
    assert abs(stats["ours"][0] - stats["mk"][0]) < 0.01
    assert stats["ours"][1] == pytest.approx(stats["mk"][1], rel=0.02)
