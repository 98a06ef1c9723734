"""timm: its models by name in the training command (``--model timm:<name>``), RWPSGD on a timm CNN in
channels_last against the public ops by hand, and RWP's optimizers from timm's optimizer factory
(``rwp_kernels.integrations.timm.register_timm_optimizers``).

The timm model is ``test_efficientnet`` (100k parameters: BatchNorm, depthwise convolutions,
squeeze-excitation), timm's own tiny test network: it runs on 8x8 and 16x16 images in milliseconds. Nothing
is downloaded (``pretrained=False`` throughout)."""
import copy
import importlib
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import rwp_kernels
from _optim_common import BACKEND_PARAMS, CPU_BACKENDS, one_torch_thread  # noqa: F401
from rwp_kernels.optim import RWP, RWPSGD, freeze_bn_stats
from rwp_kernels.train.cli import main

TIMM_CNN = "test_efficientnet"
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, gamma=0.01, alpha=0.5)
SEED = 1234


def timm_cnn(channels_last=True, seed=0):
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    model = timm.create_model(TIMM_CNN, pretrained=False, num_classes=10, in_chans=3)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def image_batches(n=2, batch=4, size=16, channels_last=True):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g)
        out.append((x.contiguous(memory_format=torch.channels_last) if channels_last else x,
                    torch.randint(0, 10, (batch,), generator=g)))
    return out


def loss_backward(model, batch):
    x, y = batch
    F.cross_entropy(model(x), y).backward()


def rwp_steps(model, opt, pairs):
    """README's loop: clean pass, perturbed pass in the perturbed() window with frozen BN statistics, step."""
    model.train()
    for clean, perturbed in pairs:
        opt.zero_grad()
        loss_backward(model, clean)
        with opt.perturbed(), freeze_bn_stats(model):
            loss_backward(model, perturbed)
        opt.step()


def assert_same_state(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), f"{name}: max diff {(x.double() - y.double()).abs().max().item():.3g}"


# --- the training command -------------------------------------------------------------------------------

def run_main(tmp_path, monkeypatch, *args):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return main(["--no-progress", "--out-dir", str(tmp_path / "out"), *args])


