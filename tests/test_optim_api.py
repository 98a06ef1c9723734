"""The training-loop API of rwp_kernels.optim: perturb / perturbed / restore / step(closure), alpha = 0 and
1, misuse, parameters without gradients, frozen parameters, groups with gamma = 0, what p.grad holds,
state-dict guards, fp16/bf16 and channels_last parameters, torch.compile'd models, freeze_bn_stats."""
import copy

import pytest
import torch
from torch import nn

import rwp_kernels
from rwp_kernels.models import small_cnn
from rwp_kernels.optim import RWP, RWPSGD, freeze_bn_stats

from _optim_common import assert_models_equal, backward, batches, model_pair, params_of
from _optim_common import one_torch_thread  # noqa: F401

RWP_KW = dict(gamma=0.05, alpha=0.5, seed=17, backend="reference")


def _make(kind, model, **kw):
    kw = {**RWP_KW, **kw}
    if kind == "rwpsgd":
        return RWPSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, **kw)
    return RWP(model.parameters(), torch.optim.AdamW, lr=1e-3, **kw)


def _rwp_step(model, opt, clean, perturbed):
    opt.zero_grad()
    backward(model, clean)
    with opt.perturbed(), freeze_bn_stats(model):
        backward(model, perturbed)
    opt.step()


KINDS = ["rwpsgd", "wrapper"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_exception_inside_perturbed_leaves_clean_weights(kind, adaptive):
    model, _ = model_pair()
    opt = _make(kind, model, adaptive=adaptive)
    data = batches(6, seed=1)
    _rwp_step(model, opt, data[0], data[1])
    weights, state = params_of(model), copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    backward(model, data[2])
    with pytest.raises(ZeroDivisionError):
        with opt.perturbed():
            assert opt.is_perturbed
            backward(model, data[3])
            1 / 0
    assert not opt.is_perturbed
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p.detach(), w), "the weights must be restored bit for bit"
    after = opt.state_dict()
    assert after["rwp"] == state["rwp"]
    for key, value in state["state"].items():
        for name, t in value.items():
            assert torch.equal(after["state"][key][name], t), f"optimizer state {name} changed"
    _rwp_step(model, opt, data[4], data[5])  # training goes on normally
    assert opt.steps == 2


@pytest.mark.parametrize("kind", KINDS)
def test_misuse_gives_clear_errors_and_keeps_weights(kind):
    model, _ = model_pair()
    opt = _make(kind, model)
    clean = params_of(model)
    backward(model, batches(1)[0])
    opt.perturb()
    perturbed = params_of(model)
    with pytest.raises(RuntimeError, match="already perturbed"):
        opt.perturb()
    for p, w in zip(model.parameters(), perturbed):
        assert torch.equal(p.detach(), w), "a refused perturb() must not touch the weights"
    with pytest.warns(RuntimeWarning, match="perturbed"):
        state_dict = opt.state_dict()
    with pytest.raises(RuntimeError, match="pending"):
        opt.load_state_dict(state_dict)
    opt.restore()
    for p, w in zip(model.parameters(), clean):
        assert torch.equal(p.detach(), w)
    with pytest.raises(RuntimeError, match="restored but its gradients were not applied"):
        opt.perturb()
    opt.zero_grad()  # discards the pending mix
    opt.perturb()
    opt.restore()
    opt.restore()  # a second restore() is a no-op
    for p, w in zip(model.parameters(), clean):
        assert torch.equal(p.detach(), w)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adaptive,restore", [(False, "exact"), (True, "exact"), (True, "regenerate")])
