"""The training loop on real (small) data: every optimizer and schedule, checkpoints, failures."""

from __future__ import annotations

import io
import math

import pytest
import torch

from hpo.data.splits import DataCache
from hpo.runtime.endings import Deadlines, Diverged, TimeLimit
from hpo.spec.params import NORMS, OPTIMIZERS, SCHEDULERS, Params
from hpo.spec.schema import DataSpec
from hpo.training.models import build_model
from hpo.training.trainer import Trainer, evaluate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> DataCache:
    return DataCache(DataSpec("digits"), seed=0, device=CPU)


def make_trainer(cache: DataCache, p: Params, epochs: int = 3, seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    data = cache.get(p.scaling)
    model = build_model("mlp", p, data.input_shape, data.n_outputs)
    return Trainer(model, p, data, epochs, CPU, seed)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_learns_digits(digits: DataCache, optimizer: str) -> None:
    lr = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "adagrad": 0.05}.get(optimizer, 3e-3)
    t = make_trainer(digits, Params(optimizer=optimizer, lr=lr, width=64), epochs=4)
    before = evaluate(t.model, digits.get("standard").val, "classification", CPU)["accuracy"]
    results = t.fit()
    assert len(results) == 4
    assert results[-1].train_loss < results[0].train_loss
    assert results[-1].val["accuracy"] > max(0.8, before + 0.5)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_trains_and_moves_the_lr(digits: DataCache, scheduler: str) -> None:
    t = make_trainer(digits, Params(scheduler=scheduler, lr=0.05, optimizer="momentum"), epochs=4)
    lrs = []
    for _ in range(4):
        r = t.run_epoch()
        lrs.append(t.opt.param_groups[0]["lr"])
    assert r.val["accuracy"] > 0.8
    if scheduler in ("step", "cosine", "onecycle"):
        assert lrs[-1] < 0.05 * 0.9  # the schedule really changed the learning rate
    if scheduler == "none":
        assert lrs == [0.05] * 4


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("init", ["default", "kaiming", "xavier"])
def test_model_variants_train(digits: DataCache, norm: str, residual: bool, init: str) -> None:
    p = Params(norm=norm, residual=residual, init=init, depth=3, width=64, dropout=0.1, lr=5e-3)
    t = make_trainer(digits, p, epochs=4)
    assert t.fit()[-1].val["accuracy"] > 0.7


def test_resuming_from_a_checkpoint_matches_an_uninterrupted_run(digits: DataCache) -> None:
    p = Params(optimizer="adamw", scheduler="onecycle", dropout=0.2, width=48, batch_size=32)
    straight = make_trainer(digits, p, epochs=4, seed=7)
    full = [r.val["loss"] for r in straight.fit()]

    first = make_trainer(digits, p, epochs=4, seed=7)
    first.run_epoch()
    first.run_epoch()
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    del first
    torch.manual_seed(12345)  # whatever the process did meanwhile must not matter
    resumed = make_trainer(digits, p, epochs=4, seed=99)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert resumed.epoch == 2
    rest = [r.val["loss"] for r in resumed.fit()]
    assert rest == pytest.approx(full[2:], rel=1e-6)


def test_a_schedule_free_checkpoint_loads_with_weights_only_and_resumes_exactly(digits: DataCache) -> None:
    p = Params(optimizer="schedulefree_adamw", scheduler="plateau")
    full = [r.val["loss"] for r in make_trainer(digits, p, epochs=3, seed=4).fit()]
    t = make_trainer(digits, p, epochs=3, seed=4)
    t.run_epoch()
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    resumed = make_trainer(digits, p, epochs=3, seed=8)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert [r.val["loss"] for r in resumed.fit()] == pytest.approx(full[1:], rel=1e-6)


def test_divergence_is_detected(digits: DataCache) -> None:
    t = make_trainer(digits, Params(optimizer="sgd", lr=10.0, scaling="none", width=256, depth=3), epochs=5)
    with pytest.raises(Diverged, match="loss is (nan|inf)"):
        t.fit()


def test_deadline_stops_inside_an_epoch(digits: DataCache) -> None:
    t = make_trainer(digits, Params(batch_size=16), epochs=50)
    t.check = Deadlines(trial_limit=1.0, trial_deadline=0.0).check  # passed: the very next batch must stop
    with pytest.raises(TimeLimit):
        t.fit()
    assert t.epoch == 0


def test_same_seed_same_run(digits: DataCache) -> None:
    p = Params(dropout=0.3, width=32)
    a = [r.val["loss"] for r in make_trainer(digits, p, seed=5).fit()]
    b = [r.val["loss"] for r in make_trainer(digits, p, seed=5).fit()]
    c = [r.val["loss"] for r in make_trainer(digits, p, seed=6).fit()]
    assert a == b
    assert a != c


def test_scaling_is_fitted_on_train_only(digits: DataCache) -> None:
    data = digits.get("standard")
    means = data.train.x.mean(0)
    assert torch.allclose(means, torch.zeros_like(means), atol=1e-4)
    assert not torch.allclose(data.test.x.mean(0), torch.zeros_like(means), atol=1e-3)
    minmax = digits.get("minmax")
    assert float(minmax.train.x.min()) == 0.0 and float(minmax.train.x.max()) == 1.0
    assert math.isclose(len(data.train) + len(data.val) + len(data.test), 1797)
