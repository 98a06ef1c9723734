"""The registered torch.ops.rwp_kernels ops: torch.library.opcheck (schema, fake/meta implementations,
autograd registration, AOT dispatch) and use inside a torch.compile'd function."""
import pytest
import torch

from rwp_kernels import layout, perturb_, stream

OPS = ("philox4x32_10", "noise_", "perturb_", "restore_", "sgd_step_")


pytestmark = pytest.mark.usefixtures("cpp_ext")


def tensors(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 3, 3, 3), (5,), (), (4, 9)]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def empty_like_list(ts):
    return [torch.empty_like(t) for t in ts]


def plan_words(ts, *, adaptive=False, first_index=0) -> list[int]:
    """The ops' plan argument: four words per tensor (row length, elements per sigma, param_index, vector)."""
    plan = layout.plan(ts, range(first_index, first_index + len(ts)),
                       [layout.num_sigma_rows(t, adaptive=adaptive) for t in ts])
    return [w for e in plan for w in (e.row_len, e.sigma_len, e.param_index, int(e.vector))]


def _table_op_samples(dtype, k0, k1):
    """(op name, args) of perturb_, restore_ and sgd_step_ on parameters of ``dtype``."""
    ps = tensors(dtype)
    n = len(ps)
    fisher = [torch.rand(p.shape) for p in ps]
    grads = tensors(dtype)
    grads[1] = ps[1].new_empty(0)  # absent for that parameter
    sig = [torch.rand(p.shape[0] if p.dim() >= 2 else 1) for p in ps]
    return [
        ("perturb_", (ps, empty_like_list(ps), grads, [], [0.01] * n, [0.0] * n, plan_words(ps), k0, k1, 5, None,
                      0.5)),
        ("perturb_", (tensors(dtype), [], [], fisher, [0.01] * n, [0.1] * n,
                      plan_words(ps, adaptive=True, first_index=3), k0, k1, 5, torch.tensor(0.5), 1.0)),
        ("restore_", (tensors(dtype), [], sig, tensors(dtype), fisher, tensors(dtype), plan_words(ps), k0, k1, 5, None,
                      0.5, 0.9, torch.tensor(2.0), 1.0, None, 0.5)),
        ("restore_", (tensors(dtype), tensors(dtype), [], [], [], [], plan_words(ps), 0, 0, 0, None, 1.0, 0.0, None,
                      1.0, None, 0.0)),
        ("sgd_step_", (tensors(dtype), tensors(dtype), tensors(dtype), tensors(dtype), fisher, tensors(dtype),
                       plan_words(ps), 0.1, 0.9, 0.0, 1e-3, True, False, False, torch.tensor(0.5), 1.0,
                       torch.tensor(0.0), 0.99, None, 1.0, torch.tensor(0.5), 0.0)),
        ("sgd_step_", (tensors(dtype), tensors(dtype), [], [], [], [], plan_words(ps), 0.1, 0.0, 0.0, 0.0, False, True,
                       True, None, 1.0, None, 0.0, None, 1.0, None, 0.0)),
    ]


def samples():
    """(op name, args, the parameters' dtype or None) covering every op and its optional arguments."""
    k0, k1 = stream.philox_key(7, 1)
    out = [("philox4x32_10", (torch.randint(0, 2**32, (10, 4)), torch.randint(0, 2**32, (10, 2))), None),
           ("noise_", (torch.empty(37), k0, k1, 3, 5, 2), None)]
    for dtype in (torch.float32, torch.bfloat16):
        out += [(name, args, dtype) for name, args in _table_op_samples(dtype, k0, k1)]
    return out


SAMPLES = samples()


# opcheck runs each sample through several checks (0.2-0.7 s on a 2-core CPU): the float32 samples, which cover
# every op and optional argument, are in the fast tier; their bfloat16 twins in the slow one.
@pytest.mark.parametrize("name,args", [
    pytest.param(n, a, id=f"{n}-{i}", marks=[pytest.mark.slow] if dtype == torch.bfloat16 else [])
    for i, (n, a, dtype) in enumerate(SAMPLES)])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.rwp_kernels, name), args)


def test_every_op_has_cpu_kernel_and_a_sample():
    assert {name for name, _, _ in SAMPLES} == set(OPS)
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rwp_kernels::{name}", "CPU"), name


def test_ops_inside_torch_compile():
    """The fake implementations let the ops sit in a compiled graph (no graph break, fullgraph)."""
    k0, k1 = stream.philox_key(3, 0)

    def step(params, backups, grads, bufs):
        plan = plan_words(params)
        flat = torch.ops.rwp_kernels.perturb_(params, backups, grads, [], [0.01] * len(params), [0.0] * len(params),
                                              plan, k0, k1, 1, None, 1.0)
        torch.ops.rwp_kernels.sgd_step_(params, grads, bufs, backups, [], [], plan, 0.1, 0.9, 0.0, 0.0, False, False,
                                        True, None, 1.0, None, 0.0, None, 1.0, None, 0.0)
        return flat * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    a, b = tensors(), tensors()
    out_a = compiled(a, empty_like_list(a), tensors(), empty_like_list(a))
    out_b = step(b, empty_like_list(b), tensors(), empty_like_list(b))
    assert torch.equal(out_a, out_b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_public_op_returns_views_of_one_sigma_buffer_with_the_right_rows():
    ps = tensors()
    sig = perturb_(ps, gamma=0.01, seed=1, step=1, backend="cpu")
    assert [s.shape for s in sig] == [(6,), (1,), (1,), (4,)]
    assert all(s.is_contiguous() and s.dtype == torch.float32 for s in sig)
