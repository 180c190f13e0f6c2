"""Fused trials: each member trains exactly as it would alone, and the study machinery holds."""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import TrialState

from hpo.data.splits import DataCache
from hpo.errors import SpecError
from hpo.spec.loading import load_spec
from hpo.spec.params import Params
from hpo.spec.schema import DataSpec
from hpo.training.fused import FusedGroup
from hpo.training.models import build_model
from hpo.training.trainer import Trainer
from tests.conftest import invoke, small_spec

CPU = torch.device("cpu")
EPOCHS = 3
EPOCHS_LONG = 12


@pytest.fixture(scope="module")
def digits() -> DataCache:
    return DataCache(DataSpec("digits"), seed=0, device=CPU)


def unfused_curve(cache: DataCache, p: Params, seed: int, epochs: int = EPOCHS) -> list[dict[str, float]]:
    torch.manual_seed(seed)
    data = cache.get(p.scaling)
    t = Trainer(build_model("mlp", p, data.input_shape, data.n_outputs), p, data, epochs, CPU, seed)
    return [r.val for r in t.fit()]


def fused_curves(cache: DataCache, members: list[tuple[Params, int]], epochs: int = EPOCHS,
                 remove_after: dict[int, int] | None = None, kernels: bool | None = None
                 ) -> dict[int, list[dict[str, float]]]:
    """Train members fused; `remove_after` {member: epoch} drops a member after that epoch."""
    group = FusedGroup(cache.get(members[0][0].scaling), CPU, kernels)
    for i, (p, seed) in enumerate(members):
        group.add(i, p, seed, epochs)
    curves: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(members))}
    for epoch in range(epochs):
        group.train_epoch()
        vals = group.evaluate(group.data.val)
        group.after_epoch([v["loss"] for v in vals])
        for m, v in zip(group.members, vals):
            curves[m.key].append(v)
        drop = [j for j, m in enumerate(group.members) if (remove_after or {}).get(m.key) == epoch]
        group.remove(drop)
    return curves


