"""The checkpoint folder's rules: which checkpoint a re-run resumes from, the folder's name, and
samplers whose order depends on the epoch only (the kill-and-resume runs: test_training_resume.py)."""

import json

import pytest

from refine_af_pipeline.training.checkpoints import (
    Checkpoints,
    epoch_seeded_length_sampler,
    epoch_seeded_repeat_sampler,
    trainer_save_args,
    training_fingerprint,
)

pytestmark = pytest.mark.unit


def _checkpoint(checkpoints: Checkpoints, step: int, state_ok: bool = True, step_state: bool = True) -> None:
    folder = checkpoints.folder / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}) if state_ok else '{"global_st')
    if step_state:
        checkpoints.write_state(step, {"step": step})


def test_the_newest_complete_checkpoint_is_resumed(tmp_path):
    checkpoints = Checkpoints(tmp_path / "ck", 2)
    assert checkpoints.latest() is None and checkpoints.latest_step() == 0
    _checkpoint(checkpoints, 2)
    _checkpoint(checkpoints, 4)
    _checkpoint(checkpoints, 6, state_ok=False)  # killed while writing its trainer state
    _checkpoint(checkpoints, 8, step_state=False)  # our state of step 8 never reached the disk
    (checkpoints.folder / "checkpoint-x").mkdir()
    assert checkpoints.latest() == checkpoints.folder / "checkpoint-4"
    assert checkpoints.latest_step() == 4 and checkpoints.read_state(4) == {"step": 4}


def test_old_step_states_are_pruned_and_discard_removes_the_folder(tmp_path):
    checkpoints = Checkpoints(tmp_path / "ck", 1)
    for step in range(1, 11):
        checkpoints.write_state(step, {"step": step})
    kept = sorted(int(p.stem.split("-")[1]) for p in (checkpoints.folder / "step_state").glob("*.json"))
    assert kept == [6, 7, 8, 9, 10]
    assert not list((checkpoints.folder / "step_state").glob("*.tmp"))
    checkpoints.discard()
    assert not checkpoints.folder.exists()


def test_the_fingerprint_depends_on_what_the_training_is_made_of():
    base = training_fingerprint(settings={"lr": 1e-3, "seed": 0}, data=[("a", "b")], model="m")
    assert base == training_fingerprint(model="m", data=[("a", "b")], settings={"seed": 0, "lr": 1e-3})
    assert base != training_fingerprint(settings={"lr": 1e-3, "seed": 0}, data=[("a", "c")], model="m")
    assert base != training_fingerprint(settings={"lr": 1e-3, "seed": 1}, data=[("a", "b")], model="m")
    assert len(base) == 16


def test_trainer_saves_only_with_an_interval(tmp_path):
    assert trainer_save_args(None) == {"save_strategy": "no"}
    assert trainer_save_args(Checkpoints(tmp_path, 0)) == {"save_strategy": "no"}
    args = trainer_save_args(Checkpoints(tmp_path, 5))
    assert args["save_strategy"] == "steps" and args["save_steps"] == 5 and args["output_dir"] == str(tmp_path)
    assert args["save_only_model"] is False  # optimizer, scheduler and RNG states: the same trajectory on resume


def test_the_repeat_sampler_order_is_a_function_of_the_epoch():
    from trl.trainer.utils import RepeatSampler

    data = list(range(12))
    sampler = epoch_seeded_repeat_sampler(RepeatSampler(data, 2, batch_size=4, repeat_count=1, seed=3), seed=3)
    orders = {}
    for epoch in [0, 1, 2, 1, 0]:
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert orders.setdefault(epoch, order) == order  # the same epoch, the same order, whatever came before
    assert orders[0] != orders[1] != orders[2]
    assert sorted(orders[1]) == sorted(i for i in data for _ in range(2))


def test_the_length_grouped_sampler_order_is_a_function_of_the_epoch():
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [5, 9, 3, 12, 7, 7, 2, 10, 4, 8, 6, 11]
    sampler = epoch_seeded_length_sampler(LengthGroupedSampler(4, lengths=lengths), seed=0)
    sampler.set_epoch(1)
    first = list(sampler)
    torch.manual_seed(123)  # the global RNG no longer decides the order
    sampler.set_epoch(0)
    list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == first and sorted(first) == list(range(12))
