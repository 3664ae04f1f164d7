"""Every bad input: a one-line error naming the file, field or tensor, exit 2, no
traceback, no OUT_DIR and no temporary files left behind."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.cli import main

from ..cli import one_line_error, run_cli


def write(tmp: Path, text: str) -> Path:
    p = tmp / "recipe.yml"
    p.write_text(text)
    return p


def run_bad(tmp: Path, text: str | None, *extra: str, recipe: Path | None = None) -> str:
    """``evomerge merge`` in a subprocess, as the user runs it: one line, exit 2, nothing written."""
    path = recipe or write(tmp, text or "")
    out = tmp / "out"
    err = one_line_error(run_cli("merge", str(path), str(out), "--quiet", *extra))
    assert not out.exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".out.")]
    return err


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensor(model: Path, name: str, fn) -> None:
    f = model / "model.safetensors"
    state = load_file(str(f))
    state[name] = fn(state[name])
    save_file(state, str(f), metadata={"format": "pt"})


def two(a: Path, b: Path, method: str = "linear", params: str = "") -> str:
    return f"merge_method: {method}\nmodels:\n  - model: {a}\n  - model: {b}\n{params}"


def weighted(a: Path, b: Path, wa: str, wb: str, params: str = "") -> str:
    """A linear recipe of two models with the given weights."""
    return (
        f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: {wa}}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: {wb}}}}}\n{params}"
    )


def test_weights_summing_to_zero(family, tmp_path):
    base, a, b, _ = family
    assert "sum to ~0" in run_bad(tmp_path, weighted(a, b, "1.0", "-1.0"))


def test_density_out_of_range(family, tmp_path):
    base, a, b, _ = family
    text = f"merge_method: ties\nbase_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{density: 1.5}}}}\n"
    err = run_bad(tmp_path, text)
    assert "density" in err and "1.5" in err and str(a) in err


def test_nan_weight_parameter(family, tmp_path):
    base, a, b, _ = family
    text = f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: .nan}}}}\n  - model: {b}\n"
    assert "finite" in run_bad(tmp_path, text)


def test_unknown_method_suggests(family, tmp_path):
    _, a, b, _ = family
    assert "did you mean 'ties'" in run_bad(tmp_path, two(a, b, "tie"))


def test_unknown_parameter_suggests(family, tmp_path):
    base, a, b, _ = family
    text = f"merge_method: ties\nbase_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{desnity: 0.5}}}}\n"
    assert "did you mean 'density'" in run_bad(tmp_path, text)


def test_layer_range_outside_model(family, tmp_path):
    _, a, _, _ = family
    text = f"merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 5]}}]\n"
    err = run_bad(tmp_path, text)
    assert "layer_range [0, 5]" in err and "2 layers" in err


def test_missing_model_path(family, tmp_path):
    _, a, _, _ = family
    err = run_bad(tmp_path, two(a, tmp_path / "nope"))
    assert "does not exist" in err and "nope" in err


def test_shapes_differ_names_tensor_and_models(tmp_path):
    from evomerge.testing import make_family

    a = make_family(tmp_path / "x", 0, hidden=32)[0]
    b = make_family(tmp_path / "y", 0, hidden=64)[0]
    err = run_bad(tmp_path, two(a, b))
    assert "shape" in err and str(a) in err and str(b) in err and "tensor 'model." in err


def test_architectures_differ(family, tmp_path):
    _, a, b, _ = family
    other = copy_model(b, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    assert "different architectures" in run_bad(tmp_path, two(a, other))


def test_vocab_sizes_differ_refused_without_policy(tmp_path):
    from evomerge.testing import make_family

    a = make_family(tmp_path / "x", 0, vocab=64)[0]
    b = make_family(tmp_path / "y", 0, vocab=72)[0]
    err = run_bad(tmp_path, two(a, b))
    assert "vocabulary sizes" in err and "64" in err and "72" in err


def test_vocab_policy_keeps_the_chosen_vocabulary(tmp_path):
    from evomerge.testing import make_family

    a = make_family(tmp_path / "x", 0, vocab=64)[0]
    b = make_family(tmp_path / "y", 0, vocab=72)[0]
    recipe = write(tmp_path, two(a, b) + f"tokenizer_source: {a}\n")
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert merged["model.embed_tokens.weight"].shape[0] == 64
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 64


def test_truncated_safetensors(family, tmp_path):
    _, a, b, _ = family
    bad = copy_model(b, tmp_path / "trunc")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    err = run_bad(tmp_path, two(a, bad))
    assert "truncated" in err and "model.safetensors" in err


def test_corrupt_safetensors_header(family, tmp_path):
    _, a, b, _ = family
    bad = copy_model(b, tmp_path / "corrupt")
    f = bad / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[10:20] = b"\xff" * 10
    f.write_bytes(bytes(raw))
    assert "corrupt" in run_bad(tmp_path, two(a, bad))


def test_header_claiming_huge_shape_is_refused_without_allocating(family, tmp_path):
    _, a, b, _ = family
    bad = copy_model(b, tmp_path / "huge")
    f = bad / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    key = "lm_head.weight"
    header[key]["shape"] = [10**9, 10**6]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    err = run_bad(tmp_path, two(a, bad))
    assert "lm_head.weight" in err and "claims shape" in err


@pytest.mark.parametrize(
    "method, where",
    [  # linear has no base
        ("linear", "model.norm.weight"),
        ("linear", "model.embed_tokens.weight"),
        *[(m, w) for m in ("ties", "slerp") for w in ("model.norm.weight", "model.embed_tokens.weight", "base")],
    ],
)
def test_non_finite_input_is_named(family, tmp_path, method, where):
    """Read-time checks (slerp) and result-time checks (operators that propagate NaN and
    Inf: the engine then names the input) give the same message."""
    base, a, b, _ = family
    bad_base = where == "base"
    tensor = "model.norm.weight" if bad_base else where
    bad = copy_model(base if bad_base else b, tmp_path / "bad")
    edit_tensor(bad, tensor, lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))
    if method == "slerp":
        first = bad if bad_base else a
        text = two(first, b if bad_base else bad, method) + f"base_model: {first}\nparameters: {{t: 0.5}}\n"
    else:
        text = two(a, b if bad_base else bad, method)
    if method == "ties":
        text += f"base_model: {bad if bad_base else base}\nparameters: {{density: 0.5}}\n"
    err = run_bad(tmp_path, text)
    assert f"tensor '{tensor}' of model '{bad}' contains NaN or Inf" in err


def test_non_finite_result(family, tmp_path):
    _, a, b, _ = family
    text = weighted(a, b, "3.0e+38", "3.0e+38", "parameters: {normalize: false}\n")
    assert "produced NaN or Inf" in run_bad(tmp_path, text)


def test_malformed_yaml(tmp_path):
    err = run_bad(tmp_path, "merge_method: ties\nmodels: [\n")
    assert "recipe.yml" in err and "invalid YAML" in err


def test_yaml_not_a_mapping(tmp_path):
    assert "mapping" in run_bad(tmp_path, "- just\n- a list\n")


def test_missing_recipe_file(tmp_path):
    assert "file not found" in run_bad(tmp_path, None, recipe=tmp_path / "absent.yml")


def test_slerp_needs_t(family, tmp_path):
    base, a, _, _ = family
    text = f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\n"
    assert "'t' is required" in run_bad(tmp_path, text)


def test_wrong_model_count(family, tmp_path):
    base, a, b, _ = family
    text = (
        f"merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\nmodels:\n"
        f"  - model: {base}\n  - model: {a}\n  - model: {b}\n"
    )
    assert "exactly 1" in run_bad(tmp_path, text)


def test_existing_out_dir_is_kept(family, tmp_path, capsys):
    _, a, b, _ = family
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    rc = main(["merge", str(write(tmp_path, two(a, b))), str(out), "--quiet"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert (out / "keep").read_text() == "x"


class Boom:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / "PWNED",))


def _pickle_model(src: Path, dst: Path, payload=None) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(str(src / "model.safetensors"))
    if payload is None:
        torch.save(state, dst / "pytorch_model.bin")
    else:
        with (dst / "pytorch_model.bin").open("wb") as fh:
            pickle.dump({"x": payload}, fh)
    return dst


def test_pickle_only_refused_without_flag(family, tmp_path):
    _, a, b, _ = family
    pk = _pickle_model(b, tmp_path / "pk")
    assert "--allow-pickle" in run_bad(tmp_path, two(a, pk))
    assert main(["merge", str(write(tmp_path, two(a, pk))), str(tmp_path / "ok"), "--quiet", "--allow-pickle"]) == 0


def test_malicious_pickle_never_runs(family, tmp_path):
    _, a, b, _ = family
    marker = Path(__file__).parent / "PWNED"
    marker.unlink(missing_ok=True)
    evil = _pickle_model(b, tmp_path / "evil", payload=Boom())
    err = run_bad(tmp_path, two(a, evil), "--allow-pickle")
    assert "refused" in err
    assert not marker.exists()
