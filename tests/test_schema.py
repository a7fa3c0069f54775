"""The kernel interface is declared once (rlfuse/_schema.py) and every copy derives from it.

- csrc/include/rlfuse/schema.h is exactly what the schema generates (regenerate with
  ``python python/rlfuse/_schema.py --write``), and no other C++ file re-declares its enums or structs;
- the compiled bindings take exactly the schema's fields, by name, and reject anything else;
- the Python launchers, the Triton launchers and kernel, LossConfig's option tuples and the custom
  op's typed loss parameters all follow the schema.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlfuse
from rlfuse import _schema, config
from rlfuse.backends import compiled_extension
from rlfuse.ops import _launch
from rlfuse.ops.policy_loss import TokenLossParams

REPO = Path(__file__).resolve().parents[1]
C = compiled_extension()
needs_ext = pytest.mark.skipif(C is None, reason="rlfuse._C not built")


def test_checked_in_header_is_generated_from_the_schema():
    header = REPO / _schema.HEADER_PATH
    assert header.read_text() == _schema.generate_header(), (
        f"{header} differs from rlfuse/_schema.py: run `python python/rlfuse/_schema.py --write`")


def test_schema_runs_without_torch_or_the_extension():
    """The generator needs only the standard library (the file is run directly, torch blocked)."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['rlfuse'] = None; sys.argv = sys.argv[1:]; "
            "import runpy; runpy.run_path(sys.argv[0], run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "python/rlfuse/_schema.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_other_cpp_file_declares_schema_types():
    names = {s.cname for s in _schema.STRUCTS} | {e.cname for e in _schema.ENUMS}
    declared = re.compile(r"\b(?:enum(?:\s+class)?|struct)\s+(\w+)\s*(?::\s*\w+\s*)?\{")
    offenders = []
    for path in sorted((REPO / "csrc").rglob("*")):
        if path.suffix not in (".h", ".cuh", ".cpp", ".cu") or path.name == "schema.h":
            continue
        offenders += [f"{path.relative_to(REPO)}: {name}" for name in declared.findall(path.read_text())
                      if name in names]
    assert not offenders, "declared outside schema.h:\n" + "\n".join(offenders)


