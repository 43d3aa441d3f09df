"""Spare Triton's CPU interpreter a redundant re-patch on every device-function call.

Triton's interpreter (``TRITON_INTERPRET=1``) swaps ``triton.language``'s builtins for NumPy versions when a kernel
launch starts, and again on *every* call of a ``@triton.jit`` helper from inside the kernel: each such call walks the
language modules with ``inspect.getmembers``, although the builtins it finds are already swapped. The bit-plane
kernels call their helpers in every loop step, so that walk was about 40% of the kernel tests' time.

:func:`install` makes the re-patch happen once per launch and per module of helpers (the first call from a module
patches as before; later calls from the same module within the same launch reuse it). What a kernel computes is
untouched: the same NumPy semantics run, only the repeated look-ups are skipped. Where Triton's interpreter no longer
has the two hooks this relies on, :func:`install` leaves it alone (the tests then only run slower).
"""

from __future__ import annotations

import functools


def install() -> bool:
    """Patch the interpreter once per process; ``True`` when the hooks were found and patched."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    executor = getattr(interpreter, "GridExecutor", None)
    patch_lang = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if executor is None or patch_lang is None or scope_type is None:
        return False
    if getattr(patch_lang, "_once_per_launch", False):
        return True
    launches: list[set[int]] = []  # per running launch: the helper modules (their globals) already patched

    @functools.wraps(patch_lang)
    def patch_once(fn):
        key = id(fn.__globals__)
        if launches and key in launches[-1]:
            return scope_type()
        scope = patch_lang(fn)
        if launches:
            launches[-1].add(key)
        return scope

    launch = executor.__call__

    @functools.wraps(launch)
    def call(self, *args, **kwargs):
        launches.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    patch_once._once_per_launch = True  # type: ignore[attr-defined]
    interpreter._patch_lang = patch_once
    executor.__call__ = call
    return True
