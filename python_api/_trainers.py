"""What the optimizer recognizes of the trainers that drive step(closure), to refuse what would not be RWP.

Both checks read the trainers' own objects, duck-typed, without importing the trainers.
"""
import functools
import sys


def clipping_inside_closure(closure) -> str | None:
    """The gradient clipping a trainer runs inside ``closure``, after its backward; None if none is known.

    Lightning's automatic optimization passes ``functools.partial(Precision._wrap_closure, module, optimizer,
    closure)``, which calls the module's ``configure_gradient_clipping`` after every call; Lightning's own
    clips when the Trainer has ``gradient_clip_val``, an override may clip anyway. With RWP's two calls,
    each pass's gradient would be clipped on its own instead of the mix.
    """
    if not (isinstance(closure, functools.partial) and getattr(closure.func, "__name__", "") == "_wrap_closure"):
        return None
    module = closure.args[0] if closure.args else None
    hook = getattr(type(module), "configure_gradient_clipping", None)
    if hook is not None and hook.__qualname__ != "LightningModule.configure_gradient_clipping":
        return f"{hook.__qualname__} (an override, which Lightning calls after each closure call)"
    clip = getattr(getattr(module, "_trainer", None), "gradient_clip_val", None)
    return f"Lightning's gradient_clip_val={clip}" if clip else None


def accumulation_around_step() -> str | None:
    """Gradient accumulation by a trainer that skips step(closure) on all but the last micro-batch; None if none.

    Accelerate's ``accumulate()``: AcceleratedOptimizer.step does nothing (not even calling the closure) until
    the last micro-batch, whose closure alone then makes both RWP passes, from a loss divided by the number
    of micro-batches.
    """
    state = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state, "GradientState", None), "_shared_state", None)
    steps = (shared or {}).get("plugin_kwargs", {}).get("num_steps", 1)
    if steps > 1 and _called_by("AcceleratedOptimizer"):
        return f"Accelerate's gradient accumulation over {steps} batches"
    return None


def _called_by(class_name: str, depth: int = 8) -> bool:
    """Whether a method of a class named ``class_name`` is among the ``depth`` callers of our caller."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if type(frame.f_locals.get("self")).__name__ == class_name:
            return True
        frame = frame.f_back
    return False