def test_restore_then_step_equals_fused_step(kind, adaptive, restore):
    """restore() in the middle (e.g. to evaluate the clean model) changes nothing of the update."""
    a, b = model_pair()
    opt_a, opt_b = (_make(kind, m, adaptive=adaptive, restore=restore) for m in (a, b))
    data = batches(6, seed=3)
    for t in range(3):
        _rwp_step(a, opt_a, data[2 * t], data[2 * t + 1])
        opt_b.zero_grad()
        backward(b, data[2 * t])
        with opt_b.perturbed(), freeze_bn_stats(b):
            backward(b, data[2 * t + 1])
        opt_b.restore()
        opt_b.step()
    assert_models_equal(a, b, exact=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("zeroing", [False, True], ids=["zeroed-before", "closure-zeroes"])
def test_closure_step_equals_manual_loop(kind, alpha, zeroing):
    """step(closure) is the README loop (BatchNorm statistics frozen in the perturbed pass), whether the
    gradients are zeroed before step() or by the closure itself (torch's and Lightning's closures)."""
    a, b = model_pair()
    opt_a, opt_b = _make(kind, a, alpha=alpha), _make(kind, b, alpha=alpha)
    data = batches(3, seed=4)
    for batch in data:
        opt_a.zero_grad()
        if alpha < 1:
            backward(a, batch)
        with opt_a.perturbed(), freeze_bn_stats(a):
            if alpha > 0:
                backward(a, batch)
        opt_a.step()
        if zeroing:
            loss = opt_b.step(lambda: (opt_b.zero_grad(), backward(b, batch))[1])
        else:
            opt_b.zero_grad()
            loss = opt_b.step(lambda: backward(b, batch))
        assert loss is not None and torch.isfinite(loss)
    assert_models_equal(a, b, exact=True)


def test_alpha_one_ignores_the_clean_gradient():
    """alpha=1 (the 1x variant): whatever p.grad held before perturb() has weight 0 in the update."""
    a, b = model_pair()
    opt_a, opt_b = _make("rwpsgd", a, alpha=1.0), _make("rwpsgd", b, alpha=1.0)
    for clean, perturbed in zip(batches(3, seed=5), batches(3, seed=6)):
        opt_a.zero_grad()
        backward(a, clean)  # a clean pass that must not count
        with opt_a.perturbed():
            backward(a, perturbed)
        opt_a.step()
        opt_b.zero_grad()
        with opt_b.perturbed():
            backward(b, perturbed)
        opt_b.step()
    assert_models_equal(a, b, exact=True, buffers=False)  # BN statistics differ: a ran a clean pass


def test_alpha_zero_never_perturbs_and_mixed_alpha_zero_is_refused():
    model, _ = model_pair()
    opt = _make("rwpsgd", model, alpha=0.0)
    clean = params_of(model)
    backward(model, batches(1)[0])
    opt.perturb()
    assert not opt.is_perturbed
    for p, w in zip(model.parameters(), clean):
        assert torch.equal(p.detach(), w)
    mixed = RWPSGD([{"params": list(model.parameters())[:2], "alpha": 0.0},
                    {"params": list(model.parameters())[2:]}], lr=0.1, **RWP_KW)
    with pytest.raises(ValueError, match=r"alpha is 0 in param group\(s\) \[0\]"):
        mixed.perturb()
    for p, w in zip(model.parameters(), clean):
        assert torch.equal(p.detach(), w)


def test_what_p_grad_holds_between_perturb_and_step():
    model, _ = model_pair()
    data = batches(2, seed=8)
    for adaptive, alpha in ((False, 0.25), (True, 0.25)):
        opt = _make("rwpsgd", model, adaptive=adaptive, alpha=alpha)
        opt.zero_grad()
        backward(model, data[0])
        g_c = [p.grad.clone() for p in model.parameters()]
        opt.perturb()
        if adaptive:  # the clean gradient is kept aside; p.grad will receive g_p alone
            assert all(p.grad is None for p in model.parameters())
        else:  # the clean gradient times (1 - alpha) / alpha
            for p, g in zip(model.parameters(), g_c):
                torch.testing.assert_close(p.grad, g * 3.0)
        probe = copy.deepcopy(model)  # the perturbed weights, for the perturbed gradient alone
        probe.zero_grad()
        backward(probe, data[1])
        backward(model, data[1])
        for p, q, g in zip(model.parameters(), probe.parameters(), g_c):
            expected = q.grad if adaptive else g * 3.0 + q.grad
            torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-5)
        opt.step()


