"""Every jit function of flashmoe_py.kernels reads only globals a GPU build accepts: modules, jit
functions, Triton's builtins, classes (aggregates among them) and `tl.constexpr` instances.

The interpreter runs jit functions as Python, so a kernel that reads a plain int from its module
passes every CPU test and then fails to build on a GPU ("Cannot access global variable ..."):
kernels/addresses.py's ALIGN did, on an H200 (bench/NOTES.md item 103). Read from the source,
without building anything. A name bound nowhere is ruff's undefined name (F821), which CI checks."""

import ast
import importlib
import inspect
import pkgutil
import textwrap
import types

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import flashmoe_py.kernels as kernels

JIT = (JITFunction, InterpretedFunction)  # triton.jit's result, built or (TRITON_INTERPRET=1) interpreted


def jit_functions() -> list[tuple[str, object]]:
    """(module.name, function) for each jit function (Gluon's too) defined in the kernels package."""
    found = []
    for info in pkgutil.walk_packages(kernels.__path__, kernels.__name__ + "."):
        module = importlib.import_module(info.name)
        found += [(f"{info.name}.{name}", obj) for name, obj in vars(module).items()
                  if isinstance(obj, JIT) and obj.fn.__module__ == info.name]
    return found


def names_read(fn) -> set[str]:
    """The names fn's body loads and never binds (arguments, assignments, loop variables)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(fn.fn))).body[0]
    bound = {a.arg for a in body.args.args + body.args.kwonlyargs}
    bound |= {n.id for n in ast.walk(body) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return {n.id for n in ast.walk(body) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


def builds_accept(value: object) -> bool:
    return (isinstance(value, (types.ModuleType, *JIT, tl.constexpr, type))
            or getattr(value, "__triton_builtin__", False))


def test_the_kernels_package_has_jit_functions_to_check():
    names = [name for name, _ in jit_functions()]
    assert len(names) > 50 and "flashmoe_py.kernels.addresses.rebase" in names, names


def test_every_global_a_kernel_reads_is_one_a_gpu_build_accepts():
    refused = [f"{name} reads {glob} ({type(fn.fn.__globals__[glob]).__name__})" for name, fn in jit_functions()
               for glob in names_read(fn) if glob in fn.fn.__globals__ and not builds_accept(fn.fn.__globals__[glob])]
    assert not refused, refused