def assert_same(fused: list[dict[str, float]], alone: list[dict[str, float]]) -> None:
    assert len(fused) == len(alone)
    for f, a in zip(fused, alone):
        assert f["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert f["accuracy"] == pytest.approx(a["accuracy"], rel=1e-4)


GROUPS = {
    "adam": [Params(optimizer="adam", lr=3e-3, beta1=0.85, width=32, depth=2),
             Params(optimizer="adam", lr=1e-3, weight_decay=1e-3, beta2=0.99, width=32, depth=2, scheduler="cosine"),
             Params(optimizer="adam", lr=5e-3, width=32, depth=2, scheduler="onecycle", init="kaiming")],
    # BatchNorm with Adam on min-max scaled inputs. Standard scaling turns a pixel that is 0 across
    # a whole batch into a nonzero constant; BatchNorm cancels a constant input's contribution, so
    # that weight's gradient is pure rounding noise, which Adam scales up to lr-sized steps. Fused
    # and unfused kernels round differently on some CPUs (an AMD EPYC here: 1e-3 apart after 3
    # epochs), so the comparison there is of noise. Min-max scaling keeps such a pixel at 0: an
    # exact zero gradient in both runs.
    "adamw": [Params(optimizer="adamw", lr=2e-3, weight_decay=0.05, norm="batch", width=32, depth=2, scaling="minmax"),
              Params(optimizer="adamw", lr=4e-3, weight_decay=0.0, norm="batch", width=32, depth=2, scheduler="step",
                     step_gamma=0.5, scaling="minmax")],
    "momentum": [Params(optimizer="momentum", lr=0.05, momentum=0.9, norm="layer", residual=True, width=32, depth=3),
                 Params(optimizer="momentum", lr=0.02, momentum=0.8, weight_decay=1e-4, norm="layer", residual=True,
                        width=32, depth=3, scheduler="plateau")],
    "nesterov": [Params(optimizer="nesterov", lr=0.03, momentum=0.95, width=32, depth=2, init="xavier"),
                 Params(optimizer="nesterov", lr=0.01, momentum=0.85, width=32, depth=2)],
    "sgd": [Params(optimizer="sgd", lr=0.1, width=32, depth=1), Params(optimizer="sgd", lr=0.05, width=32, depth=1,
                                                                        weight_decay=1e-3)],
    "rmsprop": [Params(optimizer="rmsprop", lr=1e-3, width=32, depth=2), Params(optimizer="rmsprop", lr=3e-4, width=32, depth=2)],
    "adagrad": [Params(optimizer="adagrad", lr=0.03, width=32, depth=2), Params(optimizer="adagrad", lr=0.01, width=32, depth=2)],
    # Width and depth differ per member: padded to the widest and deepest.
    "padded": [Params(optimizer="adam", lr=3e-3, width=16, depth=1),
               Params(optimizer="adam", lr=1e-3, width=48, depth=3, weight_decay=1e-3, scheduler="cosine"),
               Params(optimizer="adam", lr=2e-3, width=32, depth=2, init="kaiming")],
    # Width 64 equals digits' 64 inputs: only that member has a skip around its first block.
    "padded layer norm, residual": [
        Params(optimizer="momentum", lr=0.05, momentum=0.9, norm="layer", residual=True, width=64, depth=2),
        Params(optimizer="momentum", lr=0.02, momentum=0.8, norm="layer", residual=True, width=24, depth=3),
        Params(optimizer="momentum", lr=0.03, momentum=0.85, norm="layer", residual=True, width=40, depth=1)],
    "padded batch norm": [Params(optimizer="adamw", lr=2e-3, weight_decay=0.05, norm="batch", width=32, depth=2,
                                 scaling="minmax"),
                          Params(optimizer="adamw", lr=4e-3, norm="batch", width=48, depth=1, scheduler="onecycle",
                                 scaling="minmax")],
}


@pytest.mark.parametrize("name", list(GROUPS))
@pytest.mark.parametrize("kernels", [True, False], ids=["fused kernels", "stacked update"])
def test_fused_members_match_their_unfused_runs(digits: DataCache, name: str, kernels: bool) -> None:
    """Both updates: torch.optim's fused kernels per member (the CPU default) and the stacked
    update over all members (the GPU default, run here on the CPU)."""
    members = [(p, 100 + i) for i, p in enumerate(GROUPS[name])]
    curves = fused_curves(digits, members, kernels=kernels)
    for i, (p, seed) in enumerate(members):
        assert_same(curves[i], unfused_curve(digits, p, seed))


def test_each_member_drops_units_at_its_own_rate(digits: DataCache) -> None:
    # Dropout masks are drawn for all members at once; each keeps its own rate and scales the
    # units it keeps by 1 / (1 - p), so the expected activation is unchanged (inverted dropout).
    rates = [0.0, 0.1, 0.5, 0.9]
    group = FusedGroup(digits.get("standard"), CPU)
    for i, rate in enumerate(rates):
        group.add(i, Params(optimizer="adam", width=32, depth=1, dropout=rate), i, EPOCHS)
    mask = group._dropout_masks((len(rates), 256, 1024), 2)[1]
    for i, rate in enumerate(rates):
        kept = mask[i][mask[i] != 0]
        assert (mask[i] == 0).float().mean().item() == pytest.approx(rate, abs=0.005)
        assert torch.allclose(kept, torch.tensor(1 / (1 - rate)))
    assert not torch.equal(mask[2, 0], mask[2, 1])  # not one pattern repeated


def test_removing_a_member_leaves_the_others_unchanged(digits: DataCache) -> None:
    members = [(Params(optimizer="adam", lr=lr, width=32, depth=2, norm="batch"), 7 + i)
               for i, lr in enumerate([1e-3, 3e-3, 5e-3])]
    full = fused_curves(digits, members)
    cut = fused_curves(digits, members, remove_after={1: 0})  # member 1 pruned after epoch 0
    assert len(cut[1]) == 1
    for i in (0, 2):
        assert_same(cut[i], full[i])


def test_a_diverging_member_does_not_spoil_the_others(digits: DataCache) -> None:
    good = Params(optimizer="sgd", lr=0.01, width=256, depth=3, scaling="none")
    bad = Params(optimizer="sgd", lr=10.0, width=256, depth=3, scaling="none")  # diverges to NaN
    group = FusedGroup(digits.get("none"), CPU)
    group.add("good", good, 1, EPOCHS)
    group.add("bad", bad, 2, EPOCHS)
    curve = []
    for _ in range(EPOCHS):
        losses = group.train_epoch()
        vals = group.evaluate(group.data.val)
        curve.append(vals[0])
    assert not torch.isfinite(losses[1])
    assert_same(curve, unfused_curve(digits, good, 1))


def test_a_member_joining_or_leaving_resizes_the_group_without_touching_the_others(digits: DataCache) -> None:
    """Continuous batching across structures: a wider, deeper member joins after epoch 0 (the
    envelope grows) and leaves after epoch 1 (it shrinks back); the others follow their unfused
    curves throughout, and the late member follows its own."""
    narrow = [(Params(optimizer="adam", lr=lr, width=24, depth=1, norm="layer"), 20 + i)
              for i, lr in enumerate([1e-3, 4e-3])]
    wide = (Params(optimizer="adam", lr=2e-3, width=56, depth=3, norm="layer"), 30)
    group = FusedGroup(digits.get("standard"), CPU)
    for i, (p, seed) in enumerate(narrow):
        group.add(i, p, seed, EPOCHS)
    curves: dict[int, list[dict[str, float]]] = {0: [], 1: [], 2: []}
    for epoch in range(EPOCHS):
        if epoch == 1:
            group.add(2, wide[0], wide[1], EPOCHS)
            assert (group.width, group.depth) == (56, 3)
        group.train_epoch()
        vals = group.evaluate(group.data.val)
        group.after_epoch([v["loss"] for v in vals])
        for m, v in zip(group.members, vals):
            curves[m.key].append(v)
        if epoch == 1:
            group.remove([2])
            assert (group.width, group.depth) == (24, 1)
    for i, (p, seed) in enumerate(narrow):
        assert_same(curves[i], unfused_curve(digits, p, seed))
    assert_same(curves[2], unfused_curve(digits, wide[0], wide[1], epochs=1))


def test_a_padded_member_exports_its_own_shapes(digits: DataCache) -> None:
    group = FusedGroup(digits.get("standard"), CPU)
    group.add(0, Params(width=48, depth=3, norm="batch"), 1, 2)
    group.add(1, Params(width=16, depth=1, norm="batch"), 2, 2)
    group.train_epoch()
    # Its state (what its checkpoint and model file hold) loads into an unfused 16x1 MLP: every
    # shape must fit.
    small = build_model("mlp", group.members[1].params, group.data.input_shape, group.data.n_outputs)
    small.load_state_dict(group.member_state_dict(1))
    assert small.state_dict()["blocks.0.linear.weight"].shape == (16, 64)
    assert group.members[1].n_params == sum(t.numel() for t in small.parameters())
    # Its padding stayed exactly zero through a training epoch.
    flat = group.flat.detach()[1]
    own = sum(t.numel() for t in small.parameters())
    assert int((flat != 0).sum()) <= own


def test_a_checkpointed_member_resumes_in_a_group_of_another_envelope(digits: DataCache) -> None:
    """A retried member joins whatever group is forming: its checkpoint holds its own shapes."""
    from hpo.execution.fused_worker import _member_state, _resume

    p = Params(optimizer="adam", lr=3e-3, width=16, depth=1, norm="layer", scheduler="cosine")
    first = FusedGroup(digits.get("standard"), CPU)
    first.add("me", p, 5, EPOCHS)
    first.add("wide", Params(optimizer="adam", lr=1e-3, width=48, depth=3, norm="layer"), 6, EPOCHS)
    for _ in range(2):
        first.train_epoch()
        first.after_epoch([v["loss"] for v in first.evaluate(first.data.val)])
    first.members[0].epoch = 2
    state = _member_state(first, 0)

    second = FusedGroup(digits.get("standard"), CPU)
    second.add("other", Params(optimizer="adam", lr=2e-3, width=32, depth=2, norm="layer"), 7, EPOCHS)
    second.add("me", p, 5, EPOCHS)
    _resume(second, 1, state)
    assert second.members[1].resumed_from == 2 and second.members[1].epoch == 2
    second.train_epoch()
    resumed = second.evaluate(second.data.val)[1]
    assert_same([resumed], unfused_curve(digits, p, 5)[2:])


def test_members_must_share_the_update_rule(digits: DataCache) -> None:
    group = FusedGroup(digits.get("standard"), CPU)
    group.add(0, Params(width=32, optimizer="adam"), 1, 2)
    with pytest.raises(ValueError, match="must share the group's optimizer, batch_size"):
        group.add(1, Params(width=64, optimizer="momentum"), 2, 2)
    with pytest.raises(ValueError, match="must share the group's optimizer, batch_size"):
        group.add(1, Params(width=32, batch_size=32), 2, 2)


@pytest.mark.parametrize("pad", [False, True], ids=["grouped by structure", "padded"])
def test_fused_study_end_to_end(write_spec, runner, storage_url, pad: bool) -> None:
    """Fusion changes how trials run, not what the sampler explores: with the same seed, a fused
    study asks the same parameters as the one-at-a-time study, trials of every structure are in
    flight together, and each reports the same per-epoch values."""
    spec = small_spec(
        name="fused",
        data={"dataset": "digits"},
        space={"lr": {"low": 1e-4, "high": 1e-1, "log": True}, "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
               "width": [32, 64], "depth": [1, 2], "batch_size": 64, "optimizer": ["adam", "momentum"],
               "momentum": {"low": 0.8, "high": 0.99}},
        sampler={"name": "random"},
        pruner={"name": "median", "n_startup_trials": 3, "n_warmup_steps": 1},
        budget={"n_trials": 14, "epochs": 4},
        execution={"pad": pad},
    )
    result = invoke(runner, "run", write_spec(spec), "--storage", storage_url, "--fuse", "4")
    assert result.exit_code == 0, result.output
    assert "fused 4 trials at a time" in result.stderr
    assert ("width and depth padded per trial" in result.stderr) == pad
    alone = invoke(runner, "run", write_spec({**spec, "name": "alone"}, "alone.yaml"), "--storage", storage_url)
    assert alone.exit_code == 0, alone.output
    study = optuna.load_study(study_name="fused", storage=storage_url)
    trials = study.trials
    reference = optuna.load_study(study_name="alone", storage=storage_url).trials
    assert len(trials) == 14  # the budget holds exactly, refills included
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert any(t.state == TrialState.PRUNED for t in trials)
    assert [t.params for t in trials] == [t.params for t in reference]
    # The first four trials were in flight together, whatever their structure.
    assert len({(t.params["optimizer"], t.params["width"], t.params["depth"]) for t in trials[:4]}) > 1
    for t, ref in zip(trials, reference):
        assert t.user_attrs["fused_group_size"] == 4
        assert sorted(t.intermediate_values) == list(range(len(t.intermediate_values)))
        if t.state == TrialState.COMPLETE:
            assert len(t.intermediate_values) == 4
        common = sorted(set(t.intermediate_values) & set(ref.intermediate_values))
        assert common, f"trial {t.number} has no epoch in common with its one-at-a-time run"
        for step in common:
            assert t.intermediate_values[step] == pytest.approx(ref.intermediate_values[step], rel=1e-4)
    assert study.user_attrs["test"]["value"] > 0.5


@pytest.mark.parametrize("override,message", [
    ({"model": "cnn", "data": {"dataset": "npz", "path": "x.npz"}}, "fused training supports model: mlp only"),
    ({"space": {"lr": {"low": 1e-3, "high": 1e-2}, "optimizer": ["adam", "schedulefree_adamw"]}},
     "schedulefree_adamw cannot be fused"),
    ({"data": {"dataset": "digits", "cv_folds": 3}}, "does not combine with data.cv_folds"),
])
def test_what_cannot_be_fused_is_refused(write_spec, override, message) -> None:
    doc = small_spec(execution={"mode": "fused", "group_size": 4}, **override)
    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(doc))