def test_every_enum_has_dense_values_and_python_names_used_by_config():
    assert config.TOKEN_LOCAL_LOSSES == _schema.POLICY_KIND.names
    assert set(_schema.POLICY_KIND.names) <= set(config.POLICY_LOSSES)
    assert ("none",) + config.KL_ESTIMATORS == _schema.KL_KIND.names
    assert config.CISPO_MODES == _schema.CISPO_MODE.names
    assert _launch.DTYPE_TAGS == {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    assert set(_launch.DTYPE_TAGS.values()) == set(range(len(_schema.DTYPE)))


def test_token_loss_params_come_from_loss_config_by_name():
    fields = {f.name for f in dataclasses_fields(rlfuse.LossConfig)}
    for f in _schema.TOKEN_LOSS_PARAMS.fields:
        assert (f.source or f.name) in fields, f"TokenLossParams.{f.name} has no LossConfig field"
    params = TokenLossParams.from_config(rlfuse.LossConfig.cispo(kl="k3+", kl_coef=0.3, entropy_coef=0.01))
    assert params._fields == _schema.TOKEN_LOSS_PARAMS.names
    assert params.policy == _schema.POLICY_KIND["cispo"]
    assert params.kl == _schema.KL_KIND["k3+"]
    assert params.cispo_mode == _schema.CISPO_MODE["upper"]
    assert params.clip_low == -1.0 and params.dual_clip == 0.0 and params.kl_coef == pytest.approx(0.3)
    assert TokenLossParams.from_config(rlfuse.LossConfig()).kl == _schema.KL_KIND["none"]


def dataclasses_fields(cls):
    import dataclasses

    return dataclasses.fields(cls)


def test_custom_op_takes_typed_named_loss_parameters():
    for op in (torch.ops.rlfuse.policy_loss_fused.default, torch.ops.rlfuse.policy_loss_fused_inplace.default):
        args = {a.name: a for a in op._schema.arguments}
        assert "params" not in args
        for f in _schema.TOKEN_LOSS_PARAMS.fields:
            assert args[f.name].kwarg_only, f.name
            assert str(args[f.name].type) == ("float" if f.ctype == "float" else "int"), f.name
        assert not any("[]" in str(a.type) for a in op._schema.arguments), op._schema


@needs_ext
def test_bindings_are_the_schema_kernels():
    cpu = {name[: -len("_cpu")] for name in dir(C) if name.endswith("_cpu")}
    assert cpu == set(_schema.KERNELS)
    if C.cuda_compiled:
        assert {name[: -len("_cuda")] for name in dir(C) if name.endswith("_cuda")} == set(_schema.KERNELS)


@needs_ext
@pytest.mark.parametrize("kernel", sorted(_schema.KERNELS))
def test_binding_field_list_is_the_schema(kernel):
    """The compiled struct's field names (as the binding reports them) are the schema's: a stale
    build or a hand-edited header fails here."""
    with pytest.raises(ValueError) as error:
        getattr(C, f"{kernel}_cpu")(1)
    listed = re.search(r"\(([^)]*)\) and num_threads", str(error.value)).group(1).split(", ")
    assert tuple(listed) == _schema.KERNELS[kernel].args.names


def _fused_call(dtype=torch.float32):
    """Valid keyword arguments of policy_loss_fused_cpu for a small problem, and its tensors."""
    g = torch.Generator().manual_seed(0)
    n, v = 3, 11
    logits = torch.randn(n, v, generator=g).to(dtype)
    tensors = dict(
        tokens=torch.randint(0, v, (n,), generator=g), advantages=torch.randn(n, generator=g),
        old_logp=torch.full((n,), -2.0), ref_logp=torch.full((n,), -2.5), policy_weight=torch.full((n,), 1 / n),
        weight=torch.full((n,), 1 / n), loss=torch.empty(n), logp=torch.empty(n), entropy=torch.empty(n),
        grad_logits=torch.full((n, v), 7.0, dtype=dtype))
    params = TokenLossParams.from_config(rlfuse.LossConfig.dapo(kl="k3", kl_coef=0.1))
    layout = (n, n, 0, v)
    fields = _launch.kernel_fields(
        "policy_loss_fused", logits, layout, v, tensors["tokens"], 1.0, tensors["advantages"], tensors["old_logp"],
        tensors["ref_logp"], tensors["policy_weight"], tensors["weight"], params, tensors["loss"], tensors["logp"],
        tensors["entropy"], tensors["grad_logits"], layout)
    return fields, logits, tensors


@needs_ext
def test_binding_fills_the_struct_by_name_in_any_order():
    fields, logits, tensors = _fused_call()
    C.policy_loss_fused_cpu(num_threads=1, **dict(reversed(list(fields.items()))))
    expected = torch.log_softmax(logits.double(), -1).gather(-1, tensors["tokens"][:, None])[:, 0]
    torch.testing.assert_close(tensors["logp"].double(), expected, atol=1e-6, rtol=1e-6)
    # The nested params dict by name too: the same call with its keys reversed gives the same loss.
    loss = tensors["loss"].clone()
    fields["params"] = dict(reversed(list(fields["params"].items())))
    C.policy_loss_fused_cpu(num_threads=1, **fields)
    assert torch.equal(tensors["loss"], loss)


@needs_ext
@pytest.mark.parametrize("change, error, match", [
    (lambda f: f.update(advantage=f.pop("advantages")), ValueError, "unknown argument 'advantage'"),
    (lambda f: f.pop("weight"), ValueError, "missing argument 'weight'"),
    (lambda f: f["params"].update(clip_hgh=f["params"].pop("clip_high")), ValueError,
     r"params: unknown argument 'clip_hgh'"),
    (lambda f: f["params"].pop("kl_coef"), ValueError, r"params: missing argument 'kl_coef'"),
    (lambda f: f["params"].update(policy=len(_schema.POLICY_KIND)), ValueError, "is not a PolicyKind"),
    (lambda f: f.update(dtype=7), ValueError, "is not a DType"),
    (lambda f: f.update(layout=(1, 1, 0)), ValueError, "layout must be the tuple"),
    (lambda f: f.update(layout=(3, 0, 0, 11)), ValueError, "invalid layout"),
    (lambda f: f.update(vocab="11"), TypeError, "vocab must be an int"),
    (lambda f: f.update(params=list(f["params"].values())), TypeError, "params must be a dict"),
])
def test_binding_rejects_misspelled_missing_or_invalid_fields(change, error, match):
    fields, _, tensors = _fused_call()
    change(fields)
    before = tensors["grad_logits"].clone()
    with pytest.raises(error, match=match):
        C.policy_loss_fused_cpu(num_threads=1, **fields)
    assert torch.equal(tensors["grad_logits"], before)  # nothing ran


@needs_ext
def test_binding_rejects_positional_arguments_and_a_missing_launch_argument():
    fields, _, _ = _fused_call()
    with pytest.raises(ValueError, match="keyword arguments only"):
        C.policy_loss_fused_cpu(*fields.values(), 1)
    with pytest.raises(ValueError, match="missing argument 'num_threads'"):
        C.policy_loss_fused_cpu(**fields)


def test_python_launcher_arguments_follow_the_schema():
    fields, _, _ = _fused_call() if C is not None else (None, None, None)
    spec = _schema.KERNELS["policy_loss_fused"]
    assert spec.launch_params == tuple(n for n in spec.args.names if n != "dtype")
    with pytest.raises(TypeError, match="unexpected argument 'clip_high'"):
        _launch.kernel_fields("policy_loss_fused", clip_high=0.2)
    required = [f for f in spec.args.fields if f.derived is None and not f.optional]
    with pytest.raises(TypeError, match="missing arguments: grad_layout$"):
        _launch.kernel_fields("policy_loss_fused", *range(len(required) - 1))

    if fields is not None:
        assert tuple(fields) == spec.args.names
        assert tuple(fields["params"]) == _schema.TOKEN_LOSS_PARAMS.names


def test_triton_launchers_take_the_schema_parameters():
    pytest.importorskip("triton")
    for kernel in _schema.KERNELS.values():
        fn = getattr(importlib.import_module(f"rlfuse.triton_kernels.{kernel.module}"), kernel.name)
        positional = tuple(name for name, p in inspect.signature(fn).parameters.items()
                           if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
        assert positional == kernel.launch_params, kernel.name
        optional = {f.param for f in kernel.args.fields if f.optional}
        defaults = {name: p.default for name, p in inspect.signature(fn).parameters.items() if name in optional}
        assert defaults == dict.fromkeys(optional), kernel.name  # optional pointers default to None


def test_triton_policy_loss_takes_enums_and_floats_from_the_schema():
    pytest.importorskip("triton")
    tk = importlib.import_module("rlfuse.triton_kernels.policy_loss")
    for constants, enum in ((tk.POLICY_KIND, _schema.POLICY_KIND), (tk.KL_KIND, _schema.KL_KIND),
                            (tk.CISPO_MODE, _schema.CISPO_MODE)):
        assert tuple(constants.value) == tuple(range(len(enum)))
        assert [n.replace("_plus", "+") for n in constants.value._fields] == list(enum.names)
    assert tk.TokenLossFloats._fields == tuple(f.name for f in _schema.TOKEN_LOSS_PARAMS.fields if f.ctype == "float")
    params = TokenLossParams.from_config(rlfuse.LossConfig.cispo(cispo_mode="cap", clip_high=2.0))
    assert tk.kernel_constexprs(params) == (_schema.POLICY_KIND["cispo"], 0, _schema.CISPO_MODE["cap"])
    with pytest.raises(ValueError, match="params.kl must be in"):
        tk.kernel_constexprs(params._replace(kl=len(_schema.KL_KIND)))
    # Every policy kind of the schema is compiled ahead of time.
    compiled = {entry.constexprs["POLICY"] for entry in tk.AOT_KERNELS if "POLICY" in entry.constexprs}
    assert compiled == set(range(len(_schema.POLICY_KIND)))