class TwoHeads(nn.Module):
    """A trunk and two heads; the clean pass uses head a, the perturbed pass head b, and c is frozen."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 5)
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 3)
        self.c = nn.Linear(5, 3)
        self.c.requires_grad_(False)

    def forward(self, x, head):
        return getattr(self, head)(torch.tanh(self.trunk(x))) + self.c(self.trunk(x))


@pytest.mark.parametrize("adaptive", [False, True])
def test_parameters_without_gradient_in_one_pass_and_frozen_parameters(adaptive):
    """A pass that gives a parameter no gradient contributes zero to its mix; frozen parameters are
    neither perturbed nor updated. Checked against the mix computed by hand and torch.optim.SGD."""
    torch.manual_seed(0)
    model = TwoHeads()
    ref = copy.deepcopy(model)
    alpha, lr = 0.3, 0.1
    opt = RWPSGD(model.parameters(), lr=lr, gamma=0.05, alpha=alpha, adaptive=adaptive, seed=1, backend="reference")
    x1, x2 = torch.randn(4, 6), torch.randn(4, 6)
    frozen = model.c.weight.detach().clone()

    model(x1, "a").square().mean().backward()
    g_c = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.perturb()
    assert torch.equal(model.c.weight, frozen), "a frozen parameter must not be perturbed"
    probe = copy.deepcopy(model)
    probe(x2, "b").square().mean().backward()
    g_p = {n: p.grad.clone() for n, p in probe.named_parameters() if p.grad is not None}
    model(x2, "b").square().mean().backward()
    opt.step()

    sgd = torch.optim.SGD(ref.parameters(), lr=lr)
    for n, p in ref.named_parameters():
        if n in g_c or n in g_p:
            p.grad = (1 - alpha) * g_c.get(n, torch.zeros_like(p)) + alpha * g_p.get(n, torch.zeros_like(p))
    sgd.step()
    assert set(g_c) == {"trunk.weight", "trunk.bias", "a.weight", "a.bias"}
    assert set(g_p) == {"trunk.weight", "trunk.bias", "b.weight", "b.bias"}
    assert_models_equal(model, ref, exact=False, atol=1e-7, rtol=1e-6)
    assert torch.equal(model.c.weight, frozen)


@pytest.mark.parametrize("kind", KINDS)
def test_a_parameter_listed_twice_is_refused(kind):
    """torch only warns; the fused ops would perturb and update it twice. Refused at construction and by
    add_param_group, which then leaves the groups as they were."""
    model = small_cnn()
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"param group 0: parameter 3 \(shape \(16,\)\) is parameter 1 of the"):
        RWPSGD(params[:3] + [params[1]], lr=0.1) if kind == "rwpsgd" else RWP(params[:3] + [params[1]])
    opt = _make(kind, model)
    groups = [dict(g) for g in opt.param_groups]
    extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="param group 1: parameter 2 .* is parameter 0 of the same group again"):
        opt.add_param_group({"params": [extra.weight, extra.bias, extra.weight]})
    assert opt.param_groups == groups
    opt.add_param_group({"params": list(extra.parameters())})
    assert len(opt.param_groups) == 2


def test_a_base_optimizer_that_requires_a_closure_is_refused():
    """LBFGS's step() re-evaluates the loss through its closure: it would not step with RWP's mix."""
    with pytest.raises(TypeError, match="RWP cannot wrap LBFGS: its step\\(\\) requires a closure"):
        RWP(small_cnn().parameters(), torch.optim.LBFGS, lr=0.1)
    RWP(small_cnn().parameters(), torch.optim.Rprop, lr=0.1)  # an optional closure is fine


def test_sparse_adam_is_refused():
    """SparseAdam refuses dense gradients, and RWP's are: it could never take a step."""
    with pytest.raises(TypeError, match="RWP cannot wrap SparseAdam"):
        RWP(small_cnn().parameters(), torch.optim.SparseAdam, lr=0.1)


def test_group_with_gamma_zero_is_never_perturbed():
    model = small_cnn()
    conv = [p for p in model.parameters() if p.dim() > 1]
    other = [p for p in model.parameters() if p.dim() <= 1]
    opt = RWPSGD([{"params": conv}, {"params": other, "gamma": 0.0, "weight_decay": 0.0}], lr=0.1,
                 weight_decay=1e-3, **RWP_KW)
    before = params_of(model)
    backward(model, batches(1)[0])
    opt.perturb()
    for p, w in zip(model.parameters(), before):
        assert torch.equal(p.detach(), w) == (p.dim() <= 1)
    opt.restore()


def test_gamma_and_lr_are_group_hyperparameters_a_scheduler_can_change():
    model, _ = model_pair()
    opt = _make("rwpsgd", model, gamma=0.01)
    clean = params_of(model)
    deltas = []
    for gamma in (0.01, 0.03):
        for group in opt.param_groups:
            group["gamma"] = gamma
        opt.perturb()
        deltas.append([p.detach() - w for p, w in zip(model.parameters(), clean)])
        opt.restore()
        opt.zero_grad()
    for d1, d3 in zip(*deltas):
        torch.testing.assert_close(d3, 3 * d1, atol=1e-6, rtol=1e-4)
    for group in opt.param_groups:
        group["alpha"] = 1.5
    with pytest.raises(ValueError, match="param group 0: alpha is 1.5"):
        opt.perturb()


