"""Bad input to every public function, on both backends and at world sizes 1 and 2: each case
raises one specific exception type whose message names the function and the value, identically
on every rank; none hangs, kills a process or returns wrong data. Inputs that look bad but are
valid (empty sequences, sequences shorter than N, dtypes gloo cannot sum) must work and be
bitwise right.

torch: world size 1 in this process (no process group), 2 on the session's gloo pool. JAX: world
size 1 outside ``shard_map``, 2 traced inside it (where the errors raise at trace time).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import sp_common as sp
from sp_common.testing import data as ref
from sp_common.testing.mesh import mesh_of, sharded, spec_on

from . import bad_input_tasks as tasks
from .bad_input_tasks import Foreign, Module
from .bad_input_tasks import Tensor as T

pytestmark = pytest.mark.timeout(120)


@dataclasses.dataclass(frozen=True)
class Case:
    """``CALLS[call](*args, **kwargs)`` must raise ``error`` with a message containing one of
    ``names`` (the function) and every string of ``says`` (the value, the limits)."""

    label: str
    call: str
    args: tuple[Any, ...]
    error: type[Exception]
    says: tuple[str, ...]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    names: tuple[str, ...] = ()
    worlds: tuple[int, ...] = (1, 2)
    backends: tuple[str, ...] = ("torch", "jax")

    def function_names(self) -> tuple[str, ...]:
        return self.names or (self.call.split(" ")[0],)


TENSOR_FUNCTIONS: list[tuple[str, tuple[Any, ...], tuple[str, ...]]] = [
    # call, arguments after the tensor, names the message may use
    ("sp_shard", (0,), ()),
    ("sp_gather", (0,), ()),
    ("sp_shard_with_padding", (0,), ()),
    ("sp_unpad", (0, 0), ()),
    ("sp_all_to_all", (0, 0), ()),
    ("sp_reduce_scatter", (0,), ()),
    ("ShardingValidator.shard", ("h", 0), ("ShardingValidator.shard", "sp_shard")),
    ("ShardingValidator.gather", ("h", 0), ("ShardingValidator.gather", "sp_gather")),
]
X = T((2, 4))  # a float32 tensor every rank can shard on dim 1 at world sizes 1 and 2
Q = T((1, 4, 2, 3))  # Ulysses [B, s, H, D]
ATTENTION = ("sp_attention", "sp_ulysses_attention")


def wrong_type_cases() -> list[Case]:
    wrong = [([1.0, 2.0], "builtins.list"), (np.ones(4), "numpy.ndarray"), (3.0, "builtins.float")]
    cases = []
    for value, shown in wrong:
        label = shown.split(".")[1]
        calls = [(c, (value, *rest), names) for c, rest, names in TENSOR_FUNCTIONS]
        calls += [
            ("sp_padding_mask", (value, 4), ()),
            ("sp_world_size", (value,), ()),
            ("sp_rank", (value,), ()),
            ("sp_ulysses_attention", (value, Q, Q), ()),
            ("sp_attention", (value, Q, Q), ()),
        ]
        for call, args, names in calls:
            says = ("must be a torch.Tensor or jax.Array", shown)
            cases.append(Case(f"{label} tensor", call, args, TypeError, says, names=names))
        for slot in ("k", "v"):
            args = (Q, value, Q) if slot == "k" else (Q, Q, value)
            says = (shown,)
            for call in ATTENTION:
                cases.append(Case(f"{label} {slot}", call, args, TypeError, says))
    return cases


def zero_d_and_dim_cases() -> list[Case]:
    cases = []
    for call, rest, names in TENSOR_FUNCTIONS:
        args = (T(()), *rest)
        cases.append(Case("0-d tensor", call, args, ValueError, ("tensor is 0-d",), names=names))
        dim_at = 2 if call.startswith("ShardingValidator") else 1
        for bad_dim in (2, -3):
            args = list((X, *rest))
            args[dim_at] = bad_dim
            says = (f"dim={bad_dim} is out of range", "(2, 4)")
            cases.append(Case(f"dim {bad_dim}", call, tuple(args), ValueError, says, names=names))
        for bad_dim, shown in ((1.0, "got 1.0"), ("1", "got '1'"), (True, "got True")):
            args = list((X, *rest))
            args[dim_at] = bad_dim
            says = ("dim must be an int", shown)
            label = f"dim {type(bad_dim).__name__}"
            cases.append(Case(label, call, tuple(args), TypeError, says, names=names))
    cases += [
        *(
            Case("0-d q", call, (T(()), Q, Q), ValueError, ("q must be [B, s, Hq, D]", "got q ()"))
            for call in ATTENTION
        ),
        Case("gather_dim 2", "sp_all_to_all", (X, 0, 2), ValueError, ("dim=2 is out of range",)),
        Case("gather_dim None", "sp_all_to_all", (X, 0, None), TypeError, ("got None",)),
        Case(
            "validator names itself",
            "ShardingValidator.shard",
            (X, "h", 2),
            ValueError,
            ("dim=2",),
            names=("ShardingValidator.shard",),
        ),
        Case(
            "validator names itself",
            "ShardingValidator.gather",
            (X, "h", 1.5),
            TypeError,
            ("dim must be an int",),
            names=("ShardingValidator.gather",),
        ),
        Case(
            "validate_divisible 'no'",
            "ShardingValidator.shard",
            (X, "h", 1),
            TypeError,
            ("validate_divisible must be a bool", "'no'"),
            {"validate_divisible": "no"},
        ),
        Case(
            "grad_rule 'sum'",
            "sp_shard",
            (X, 1),
            ValueError,
            ("grad_rule='sum'",),
            {"grad_rule": "sum"},
        ),
        Case(
            "grad_rule 'slice'",
            "sp_shard_with_padding",
            (X, 1),
            ValueError,
            ("grad_rule='slice'", "'gather', 'local'"),
            {"grad_rule": "slice"},
        ),
        Case("not a module", "all_reduce_grads", (X,), TypeError, ("torch.nn.Module",)),
        Case(
            "no planned forward pass",
            "planned_seq_len",
            (),
            sp.PlanError,
            ("no SP plan forward pass is running", "'sequence'"),
        ),
        Case("name 3", "planned_seq_len", (), TypeError, ("name must be a str", "3"), {"name": 3}),
        Case("enabled 'on'", "sp_strict", ("on",), TypeError, ("'on'",)),
        Case(
            "gather 'no'",
            "ShardInput",
            ("x", 1),
            TypeError,
            ("gather must be bool", "'no'"),
            {"gather": "no"},
        ),
    ]
    return cases


def divisibility_cases() -> list[Case]:
    """World size 2: sizes 2 does not divide."""
    odd = T((2, 5))
    says = ("size 5 of dim 1", "world size 2")
    cases = [
        Case("S=5", "sp_shard", (odd, 1), ValueError, (*says, "sp_shard_with_padding")),
        Case("S=5 scatter dim", "sp_all_to_all", (odd, 1, 0), ValueError, says),
        Case("S=5", "sp_reduce_scatter", (odd, 1), ValueError, says),
        Case(
            "S=5",
            "ShardingValidator.shard (in track)",
            (odd, "h", 1),
            ValueError,
            says,
            names=("ShardingValidator.shard", "sp_shard"),
        ),
        Case(
            "S=5 padded outside track",
            "ShardingValidator.shard",
            (odd, "h", 1),
            ValueError,
            ("'h' needed 1 elements of padding", "track()"),
            kwargs={"validate_divisible": False},
        ),
    ]
    return [dataclasses.replace(c, worlds=(2,)) for c in cases]


def argument_cases() -> list[Case]:
    pad = "sp_shard_with_padding"
    cases = [
        # pad_size on gathers and sp_unpad
        Case(
            "pad_size -1",
            "sp_gather",
            (X, 1),
            ValueError,
            ("pad_size=-1 is outside",),
            {"pad_size": -1},
        ),
        Case(
            "pad_size 99",
            "sp_gather",
            (X, 1),
            ValueError,
            ("pad_size=99 is outside",),
            {"pad_size": 99},
        ),
        Case(
            "pad_size 1.0",
            "sp_gather",
            (X, 1),
            TypeError,
            ("pad_size must be an int", "1.0"),
            {"pad_size": 1.0},
        ),
        Case(
            "pad_size True",
            "sp_gather",
            (X, 1),
            TypeError,
            ("pad_size must be an int", "True"),
            {"pad_size": True},
        ),
        Case(
            "grad_rule", "sp_gather", (X, 1), ValueError, ("grad_rule='sum'",), {"grad_rule": "sum"}
        ),
        Case("pad_size -1", "sp_unpad", (X, 1, -1), ValueError, ("pad_size=-1 is outside [0, 4]",)),
        Case("pad_size 5", "sp_unpad", (X, 1, 5), ValueError, ("pad_size=5 is outside [0, 4]",)),
        Case(
            "pad_size 1.0", "sp_unpad", (X, 1, 1.0), TypeError, ("pad_size must be an int", "1.0")
        ),
        # pad values the dtype cannot hold
        Case("int 1.5", pad, (T((5,), "int32"), 0, 1.5), ValueError, ("pad_value=1.5", "int32")),
        Case(
            "int nan", pad, (T((5,), "int32"), 0, math.nan), ValueError, ("pad_value=nan", "int32")
        ),
        Case(
            "int inf", pad, (T((5,), "int32"), 0, math.inf), ValueError, ("pad_value=inf", "int32")
        ),
        Case(
            "int 2**31",
            pad,
            (T((5,), "int32"), 0, 2**31),
            ValueError,
            ("pad_value=2147483648", "int32"),
        ),
        Case("uint8 300", pad, (T((5,), "uint8"), 0, 300), ValueError, ("pad_value=300", "uint8")),
        Case("uint8 -1", pad, (T((5,), "uint8"), 0, -1), ValueError, ("pad_value=-1", "uint8")),
        Case("bool 2", pad, (T((5,), "bool"), 0, 2), ValueError, ("pad_value=2", "bool")),
        Case(
            "float16 1e5",
            pad,
            (T((5,), "float16"), 0, 1e5),
            ValueError,
            ("pad_value=100000.0", "overflow"),
        ),
        Case("real 1j", pad, (T((5,)), 0, 1j), ValueError, ("pad_value=1j", "float32")),
        Case(
            "str", pad, (T((5,)), 0, "0"), TypeError, ("pad_value must be a Python number", "'0'")
        ),
        Case(
            "list",
            pad,
            (T((5,)), 0, [0.0]),
            TypeError,
            ("pad_value must be a Python number", "[0.0]"),
        ),
        Case(
            "float8 inf",
            pad,
            (T((5,), "float8_e4m3fn"), 0, math.inf),
            ValueError,
            ("pad_value=inf", "float8_e4m3fn", "no infinity", "448.0"),
        ),
        Case(
            "float8 -inf",
            pad,
            (T((5,), "float8_e4m3fnuz"), 0, -math.inf),
            ValueError,
            ("pad_value=-inf", "float8_e4m3fnuz", "no infinity", "[-240.0, 240.0]"),
        ),
        Case(
            "float8 1e3",
            pad,
            (T((5,), "float8_e4m3fn"), 0, 1e3),
            ValueError,
            ("pad_value=1000.0", "float8_e4m3fn", "overflow", "[-448.0, 448.0]"),
        ),
        # float8_e8m0fnu holds 2**-127 .. 2**127 and NaN: no zero (the default), no negatives
        Case(
            "e8m0 default 0.0",
            pad,
            (T((5,), "float8_e8m0fnu"), 0),
            ValueError,
            ("pad_value=0.0", "float8_e8m0fnu", "no zero", "1.7014118346046923e+38"),
        ),
        Case(
            "e8m0 -1",
            pad,
            (T((5,), "float8_e8m0fnu"), 0, -1.0),
            ValueError,
            ("pad_value=-1.0", "float8_e8m0fnu", "no negative values"),
        ),
        Case(
            "e8m0 1e-40",
            pad,
            (T((5,), "float8_e8m0fnu"), 0, 1e-40),
            ValueError,
            ("pad_value=1e-40", "float8_e8m0fnu", "5.877471754111438e-39"),
        ),
        Case(
            "e8m0 inf",
            pad,
            (T((5,), "float8_e8m0fnu"), 0, math.inf),
            ValueError,
            ("pad_value=inf", "float8_e8m0fnu", "no infinity"),
        ),
        Case(
            "float4 nan",
            pad,
            (T((5,), "float4_e2m1fn"), 0, math.nan),
            ValueError,
            ("pad_value=nan", "float4_e2m1fn", "no NaN", "[-6.0, 6.0]"),
            backends=("jax",),  # torch only has the packed float4_e2m1fn_x2
        ),
        Case(
            "complex32 1e5",
            pad,
            (T((5,), "complex32"), 0, 1e5),
            ValueError,
            ("pad_value=100000.0", "complex32", "overflow", "65504.0"),
            backends=("torch",),  # JAX has no complex32
        ),
        Case(
            "float32 2**1024",
            pad,
            (T((5,)), 0, 2**1024),
            ValueError,
            (f"pad_value={2**1024}", "float32", "overflow"),
        ),
        Case("int32 2**1024", pad, (T((5,), "int32"), 0, 2**1024), ValueError, ("int32", "[-2147")),
        # dtypes
        Case("bool", "sp_reduce_scatter", (T((4,), "bool"), 0), TypeError, ("dtype bool",)),
        # groups
        Case("group 42", "sp_shard", (X, 1), TypeError, ("group must be", "got 42"), {"group": 42}),
        Case(
            "group list",
            "sp_gather",
            (X, 1),
            TypeError,
            ("group must be", "['sp']"),
            {"group": ["sp"]},
        ),
        Case(
            "None", "sp_group (then sp_world_size inside)", (None, X), TypeError, ("group is None",)
        ),
        Case(
            "42",
            "sp_group (then sp_world_size inside)",
            (42, X),
            TypeError,
            ("42",),
        ),
        Case(
            "list of axes",
            "sp_group (then sp_world_size inside)",
            (["sp"], X),
            TypeError,
            ("['sp']",),
        ),
        # queries, masks, flags and the validator's own calls
        Case("framework 'tf'", "sp_world_size", ("tf",), ValueError, ("unknown framework 'tf'",)),
        Case("framework 'tf'", "sp_rank", ("tf",), ValueError, ("unknown framework 'tf'",)),
        Case("seq_len 0", "sp_padding_mask", (X, 0), ValueError, ("seq_len=0 must be at least 1",)),
        Case("seq_len -3", "sp_padding_mask", (X, -3), ValueError, ("seq_len=-3",)),
        Case(
            "seq_len 2.0", "sp_padding_mask", (X, 2.0), TypeError, ("seq_len must be an int", "2.0")
        ),
        Case(
            "seq_len True",
            "sp_padding_mask",
            (X, True),
            TypeError,
            ("seq_len must be an int", "True"),
        ),
        Case("enabled 'off'", "sp_debug", ("off",), TypeError, ("'off'",)),
        Case(
            "validate 'no'",
            "sp_shard",
            (X, 1),
            TypeError,
            ("validate must be a bool", "'no'"),
            {"validate": "no"},
        ),
        Case(
            "validate 'no'",
            "sp_gather",
            (X, 1),
            TypeError,
            ("validate must be a bool", "'no'"),
            {"validate": "no"},
        ),
        Case("validate 0", "sp_gather", (X, 1, 0), TypeError, ("validate must be a bool", "got 0")),
        Case(
            "local 'yes'",
            "sp_padding_mask",
            (X, 4),
            TypeError,
            ("local must be a bool", "'yes'"),
            {"local": "yes"},
        ),
        Case(
            "an argument",
            "get_sharding_validator",
            (1,),
            TypeError,
            ("takes 0 positional arguments",),
        ),
        Case("an argument", "ShardingValidator", (1,), TypeError, ("positional argument",)),
        Case(
            "gathered on another dim",
            "ShardingValidator.gather (in track, after shard)",
            (T((4, 4)), "h", 0, 1),
            ValueError,
            ("'h' was sharded on dim 0", "gathered on dim 1"),
        ),
    ]
    # attention shapes, lengths, dtypes, masks and options (both entry points)
    attention_checked = [
        ("3-d k", (Q, T((1, 4, 2)), Q), {}, ValueError, "k [B, s, Hkv, D]"),
        ("other s", (Q, T((1, 2, 2, 3)), Q), {}, ValueError, "(1, 2, 2, 3)"),
        ("seq_len 0", (Q, Q, Q), {"seq_len": 0}, ValueError, "seq_len=0"),
        ("seq_len 99", (Q, Q, Q), {"seq_len": 99}, ValueError, "seq_len=99"),
        ("seq_len 2.0", (Q, Q, Q), {"seq_len": 2.0}, TypeError, "seq_len must be an int"),
        ("int32", (T((1, 4, 2, 3), "int32"),) * 3, {}, TypeError, "int32"),
        ("bool", (T((1, 4, 2, 3), "bool"),) * 3, {}, TypeError, "bool"),
        ("complex64", (T((1, 4, 2, 3), "complex64"),) * 3, {}, TypeError, "complex64"),
        ("float16 k", (Q, T((1, 4, 2, 3), "float16"), Q), {}, TypeError, "float16"),
        ("head size 5 k", (Q, T((1, 4, 2, 5)), Q), {}, ValueError, "(1, 4, 2, 5)"),
        ("3 q heads, 2 kv", (T((1, 4, 3, 3)), Q, Q), {}, ValueError, "grouped-query"),
        ("scale 'x'", (Q, Q, Q), {"scale": "x"}, TypeError, "scale='x'"),
        ("scale inf", (Q, Q, Q), {"scale": math.inf}, ValueError, "scale=inf is not finite"),
        ("causal 1", (Q, Q, Q), {"causal": 1}, TypeError, "causal must be a bool, got 1"),
        ("float key_mask", (Q, Q, Q), {"key_mask": X}, TypeError, "key_mask must be bool"),
        ("key_mask [1, 3]", (Q, Q, Q), {"key_mask": T((1, 3), "bool")}, ValueError, "(1, 3)"),
        ("key_mask [4, 1]", (Q, Q, Q), {"key_mask": T((4, 1), "bool")}, ValueError, "[s] = (4,)"),
        ("numpy key_mask", (Q, Q, Q), {"key_mask": np.ones(4, bool)}, TypeError, "ndarray"),
    ]
    for label, args, kwargs, error, value in attention_checked:
        for call in ATTENTION:
            cases.append(Case(label, call, args, error, (value,), kwargs))
    for call in ("sp_shard", "sp_gather", pad):
        for layout in ("ring", None, "Zigzag"):
            says = (f"layout={layout!r} is not one of", "'zigzag'")
            args = (X, 1)
            kwargs = {"layout": layout}
            cases.append(Case(f"layout {layout!r}", call, args, ValueError, says, kwargs))
    cases.append(
        dataclasses.replace(
            Case(
                "zigzag S=6 on 2 ranks",
                "sp_shard",
                (T((2, 6)), 1),
                ValueError,
                ("not divisible by 2 x the sequence-parallel world size 2 = 4", "pad it by 2"),
                {"layout": "zigzag"},
            ),
            worlds=(2,),
        )
    )
    for strategy, error in (
        ("Ring", ValueError),
        ("USP", ValueError),
        (None, ValueError),
        (1, ValueError),
    ):
        says = (f"strategy={strategy!r}", "'ulysses'")
        cases.append(
            Case(
                f"strategy {strategy!r}",
                "sp_attention",
                (Q, Q, Q),
                error,
                says,
                {"strategy": strategy},
            )
        )
    cases.append(
        dataclasses.replace(
            Case(
                "usp over a group of one axis",
                "sp_attention",
                (Q, Q, Q),
                ValueError,
                ("strategy='usp' needs a group of two",),
                {"strategy": "usp"},
            ),
            worlds=(2,),
            # torch: the default group of this 2-rank pool is what earlier tests' 2 x 1 meshes
            # flattened to (it then carries their axes); tests/test_ring.py checks a subgroup.
            backends=("jax",),
        )
    )
    return cases


def dtype_cases() -> list[Case]:
    """gloo cannot sum these: a TypeError before the collective (JAX sums them, tested below)."""
    return [
        Case(
            dtype,
            "sp_reduce_scatter",
            (T((4,), dtype), 0),
            TypeError,
            ("gloo", dtype, "torch.float32"),
            worlds=(2,),
            backends=("torch",),
        )
        for dtype in ("float8_e4m3fn", "float8_e5m2", "int16", "uint16", "uint32")
    ]


def interop_cases() -> list[Case]:
    one = {"worlds": (1,)}
    return [
        Case("list", "torch_to_jax", ([1.0],), TypeError, ("builtins.list",), **one),
        Case("numpy", "torch_to_jax", (np.ones(3),), TypeError, ("numpy.ndarray",), **one),
        Case(
            "jax array", "torch_to_jax", (X,), TypeError, ("ArrayImpl",), backends=("jax",), **one
        ),
        Case(
            "int64 without x64",
            "torch_to_jax",
            (T((3,), "int64"),),
            TypeError,
            ("torch.int64", "jax_enable_x64", "torch.int32"),
            backends=("torch",),
            **one,
        ),
        Case(
            "float64 without x64",
            "torch_to_jax",
            (T((3,), "float64"),),
            TypeError,
            ("torch.float64", "jax_enable_x64"),
            backends=("torch",),
            **one,
        ),
        Case("list", "jax_to_torch", ([1.0],), TypeError, ("builtins.list",), **one),
        Case("numpy", "jax_to_torch", (np.ones(3),), TypeError, ("numpy.ndarray",), **one),
        Case(
            "torch tensor", "jax_to_torch", (X,), TypeError, ("Tensor",), backends=("torch",), **one
        ),
        Case(
            "tracer",
            "jax_to_torch",
            (X,),
            TypeError,
            ("traced",),
            backends=("jax",),
            worlds=(2,),
        ),
        Case(
            "foreign k",
            "sp_ulysses_attention",
            (Q, Foreign(Q), Q),
            TypeError,
            ("sp_ulysses_attention",),
            **one,
        ),
        Case("foreign k", "sp_attention", (Q, Foreign(Q), Q), TypeError, ("sp_attention",), **one),
    ]


def plan_cases() -> list[Case]:
    plan = sp.SPPlan({"embed": sp.ShardInput("x", 1), "head": sp.GatherOutput(1)})
    return [
        Case("entries 42", "SPPlan", (42,), TypeError, ("42",)),
        Case("entry 3", "SPPlan", ({"x": 3},), TypeError, ("holds 3",)),
        Case("entry str", "SPPlan", ({"x": "nope"},), TypeError, ("'nope'",)),
        Case(
            "entry list with 3",
            "SPPlan",
            ({"x": [sp.ShardInput("x", 1), 3]},),
            TypeError,
            ("entry 'x' holds 3",),
        ),
        Case(
            "unpaired name",
            "SPPlan",
            ({"x": sp.ShardInput("x", 1)},),
            sp.PlanError,
            ("sharded but never gathered: ['sequence']",),
        ),
        Case("dim '1'", "ShardInput", ("x", "1"), TypeError, ("'1'",)),
        Case("dim 1.0", "GatherOutput", (1.0,), TypeError, ("1.0",)),
        Case(
            "pad_value 'a'",
            "ShardInput",
            ("x", 1),
            TypeError,
            ("pad_value must be a number", "'a'"),
            {"pad_value": "a"},
        ),
        Case(
            "dim numpy bool",
            "ShardInput",
            ("x", np.bool_(True)),
            TypeError,
            ("dim must be int", "True"),
        ),
        Case(
            "index 0.0",
            "GatherOutput",
            (1,),
            TypeError,
            ("index must be int or None", "0.0"),
            {"index": 0.0},
        ),
        Case(
            "dict output",
            "apply_plan (then a forward pass)",
            (X, "dict", None),
            sp.PlanError,
            (
                "dict with keys ['sample', 'aux']",
                "output['sample']",
                "GatherOutput(dim, index=...)",
            ),
            names=("head output:",),
            backends=("torch",),
        ),
        Case(
            "dict output, index 0",
            "apply_plan (then a forward pass)",
            (X, "dict", 0),
            sp.PlanError,
            ("dict with keys ['sample', 'aux']", "not a dict entry"),
            names=("head output[0]:",),
            backends=("torch",),
        ),
        Case(
            "tuple output, no index",
            "apply_plan (then a forward pass)",
            (X, "tuple", None),
            sp.PlanError,
            ("tuple of length 2", "GatherOutput(dim, index=...) (0 to 1)"),
            names=("head output:",),
            backends=("torch",),
        ),
        Case("target 42", "apply_plan", (42, plan), TypeError, ("target is int",)),
        Case(
            "module with mesh",
            "apply_plan",
            (Module(), plan),
            TypeError,
            ("takes no mesh",),
            {"mesh": "m"},
            backends=("torch",),
        ),
        Case(
            "plan dict",
            "apply_plan",
            (Module(), {"x": 1}),
            TypeError,
            ("dict",),
            backends=("torch",),
        ),
    ]


CASES = (
    plan_cases()
    + wrong_type_cases()
    + zero_d_and_dim_cases()
    + divisibility_cases()
    + argument_cases()
    + dtype_cases()
    + interop_cases()
)


def params() -> list[Any]:
    out = []
    for case in CASES:
        for backend in case.backends:
            for n in case.worlds:
                label = f"{backend}-n{n}-{case.call.split(' ')[0]}-{case.label}"
                out.append(pytest.param(case, backend, n, id=label))
    return out


def jax_outcome(case: Case, n: int) -> tuple[str, str]:
    """Run ``case`` with JAX arrays: eagerly at world size 1, traced inside ``shard_map`` over
    an n-device mesh otherwise (the arrays enter as replicated inputs)."""
    args = [tasks.materialize(a, "jax") for a in case.args]
    kwargs = {k: tasks.materialize(v, "jax") for k, v in case.kwargs.items()}
    call = tasks.CALLS[case.call]
    if n == 1:
        return tasks.outcome(lambda: call(*args, **kwargs))
    slots = [i for i, a in enumerate(args) if isinstance(a, jax.Array)]

    def body(*arrays: jax.Array) -> jax.Array:
        full = list(args)
        for i, a in zip(slots, arrays, strict=True):
            full[i] = a
        call(*full, **kwargs)
        return jnp.zeros(())

    mapped = sharded(body, n, tuple(jax.P() for _ in slots), jax.P())
    with jax.set_mesh(mesh_of(n)):
        return tasks.outcome(lambda: mapped(*(args[i] for i in slots)))


@pytest.mark.filterwarnings("ignore:Casting from complex to real")
@pytest.mark.parametrize(("case", "backend", "n"), params())
def test_bad_input_raises_a_specific_error_naming_the_function_and_the_value(
    case: Case, backend: str, n: int, torch_ranks
) -> None:
    if backend == "jax":
        outcomes = [jax_outcome(case, n)]
    elif n == 1:
        outcomes = [tasks.run_case(case.call, case.args, case.kwargs)]
    else:
        outcomes = torch_ranks(n).run(
            tasks.run_case, case.call, case.args, case.kwargs, timeout_s=30
        )
    assert len(set(outcomes)) == 1, f"ranks disagree: {outcomes}"
    kind, message = outcomes[0]
    assert kind == case.error.__name__, f"expected {case.error.__name__}, got {kind}: {message}"
    assert any(name in message for name in case.function_names()), message
    for part in case.says:
        assert part in message, f"{part!r} not in {message!r}"


def test_the_table_covers_every_public_function_and_every_call() -> None:
    covered = {tasks.public_name(case.call) for case in CASES}
    covered |= {case.error.__name__ for case in CASES}  # exception classes such as PlanError
    missing = set(sp.__all__) - covered
    assert not missing, f"no bad-input case for {sorted(missing)}: add rows to CASES"
    assert {"torch_to_jax", "jax_to_torch"} <= covered
    assert set(tasks.CALLS) == {case.call for case in CASES}


def test_every_bad_input_kind_is_in_the_table() -> None:
    labels = " ".join(case.label for case in CASES)
    for kind in ("list", "ndarray", "float tensor", "0-d", "dim 2", "S=5", "uint8 300", "nan"):
        assert kind in labels, kind
    assert {"bool", "complex64", "float8_e4m3fn"} <= {
        a.dtype for case in CASES for a in case.args if isinstance(a, T)
    }


# Inputs that look bad but are valid: they must work, bitwise.


def test_plan_specs_take_numpy_integers_as_sp_shard_does_and_store_them_as_int() -> None:
    shard = sp.ShardInput(np.int64(0), dim=np.int64(1), ndim=np.int32(3), pad_value=np.float32(1))
    gather = sp.GatherOutput(dim=np.int64(1), index=np.int64(0), ndim=np.int16(3))
    for spec, fields in ((shard, ("arg", "dim", "ndim")), (gather, ("dim", "index", "ndim"))):
        for field in fields:
            assert type(getattr(spec, field)) is int, (spec, field)
    assert shard == sp.ShardInput(0, dim=1, ndim=3, pad_value=1.0)
    assert gather == sp.GatherOutput(1, index=0, ndim=3)
    assert sp.ShardInput("mask", 1, pad_value=True).pad_value is True  # pads a bool tensor


def test_sequences_shorter_than_the_world_size_round_trip_with_ranks_that_hold_only_padding(
    torch_ranks,
) -> None:
    x = ref.make_data((2, 1), "float32", seed=1)  # S=1 < N=2: rank 1 holds only padding
    shards, pad = ref.padded_shards(x, 1, 2, -1.0)
    for rank, r in enumerate(torch_ranks(2).run(tasks.short_sequence, x, 1, -1.0)):
        ref.assert_bitwise(r["padded_shard"], shards[rank], f"torch rank {rank} shard")
        ref.assert_bitwise(r["gather_unpad"], x, f"torch rank {rank} gather")
        ref.assert_bitwise(r["unpad"], x, f"torch rank {rank} unpad")
        assert r["pad"] == pad == 1
        assert r["mask"].tolist() == [rank == 0]
    for length in (1, 3):  # JAX on 4 devices: 3 and 1 ranks of padding only
        x = ref.make_data((2, length), "float32", seed=length)

        def body(a: jax.Array) -> tuple[jax.Array, ...]:
            shard, pad = sp.sp_shard_with_padding(a, 1, -1.0)
            gathered = sp.sp_gather(shard, 1, pad_size=pad)
            return shard, gathered, sp.sp_padding_mask(a, length)  # noqa: B023

        fn = sharded(body, 4, (jax.P(),), (spec_on(1), jax.P(), spec_on(0)))
        with jax.set_mesh(mesh_of(4)):
            shard, gathered, mask = fn(x)
        shards, pad = ref.padded_shards(x, 1, 4, -1.0)
        ref.assert_bitwise(np.asarray(shard), np.concatenate(shards, axis=1), "jax shards")
        ref.assert_bitwise(np.asarray(gathered), x, "jax gather")
        assert np.asarray(mask).tolist() == [i < length for i in range(4)]


def test_empty_sequences_shard_gather_pad_and_exchange_to_empty_tensors(torch_ranks) -> None:
    x = np.zeros((2, 0, 3), np.float32)
    expected = {"all_to_all": (4, 0, 3)}
    for r in torch_ranks(2).run(tasks.empty_sequence, x, 1):
        for key, got in r.items():
            assert got.shape == expected.get(key, (2, 0, 3)) and got.dtype == np.float32, key

    def body(a: jax.Array) -> dict[str, jax.Array]:
        padded, pad = sp.sp_shard_with_padding(a, 1)
        return {
            "shard": sp.sp_shard(a, 1),
            "gather": sp.sp_gather(a, 1),
            "padded_shard": padded,
            "gather_unpad": sp.sp_gather(padded, 1, pad_size=pad),
            "all_to_all": sp.sp_all_to_all(a, 1, 0),
            "reduce_scatter": sp.sp_reduce_scatter(a, 1),
        }

    # Every output is empty, so any spec gives the same (empty) global array.
    out = sharded(body, 2, (jax.P(),), jax.P(), check_vma=False)(x)
    for key, got in out.items():
        assert got.shape == expected.get(key, (2, 0, 3)) and got.dtype == jnp.float32, key


# Dtypes gloo cannot sum (and bool/complex) still move: the carrier is a numpy dtype of the same
# item size, so a float8 tensor travels as its uint8 bits.
MOVABLE = {
    "float8_e4m3fn": np.uint8,
    "float8_e5m2": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "complex64": np.complex64,
    "bool": np.bool_,
}


def carrier_input(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    carrier = np.dtype(MOVABLE[dtype])
    if carrier == np.bool_:
        return rng.random(shape) < 0.5
    raw = rng.integers(0, 256, size=(*shape, carrier.itemsize), dtype=np.uint8)
    return raw.view(carrier).reshape(shape)  # every bit pattern, NaNs included


@pytest.mark.parametrize("dtype", list(MOVABLE))
def test_dtypes_gloo_cannot_sum_move_bitwise_on_both_backends(dtype, torch_ranks) -> None:
    a = carrier_input(dtype, (4, 5), seed=len(dtype))
    pad = ref.pad_size(a.shape[1], 2)
    for rank, r in enumerate(torch_ranks(2).run(tasks.move_bits, a, dtype, 0)):
        ref.assert_bitwise(r["shard"], np.split(a, 2)[rank], f"torch rank {rank} shard")
        ref.assert_bitwise(r["gather"], a, f"torch rank {rank} gather")
        mine = np.split(a, 2)[rank]  # every rank sends chunk `rank` of the same tensor
        ref.assert_bitwise(r["all_to_all"], np.concatenate([mine] * 2), f"torch rank {rank} a2a")
        ref.assert_bitwise(r["gather_unpad"], a, f"torch rank {rank} padded gather")
    for rank, r in enumerate(torch_ranks(2).run(tasks.move_bits, a, dtype, 1)):
        zero = np.zeros((4, 1), a.dtype)  # pad_value 0.0 is all-zero bits in each dtype
        padded = np.concatenate([a, zero], axis=1)
        ref.assert_bitwise(r["padded_shard"], np.split(padded, 2, axis=1)[rank], "padded shard")
        ref.assert_bitwise(r["gather_unpad"], a, f"torch rank {rank} padded gather")
        assert r["pad"] == pad == 1

    jdt = np.dtype(getattr(ml_dtypes, dtype)) if dtype.startswith("float8") else a.dtype
    x = a.view(jdt)

    def body(t: jax.Array) -> tuple[jax.Array, ...]:
        padded, pad = sp.sp_shard_with_padding(t, 1)
        return padded, sp.sp_gather(padded, 1, pad_size=pad), sp.sp_all_to_all(t, 0, 1)

    fn = sharded(body, 2, (jax.P(),), (spec_on(1), jax.P(), spec_on(0)))
    with jax.set_mesh(mesh_of(2)):
        padded, gathered, a2a = (np.asarray(o).view(a.dtype) for o in fn(x))
    ref.assert_bitwise(padded, np.concatenate([a, np.zeros((4, 1), a.dtype)], axis=1), "jax pad")
    ref.assert_bitwise(gathered, a, "jax padded gather")
    # a2a on every device of a replicated input: device r gets rows r*2:(r+1)*2 from each
    # device, laid along dim 1 -> stacked along dim 0 by out_specs
    expected = np.concatenate([np.concatenate([half] * 2, axis=1) for half in np.split(a, 2)])
    ref.assert_bitwise(a2a, expected, "jax all-to-all")


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "int16", "uint16", "complex64"])
def test_jax_sums_dtypes_gloo_cannot_and_complex_sums_on_both_backends(dtype, torch_ranks):
    rng = np.random.default_rng(7)
    small = rng.integers(0, 5, size=(2, 4, 6)).astype(np.float32)  # sums exact in float8
    jdt = getattr(jnp, dtype)
    stacked = jnp.asarray(small, dtype=jdt)

    def body(x: jax.Array) -> jax.Array:
        return sp.sp_reduce_scatter(x[0], 1)[None]

    with jax.set_mesh(mesh_of(2)):
        out = sharded(body, 2, (jax.P("sp"),), jax.P("sp"))(stacked)
    expected = np.stack(np.split(small.sum(axis=0), 2, axis=1))
    if dtype == "complex64":
        expected = expected.astype(np.complex64)
        got = torch_ranks(2).run(tasks.reduce_scatter_rank, small.astype(np.complex64), 1)
        np.testing.assert_array_equal(np.stack(got), expected)
    np.testing.assert_array_equal(np.asarray(out).astype(expected.dtype), expected)