@pytest.mark.slow
def test_timm_cnn_trains_through_the_command(tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    code = run_main(tmp_path, monkeypatch, "--dataset", "synthetic", "--synthetic-train", "64", "--synthetic-size",
                    "16", "--batch-size", "32", "--epochs", "1", "--optimizer", "sgd", "rwp", "--channels-last",
                    "--model", f"timm:{TIMM_CNN}", "--backend", CPU_BACKENDS[-1])
    assert code == 0, capsys.readouterr().err
    experiment = tmp_path / "out" / f"synthetic-timm-{TIMM_CNN}"
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["settings"]["model"] == f"timm:{TIMM_CNN}"
    assert {r["optimizer"] for r in summary["results"]} == {"sgd", "rwp"}
    for method in ("sgd", "rwp"):
        record = json.loads((experiment / f"{method}-seed0" / "log.jsonl").read_text().splitlines()[-1])
        assert record["epoch"] == 1 and torch.isfinite(torch.tensor(record["train_loss"]))
        ckpt = torch.load(experiment / f"{method}-seed0" / "checkpoint.pt", weights_only=True)
        assert ckpt["model"]["conv_stem.weight"].shape[1] == 3, "a timm network, built for the dataset"


def test_build_network_builds_timm_for_the_dataset():
    timm = pytest.importorskip("timm")
    from rwp_kernels.train.data import load_data
    from rwp_kernels.train.netbuild import build_network

    data = load_data("digits")  # 1 channel, 10 classes
    net = build_network(f"timm:{TIMM_CNN}", data)
    assert type(net).__module__.startswith("timm.")
    assert net.conv_stem.in_channels == 1 and net.num_classes == 10
    assert build_network(f"timm:{TIMM_CNN}.r160_in1k", data).num_classes == 10, "a pretrained tag is accepted"
    assert timm.__version__


@pytest.mark.parametrize("model,message", [
    ("timm:nope", "unknown model 'timm:nope': timm "),
    ("timm:resnet10", "did you mean timm:resnet10t"),
    ("timm:", "unknown model 'timm:'"),
    (f"timm:{TIMM_CNN}.nope", "has no pretrained tag 'nope' for test_efficientnet (it has: r160_in1k;"),
    ("timm:test_vit", "--model timm:test_vit does not run on digits images: Input height (8)"),  # an assertion
])
def test_bad_timm_model_fails_fast_with_one_line(tmp_path, monkeypatch, capsys, model, message):
    pytest.importorskip("timm")
    assert run_main(tmp_path, monkeypatch, "--model", model) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("rwp_kernels.train: error:"), captured.err
    assert "epoch" not in captured.out


def test_timm_model_without_timm_fails_fast(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    assert run_main(tmp_path, monkeypatch, "--model", "timm:resnet10t") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["rwp_kernels.train: error: --model timm:resnet10t needs timm: pip install timm"]


# --- RWPSGD on a timm CNN against the ops by hand ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_rwpsgd_on_timm_cnn_matches_the_ops_by_hand(backend):
    """Two RWPSGD steps on a channels_last timm CNN give bit for bit the weights (and BN statistics) of the
    README's recipe with perturb_/sgd_step_: same seed, param_index = position in the optimizer's order,
    step = number of completed steps, the mix as p.grad * (1 - alpha) / alpha + g_p, then times alpha."""
    model = timm_cnn()
    twin, other = copy.deepcopy(model), copy.deepcopy(model)
    data = image_batches(4)
    pairs = [(data[0], data[1]), (data[2], data[3])]
    a = HYPER["alpha"]

    opt = RWPSGD(model.parameters(), **HYPER, seed=SEED, backend=backend)
    rwp_steps(model, opt, pairs)
    assert opt.steps == 2

    params = list(twin.parameters())
    assert any(p.dim() == 4 and not p.is_contiguous() for p in params), "channels_last weights"
    backups = [torch.empty_like(p) for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    twin.train()
    for t, (clean, perturbed) in enumerate(pairs):
        for p in params:
            p.grad = None
        loss_backward(twin, clean)
        with torch.no_grad():
            rwp_kernels.perturb_(params, gamma=HYPER["gamma"], seed=SEED, step=t, backups=backups,
                                 grads=[p.grad for p in params], grad_scale=(1 - a) / a, backend=backend)
        with freeze_bn_stats(twin):
            loss_backward(twin, perturbed)
        with torch.no_grad():
            rwp_kernels.sgd_step_(params, [p.grad for p in params], buffers, lr=HYPER["lr"],
                                  momentum=HYPER["momentum"], weight_decay=HYPER["weight_decay"], grad_scale=a,
                                  backups=backups, is_first_step=(t == 0), backend=backend)
    assert_same_state(model, twin)
    rwp_steps(other, RWPSGD(other.parameters(), **HYPER, seed=SEED + 1, backend=backend), pairs)
    assert not torch.equal(other.conv_stem.weight, twin.conv_stem.weight), "the noise matters"
    for p, buf in zip(model.parameters(), buffers):
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)


# --- timm's optimizer factory -----------------------------------------------------------------------------

@pytest.fixture
def timm_optim():
    timm = pytest.importorskip("timm")
    from rwp_kernels.integrations.timm import register_timm_optimizers

    try:
        names = register_timm_optimizers()
    except RuntimeError as err:  # a timm without an optimizer registry
        pytest.skip(str(err))
    assert names == ["rwpsgd", "arwpsgd", "rwpadamw"]
    assert register_timm_optimizers() == names, "registering twice is harmless"
    return timm.optim


def groups_without_params(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_factory_rwpsgd_matches_rwpsgd_on_the_same_groups(timm_optim, backend):
    model = timm_cnn()
    twin = copy.deepcopy(model)
    opt = timm_optim.create_optimizer_v2(model, "rwpsgd", **HYPER, seed=SEED, backend=backend)
    assert type(opt) is RWPSGD and opt.seed == SEED and opt.backend == backend

    # timm's groups: the 1-D parameters (norm weights, biases) first, without weight decay, then the rest.
    # Both carry the RWP hyperparameters: the constructor's keywords are the defaults of every group, so the
    # 1-D parameters are perturbed with the same gamma.
    groups = opt.param_groups
    assert len(groups) == 2
    assert all(p.dim() <= 1 for p in groups[0]["params"]) and all(p.dim() > 1 for p in groups[1]["params"])
    assert [g["weight_decay"] for g in groups] == [0.0, HYPER["weight_decay"]]
    for g in groups:
        assert (g["lr"], g["momentum"], g["nesterov"]) == (HYPER["lr"], HYPER["momentum"], False)
        assert (g["gamma"], g["alpha"], g["adaptive"]) == (HYPER["gamma"], HYPER["alpha"], False)

    same = timm_optim.param_groups_weight_decay(twin, HYPER["weight_decay"])
    direct = RWPSGD(same, **{**HYPER, "weight_decay": 0.0}, seed=SEED, backend=backend)
    assert groups_without_params(direct) == groups_without_params(opt)
    data = image_batches(4)
    pairs = [(data[0], data[1]), (data[2], data[3])]
    rwp_steps(model, opt, pairs)
    rwp_steps(twin, direct, pairs)
    assert_same_state(model, twin)
    assert opt.state_dict()["rwp"] == direct.state_dict()["rwp"]


def test_factory_variants(timm_optim):
    model = timm_cnn(channels_last=False)
    arwp = timm_optim.create_optimizer_v2(model, "arwpsgd", lr=0.1, weight_decay=1e-3, eta=0.2, foreach=True)
    assert type(arwp) is RWPSGD and all(g["adaptive"] and g["eta"] == 0.2 for g in arwp.param_groups)
    assert all(g["momentum"] == 0.9 for g in arwp.param_groups), "timm's default momentum"
    plain = timm_optim.create_optimizer_v2(model, "rwpsgd", lr=0.1)  # no weight decay: one group
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["gamma"] == 0.01
    adamw = timm_optim.create_optimizer_v2(model, "rwpadamw", lr=1e-3, weight_decay=0.05, eps=1e-7,
                                           betas=(0.8, 0.99), gamma=0.005)
    assert type(adamw) is RWP and type(adamw.base_optimizer) is torch.optim.AdamW
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.0, 0.05]
    assert all(g["gamma"] == 0.005 and g["eps"] == 1e-7 and g["betas"] == (0.8, 0.99) for g in adamw.param_groups)
    # param_group_fn: the documented way to leave the 1-D parameters unperturbed
    def no_noise_on_1d(m):
        return [{"params": [p for p in m.parameters() if p.dim() > 1]},
                {"params": [p for p in m.parameters() if p.dim() <= 1], "gamma": 0.0, "weight_decay": 0.0}]
    opt = timm_optim.create_optimizer_v2(model, "rwpsgd", lr=0.1, weight_decay=1e-3, param_group_fn=no_noise_on_1d)
    assert [g["gamma"] for g in opt.param_groups] == [0.01, 0.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    assert {"rwpsgd", "arwpsgd", "rwpadamw"} <= set(timm_optim.list_optimizers("*rwp*"))


def test_register_refuses_a_foreign_optimizer_of_the_same_name(timm_optim):
    from timm.optim._optim_factory import OptimInfo, OptimizerRegistry

    from rwp_kernels.integrations.timm import register_timm_optimizers

    registry = OptimizerRegistry()
    registry.register(OptimInfo(name="rwpsgd", opt_class=torch.optim.SGD))
    with pytest.raises(ValueError, match="already has an optimizer named 'rwpsgd'"):
        register_timm_optimizers(registry)
    assert registry.list_optimizers() == ["rwpsgd"], "nothing registered"


def test_integrations_import_without_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    for name in [m for m in sys.modules if m.startswith("rwp_kernels.integrations")]:
        monkeypatch.delitem(sys.modules, name)
    module = importlib.import_module("rwp_kernels.integrations")
    with pytest.raises(ImportError, match="pip install timm"):
        module.register_timm_optimizers()


@pytest.mark.slow
def test_docs_example_runs(tmp_path):
    """docs/integrations.md's timm example, as a user would copy it."""
    pytest.importorskip("timm")
    from _doc_examples import run_example

    done = run_example("timm-factory", tmp_path, timeout=300)
    assert "RWPSGD [(29, 0.0, 0.01), (15, 0.001, 0.01)]" in done.stdout and "steps: 2, perturbed: False" in done.stdout
