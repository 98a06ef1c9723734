"""A faster Triton interpreter for the tests: the same results in about half the time.

Three kinds of work that change nothing are skipped:

* At every call of a ``@triton.jit`` helper from inside a kernel, the interpreter patches ``triton.language``
  again (``InterpretedFunction.__call__`` -> ``_patch_lang``: an ``inspect.getmembers`` walk of the language
  modules, about 0.6 ms), although the launch running the kernel has patched the same modules already, with
  the same functions. The kernels here call about 30 helpers per tile, so that walk took about 30 % of the
  interpreter's time; it is skipped where the running launch has patched the helper's language modules.
* Every ``+``, ``-`` and ``*`` on 32-bit integer tensors builds an overflow check (casts to int64, the operation
  again, two comparisons) for a ``device_assert`` that does nothing unless the options' ``debug`` is on, which
  the interpreter's never is: about 30 % of what was left. It is skipped while ``debug`` is off.
* ``_get_np_dtype`` builds a 20-entry dictionary at each call (about 10 %): its answers are cached per type.

tests/test_triton_interpret.py checks an op with and without them, bit for bit. Each patch is installed only
where the interpreter has the hooks it expects (another Triton version may lack them).
"""
import functools

_launch_langs = None  # ids of the language modules the running launch patched; None outside a launch
enabled = True


def _langs(fn, interpreter) -> set:
    return {id(v) for v in fn.__globals__.values() if v is interpreter.tl or v is interpreter.tl.core}


def install() -> bool:
    """Patch Triton's interpreter (once); True where at least one patch is in."""
    try:
        from triton.runtime import interpreter as I
    except ImportError:
        return False
    if getattr(I, "_rwp_fast", None) is None:
        I._rwp_fast = [patch(I) for patch in (_skip_repatching, _skip_overflow_checks, _cache_np_dtypes)]
    return any(I._rwp_fast)


def _skip_repatching(I) -> bool:
    if not all(hasattr(I, name) for name in ("_patch_lang", "InterpreterError", "tl")) or not hasattr(
            I.InterpretedFunction, "rewrite"):
        return False
    grid_call, device_call = I.GridExecutor.__call__, I.InterpretedFunction.__call__

    def launch(self, *args, **kwargs):
        global _launch_langs
        _launch_langs = _langs(self.fn, I)
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            _launch_langs = None

    def helper(self, *args, **kwargs):
        langs = _langs(self.fn, I)
        if not enabled or _launch_langs is None or not langs <= _launch_langs:
            if _launch_langs is not None:
                _launch_langs.update(langs)
            return device_call(self, *args, **kwargs)
        fn = self.rewrite()  # InterpretedFunction.__call__ without its _patch_lang
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise I.InterpreterError(repr(e)) from e

    I.GridExecutor.__call__ = launch
    I.InterpretedFunction.__call__ = helper
    return True


def _skip_overflow_checks(I) -> bool:
    semantic = getattr(I, "interpreter_semantic", None)
    sanitize = getattr(semantic, "binary_op_sanitize_overflow_impl", None)
    if sanitize is None or not hasattr(semantic.builder.options, "debug"):
        return False

    def overflow_check(lhs, rhs, binary_op):
        if enabled and not semantic.builder.options.debug:
            return None
        return sanitize(lhs, rhs, binary_op)

    semantic.binary_op_sanitize_overflow_impl = overflow_check  # this instance only: compiled kernels keep theirs
    return True


def _cache_np_dtypes(I) -> bool:
    np_dtype = getattr(I, "_get_np_dtype", None)
    if np_dtype is None or not all(hasattr(I.tl, name) for name in ("block_type", "pointer_type")):
        return False
    cached = functools.lru_cache(maxsize=None)(np_dtype)

    def get_np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, I.tl.block_type) else tt_dtype
        if not enabled or isinstance(scalar, I.tl.pointer_type):  # pointer types are not hashable
            return np_dtype(tt_dtype)
        return cached(scalar)

    I._get_np_dtype = get_np_dtype
    return True