def _long_trials(name: str, n_trials: int) -> dict:
    """A study whose trials share one structure and are long enough to interrupt mid-trial, with
    room to spare on a loaded machine (the interrupt lands at epoch 3 of EPOCHS_LONG)."""
    return small_spec(
        name=name,
        data={"dataset": "synthetic", "n_samples": 6000, "n_features": 64, "n_classes": 4},
        space={"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "width": 128, "depth": 2, "batch_size": 64},
        pruner={"name": "none"},
        budget={"n_trials": n_trials, "epochs": EPOCHS_LONG},
    )


@pytest.mark.slow  # over ~13 s on 2 cores
def test_ctrl_c_requeues_every_member_and_they_resume_fused(write_spec, tmp_path) -> None:
    import signal
    import subprocess
    import sys

    from tests.conftest import env_without_storage, wait_for

    spec = _long_trials("fusedint", n_trials=3)
    url = f"sqlite:///{tmp_path / 'fi.db'}"
    cmd = [sys.executable, "-m", "hpo", "run", str(write_spec(spec)), "--storage", url, "--fuse", "3",
           "--checkpoint-interval", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_without_storage(), cwd=tmp_path)

    def two_epochs() -> bool:
        try:
            ts = optuna.load_study(study_name="fusedint", storage=url).trials
        except Exception:
            return False
        # 3 reported epochs: epoch 2's checkpoint (written after its report) is on disk.
        return len(ts) == 3 and all(len(t.intermediate_values) >= 3 for t in ts)

    wait_for(two_epochs, "three fused members with 3 epochs each")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    states = [t.state for t in optuna.load_study(study_name="fusedint", storage=url).trials]
    assert states.count(TrialState.FAIL) == 3 and states.count(TrialState.WAITING) == 3
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env_without_storage(), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "Warning" not in rerun.stderr, rerun.stderr  # no library noise in the worker's output
    trials = optuna.load_study(study_name="fusedint", storage=url).trials
    retried = [t for t in trials if t.system_attrs.get("retry_history")]
    assert len(retried) == 3 and all(t.state == TrialState.COMPLETE for t in retried)
    for t in retried:
        assert t.user_attrs["resumed_from_epoch"] >= 2
        assert sorted(t.intermediate_values) == list(range(EPOCHS_LONG))


# ---- one checkpoint format: a trial interrupted in one mode resumes in the other --------------


@pytest.mark.parametrize("opt", ["adam", "momentum", "adagrad", "rmsprop"])
def test_an_unfused_checkpoint_resumes_fused_and_a_fused_one_unfused(digits: DataCache, opt: str) -> None:
    """Both continue exactly where the other left off: the same curve as an uninterrupted run."""
    from hpo.execution.fused_worker import _member_state, _resume
    from hpo.runtime.checkpoints import Envelope

    p = Params(optimizer=opt, lr=3e-3 if opt != "momentum" else 0.03, width=32, depth=2, scheduler="cosine")
    straight = unfused_curve(digits, p, 5, epochs=4)
    data = digits.get(p.scaling)

    # One at a time for 2 epochs -> its checkpoint -> a fused group for the other 2.
    torch.manual_seed(5)
    alone = Trainer(build_model("mlp", p, data.input_shape, data.n_outputs), p, data, 4, CPU, 5)
    alone.run_epoch()
    alone.run_epoch()
    envelope = Envelope(2, {"folds": [alone.state_dict()], "params": p.to_dict()})
    group = FusedGroup(data, CPU)
    group.add("other", Params(optimizer=opt, lr=1e-3, width=32, depth=2), 9, 4)
    group.add("me", p, 5, 4)
    _resume(group, 1, Envelope.from_dict(envelope.to_dict()))
    fused_rest = []
    for _ in range(2):
        group.train_epoch()
        vals = group.evaluate(group.data.val)
        group.after_epoch([v["loss"] for v in vals])
        fused_rest.append(vals[1])
    assert_same(fused_rest, straight[2:])

    # Fused for 2 epochs -> its checkpoint -> one at a time for the other 2.
    group = FusedGroup(data, CPU)
    group.add("me", p, 5, 4)
    group.add("other", Params(optimizer=opt, lr=1e-3, width=32, depth=2), 9, 4)
    for _ in range(2):
        group.train_epoch()
        group.after_epoch([v["loss"] for v in group.evaluate(group.data.val)])
    group.members[0].epoch = 2
    saved = Envelope.from_dict(_member_state(group, 0).to_dict())
    assert saved is not None and saved.epoch == 2
    torch.manual_seed(123)  # the fresh model's weights are replaced by the checkpoint's
    resumed = Trainer(build_model("mlp", p, data.input_shape, data.n_outputs), p, data, 4, CPU, 99)
    resumed.load_state_dict(saved.state["folds"][0])
    assert_same([r.val for r in resumed.fit()], straight[2:])


@pytest.mark.slow  # ~15 s
@pytest.mark.parametrize("first_fused", [False, True], ids=["one at a time, then fused", "fused, then one at a time"])
def test_a_study_interrupted_in_one_mode_resumes_in_the_other(write_spec, tmp_path, first_fused: bool) -> None:
    import signal
    import subprocess
    import sys

    from tests.conftest import env_without_storage, wait_for

    spec = _long_trials("modes", n_trials=2)
    url = f"sqlite:///{tmp_path / 'modes.db'}"
    base = [sys.executable, "-m", "hpo", "run", str(write_spec(spec)), "--storage", url, "--checkpoint-interval", "0"]
    fused, alone = base + ["--fuse", "2"], base
    proc = subprocess.Popen(fused if first_fused else alone, stderr=subprocess.PIPE, text=True,
                            env=env_without_storage(), cwd=tmp_path)

    def three_epochs() -> bool:
        try:
            ts = optuna.load_study(study_name="modes", storage=url).trials
        except Exception:
            return False
        return bool(ts) and all(len(t.intermediate_values) >= 3 for t in ts) and len(ts) == (2 if first_fused else 1)

    wait_for(three_epochs, "3 reported epochs")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    rerun = subprocess.run(alone if first_fused else fused, capture_output=True, text=True,
                           env=env_without_storage(), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    trials = optuna.load_study(study_name="modes", storage=url).trials
    retried = [t for t in trials if t.system_attrs.get("retry_history")]
    assert retried and len(retried) == (2 if first_fused else 1)
    for t in retried:
        assert t.state == TrialState.COMPLETE
        assert t.user_attrs["resumed_from_epoch"] >= 2, t.user_attrs
        assert sorted(t.intermediate_values) == list(range(EPOCHS_LONG))
        assert len(t.user_attrs["train_loss"]) == EPOCHS_LONG  # the curves before the interruption are kept
