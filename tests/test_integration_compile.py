"""torch.compile (inductor, CPU) with RWP: a compiled training step gives the weights of the eager one.

The network is rwp_kernels.models.small_cnn (three convolutions with BatchNorm); three RWP steps of README's
loop (clean pass, perturbed pass with frozen BN statistics, step) on 8 random 8x8 images per pass, compared
with the same steps run eagerly: parameters and BN running statistics within an absolute 1e-6 (measured:
2e-7), ``num_batches_tracked`` exactly. Not bit for bit: inductor generates its own C++ kernels for the
BatchNorm, pooling and loss reductions and may sum in another order than ATen, so the gradients differ in
the last bits; the noise itself does not change (the optimizer ops run eagerly and see the same weights up
to those bits).

(a) ``torch.compile(model)``, optimizer eager: works on every backend (the compiled graph reads the
    parameters in place, so it sees the perturbed and the restored weights).
(b) ``torch.compile(train_step)`` where train_step does forward, backward, perturb and step: dynamo breaks
    the graph at each ``backward()``, at ``zero_grad`` and around the optimizer's training-loop methods,
    which are marked ``torch.compiler.disable`` (tracing their bookkeeping gained nothing, and with the
    reference backend dynamo pulled the pure-PyTorch noise generator into a graph that inductor needed
    minutes to compile), so what it compiles is the forward passes; with or without the user wrapping the
    calls in ``torch.compiler.disable`` too.

torch.compile on CPU needs a C++ compiler and takes 5-20 s per compiled graph here: every test is slow.
"""
import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

import rwp_kernels
from _optim_common import one_torch_thread  # noqa: F401
from rwp_kernels.models import small_cnn
from rwp_kernels.optim import RWPSGD, freeze_bn_stats

pytestmark = pytest.mark.slow  # inductor compiles C++ kernels: see the module docstring

BACKENDS = [b for b in rwp_kernels.available_backends("cpu") if b != "triton"]
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, gamma=0.01, alpha=0.5, seed=5)
STEPS = 3
ATOL = 1e-6  # see the module docstring: inductor's reductions may round differently from ATen's


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (dynamo's caches and recompile counters are per code object)."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(2 * STEPS)]


def two_models():
    torch.manual_seed(0)
    model = small_cnn()
    return model, copy.deepcopy(model)


def run(model, backend, forward=None):
    """README's loop for STEPS steps, with ``forward`` (default: the model itself) for the passes."""
    forward = forward or model
    opt = RWPSGD(model.parameters(), **HYPER, backend=backend)
    data = batches()
    model.train()
    for t in range(STEPS):
        (x1, y1), (x2, y2) = data[2 * t], data[2 * t + 1]
        opt.zero_grad()
        F.cross_entropy(forward(x1), y1).backward()
        with opt.perturbed(), freeze_bn_stats(model):
            F.cross_entropy(forward(x2), y2).backward()
        opt.step()
    return opt


def run_steps(train_step, model, opt) -> None:
    """STEPS calls of a compiled ``train_step(x1, y1, x2, y2)`` on the data of ``run``."""
    data = batches()
    model.train()
    for t in range(STEPS):
        train_step(*data[2 * t], *data[2 * t + 1])
    assert not opt.is_perturbed


def assert_close_to_eager(compiled_run, eager_model, opt, eager_opt):
    assert opt.steps == eager_opt.steps == STEPS
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "something was compiled"
    eager_state = eager_model.state_dict()
    for name, value in compiled_run.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, eager_state[name], atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(value, eager_state[name]), name  # num_batches_tracked: the clean passes only
    assert int(compiled_run[1].num_batches_tracked) == STEPS, "BN statistics from the clean passes only"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_model_eager_optimizer_matches_eager(backend):
    model, eager = two_models()
    opt = run(model, backend, forward=torch.compile(model))
    assert_close_to_eager(model, eager, opt, run(eager, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_train_step_with_disabled_optimizer_calls_matches_eager(backend):
    model, eager = two_models()
    opt = RWPSGD(model.parameters(), **HYPER, backend=backend)
    perturb, step = torch.compiler.disable(opt.perturb), torch.compiler.disable(opt.step)

    @torch.compile
    def train_step(x1, y1, x2, y2):
        opt.zero_grad()
        F.cross_entropy(model(x1), y1).backward()
        perturb()
        with freeze_bn_stats(model):
            F.cross_entropy(model(x2), y2).backward()
        step()

    run_steps(train_step, model, opt)
    assert_close_to_eager(model, eager, opt, run(eager, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_train_step_calling_the_optimizer_matches_eager(backend):
    """The optimizer's training-loop methods run eagerly (torch.compiler.disable): dynamo breaks the graph
    around them instead of tracing their bookkeeping and the reference backend's noise."""
    model, eager = two_models()
    opt = RWPSGD(model.parameters(), **HYPER, backend=backend)

    @torch.compile
    def train_step(x1, y1, x2, y2):
        opt.zero_grad()
        F.cross_entropy(model(x1), y1).backward()
        with opt.perturbed(), freeze_bn_stats(model):
            F.cross_entropy(model(x2), y2).backward()
        opt.step()

    run_steps(train_step, model, opt)
    assert_close_to_eager(model, eager, opt, run(eager, backend))


def test_docs_example_runs(tmp_path):
    """docs/integrations.md's torch.compile example."""
    from _doc_examples import run_example

    done = run_example("compile-step", tmp_path)
    assert "steps: 3, perturbed: False" in done.stdout, done.stdout


def test_the_optimizers_training_loop_methods_are_not_traced():
    """The methods are marked for dynamo at their first call (so that importing rwp_kernels.optim does not import
    torch._dynamo): traced from a compiled function they still break the graph. Only the function's own two ops
    are captured; traced, the reference backend's noise would add hundreds."""
    from torch._dynamo.testing import CompileCounter

    model = small_cnn()
    opt = RWPSGD(model.parameters(), **HYPER, backend="reference")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def window(x):
        y = x * 2
        opt.perturb()
        opt.restore()
        opt.step()
        return y + 1

    window(torch.ones(3))
    assert counter.op_count == 2, f"{counter.op_count} ops captured in {counter.frame_count} graphs"
    assert opt.steps == 1 and not opt.is_perturbed