@pytest.mark.parametrize("bad,match", [
    (dict(gamma=-0.1), "gamma"), (dict(alpha=1.2), "alpha"), (dict(eta=float("nan")), "eta"),
    (dict(beta=-1.0), "beta"), (dict(adaptive=1), "adaptive"), (dict(restore="sub"), "restore"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(stream=2**64), "stream"), (dict(lr=-1.0), "lr"),
    (dict(nesterov=True), "nesterov"), (dict(backend="cuda-fast"), "backend"),
])
def test_bad_hyperparameters_are_rejected(bad, match):
    model = small_cnn()
    kw = {**RWP_KW, **bad}
    lr = kw.pop("lr", 0.1)
    with pytest.raises((ValueError, TypeError), match=match):
        RWPSGD(model.parameters(), lr=lr, **kw)


def test_seed_none_is_reproducible_under_manual_seed():
    seeds = []
    for _ in range(2):
        torch.manual_seed(123)
        seeds.append(RWPSGD(small_cnn().parameters(), lr=0.1).seed)
    assert seeds[0] == seeds[1]
    assert RWPSGD(small_cnn().parameters(), lr=0.1).seed != seeds[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters(dtype):
    """fp16/bf16 weights end to end (forward and backward in that dtype): the restore is exact in the
    dtype, weights and state keep it, and the run agrees with the fp32 run to the dtype's precision."""
    low, ref = model_pair(seed=2)
    low.to(dtype)
    opt, ref_opt = _make("rwpsgd", low), _make("rwpsgd", ref)
    data = batches(6, seed=12)
    as_low = [(x.to(dtype), y) for x, y in data]
    weights = params_of(low)
    backward(low, as_low[0])
    with pytest.raises(KeyError):
        with opt.perturbed():
            assert not all(torch.equal(p.detach(), w) for p, w in zip(low.parameters(), weights))
            raise KeyError
    for p, w in zip(low.parameters(), weights):
        assert p.dtype == dtype and torch.equal(p.detach(), w)
    for t in range(3):
        _rwp_step(low, opt, as_low[2 * t], as_low[2 * t + 1])
        _rwp_step(ref, ref_opt, data[2 * t], data[2 * t + 1])
    for p, q in zip(low.parameters(), ref.parameters()):
        assert p.dtype == dtype and opt.state[p]["momentum_buffer"].dtype == dtype
        # The fp32 run moved the weights by up to 2.5e-2; bf16 keeps 8 bits, fp16 11 (observed: 5e-3, 1e-3).
        torch.testing.assert_close(p.float(), q.detach(), atol=1e-2 if dtype == torch.bfloat16 else 2.5e-3, rtol=0)


@pytest.mark.slow
def test_torch_compiled_model():
    """A torch.compile'd model (the optimizer stays eager): the compiled forward sees the perturbed and the
    restored weights; freeze_bn_stats works through the compiled module. Compared with eager."""
    eager, compiled_src = model_pair(seed=6)
    compiled = torch.compile(compiled_src, backend="aot_eager")
    opt_e, opt_c = _make("rwpsgd", eager), _make("rwpsgd", compiled_src)
    data = batches(6, seed=13)
    for t in range(3):
        _rwp_step(eager, opt_e, data[2 * t], data[2 * t + 1])
        _rwp_step(compiled, opt_c, data[2 * t], data[2 * t + 1])
    assert_models_equal(eager, compiled_src, exact=False, atol=1e-5, rtol=1e-4)


def test_freeze_bn_stats():
    model = small_cnn()
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(8, 1, 8, 8)
    out = model(x)
    buffers = [b.clone() for b in model.buffers()]
    with freeze_bn_stats(model):
        with freeze_bn_stats(model):  # re-entrant
            frozen_out = model(x)
        assert not any(m.track_running_stats for m in bns)
        model(torch.randn(8, 1, 8, 8))
    assert all(m.track_running_stats for m in bns)
    for a, b in zip(model.buffers(), buffers):
        assert torch.equal(a, b), "running statistics changed inside freeze_bn_stats"
    torch.testing.assert_close(frozen_out, out)  # the forward pass is unchanged
    model(x)
    assert not torch.equal(next(iter(model.buffers())), buffers[0]), "statistics must update again afterwards"
    with pytest.raises(KeyError):
        with freeze_bn_stats(model):
            raise KeyError
    assert all(m.track_running_stats for m in bns)
    model.eval()
    with freeze_bn_stats(model):
        torch.testing.assert_close(model(x), copy.deepcopy(model).eval()(x))


def _two_launch_groups(bad=None):
    """Two param groups with different alpha and lr (two perturb_ launches, two sgd_step_ launches); ``bad``
    (if given) becomes parameter 1 of group 1."""
    torch.manual_seed(0)
    second = [nn.Parameter(torch.randn(3)), bad if bad is not None else nn.Parameter(torch.randn(4, 10))]
    groups = [{"params": [nn.Parameter(torch.randn(4, 10)), nn.Parameter(torch.randn(4))], "alpha": 0.25},
              {"params": second, "alpha": 0.75, "lr": 0.02}]
    params = [p for group in groups for p in group["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    return groups, params


def _make_groups(kind, groups, **kw):
    kw = {**RWP_KW, **kw}
    if kind == "rwpsgd":
        return RWPSGD(groups, lr=0.05, momentum=0.9, **kw)
    return RWP(groups, torch.optim.SGD, lr=0.05, momentum=0.9, **kw)


def _copies(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _assert_unchanged(params, weights, grads):
    for i, (p, w, g) in enumerate(zip(params, weights, grads)):
        assert torch.equal(p.detach(), w), f"parameter {i}: weights changed"
        assert torch.equal(p.grad, g), f"parameter {i}: gradient changed"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("restore", ["exact", "regenerate"])
def test_perturb_refused_in_a_later_launch_changes_nothing(kind, restore):
    """A transposed weight (rows not contiguous: the ops refuse it) in the second launch: refused before the
    first launch runs, named as the optimizer's parameter; weights and gradients stay bit for bit."""
    groups, params = _two_launch_groups(bad=nn.Parameter(torch.randn(10, 4).t()))
    opt = _make_groups(kind, groups, restore=restore)
    weights, grads = _copies(params), _copies(p.grad for p in params)
    for _ in range(2):  # nothing is left pending: the second try fails the same way
        with pytest.raises(ValueError, match=r"perturb_: param group 1, parameter 1 \(shape \(4, 10\), torch.float32"
                                             r".*not dense with contiguous rows"):
            opt.perturb()
        assert not opt.is_perturbed
        _assert_unchanged(params, weights, grads)


@pytest.mark.parametrize("kind", KINDS)
def test_perturb_failing_in_a_later_launch_is_undone(kind, monkeypatch):
    """A failure the checks cannot foresee (here: out of memory) in the second launch, after the first one
    perturbed its weights and scaled its gradients by (1 - alpha) / alpha: all of it is undone, bit for bit."""
    groups, params = _two_launch_groups()
    opt = _make_groups(kind, groups)
    weights, grads = _copies(params), _copies(p.grad for p in params)
    perturb_, launches = rwp_kernels.perturb_, []

    def second_launch_fails(*args, **kwargs):
        launches.append(args)
        if len(launches) == 2:
            raise RuntimeError("out of memory")
        return perturb_(*args, **kwargs)

    monkeypatch.setattr(rwp_kernels, "perturb_", second_launch_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.perturb()
    assert len(launches) == 2 and not opt.is_perturbed
    _assert_unchanged(params, weights, grads)
    monkeypatch.undo()
    opt.perturb()  # training goes on
    opt.step()


def test_step_refused_in_a_later_launch_updates_no_group():
    """A momentum buffer of the wrong dtype (the parameters were cast after the first step) in the second
    sgd_step_ launch: refused before the first launch runs, named as the optimizer's parameter; no group is
    updated, the weights are the clean ones."""
    groups, params = _two_launch_groups()
    opt = _make_groups("rwpsgd", groups)
    opt.perturb()
    opt.step()  # creates the momentum buffers
    opt.state[params[3]]["momentum_buffer"] = opt.state[params[3]]["momentum_buffer"].double()
    for p in params:
        p.grad = torch.randn_like(p)
    weights = _copies(params)
    buffers = _copies(opt.state[p]["momentum_buffer"] for p in params)
    opt.perturb()
    with pytest.raises(TypeError, match=r"sgd_step_: momentum_buffers of param group 1, parameter 1 \(shape \(4, 10\), "
                                        r"torch.float64"):
        opt.step()
    assert not opt.is_perturbed and opt.steps == 1
    for i, (p, w, b) in enumerate(zip(params, weights, buffers)):
        assert torch.equal(p.detach(), w), f"parameter {i}: weights changed"
        assert torch.equal(opt.state[p]["momentum_buffer"], b), f"parameter {i}: momentum buffer changed"
