"""RA-Seg training: hard negatives, weighted case sampling, fine-tuning, resuming a finished run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radnode.models.candidates import Box
from radnode.models.raseg import RASeg, RASegConfig
from radnode.models.training.data import TrainingCase, prepare_case
from radnode.models.training.loop import PHANTOM_PREFIX, TrainConfig, TrainingError, make_batch, train_model
from radnode.models.training.transforms import BBOX, IMAGE, LABEL, negative_sample, training_transforms
from radnode.phantom import synthesize_volume

TINY = RASegConfig(channels=(4, 8, 16, 32), num_res_units=1, dropout=0.0)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantom_case() -> TrainingCase:
    volume = synthesize_volume(5, slices=40, tumors=1, matrix=256, tumor_types=("solid",))
    return prepare_case(f"{PHANTOM_PREFIX}-5", volume.image("hu"), volume.tumors > 0, lung=volume.lungs, negatives=True)


def test_hard_negatives_are_detector_boxes_away_from_the_tumour(phantom_case: TrainingCase) -> None:
    assert phantom_case.negatives, "the phantom's vessels and hilum give the detector runners-up"
    for box in phantom_case.negatives:
        assert not phantom_case.label[box.slices].any()
        assert all(0 <= a < b <= n for a, b, n in zip(box.start, box.stop, phantom_case.label.shape))


def test_negative_sample_marks_the_box_and_keeps_the_label() -> None:
    image = np.random.default_rng(0).random((20, 40, 40)).astype(np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[2:5, 2:6, 2:6] = 1  # away from the box
    image[label > 0] = 5.0
    box = Box((8, 18, 18), (12, 24, 26))
    sample = negative_sample(image, label, box, (16, 32, 32), np.random.default_rng(1))
    assert {k: tuple(v.shape) for k, v in sample.items()} == {k: (1, 16, 32, 32) for k in (IMAGE, LABEL, BBOX)}
    assert int(sample[BBOX].sum()) == int(np.prod(box.shape))  # the whole box lies in the patch
    # The image under the box is the image of the box (possibly flipped).
    inside = sample[IMAGE][sample[BBOX] > 0].numpy()
    assert np.allclose(np.sort(inside), np.sort(image[box.slices].ravel()))
    # Label and image move together: wherever the patch says tumour, the image is the tumour's.
    assert not (sample[LABEL] * sample[BBOX]).any()
    assert bool((sample[IMAGE][sample[LABEL] > 0] == 5.0).all())


def test_negative_sample_pads_a_grid_smaller_than_the_patch() -> None:
    image = np.ones((6, 10, 10), dtype=np.float32)
    sample = negative_sample(image, np.zeros(image.shape), Box((1, 2, 2), (4, 6, 6)), (8, 16, 16),
                             np.random.default_rng(0))
    assert tuple(sample[IMAGE].shape) == (1, 8, 16, 16) and int(sample[BBOX].sum()) == 3 * 4 * 4


def _case(case_id: str) -> TrainingCase:
    image = np.zeros((12, 24, 24), dtype=np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[4:8, 8:14, 8:14] = 1
    image[label > 0] = 1.0
    return TrainingCase(case_id, image, label, record=None, negatives=(Box((0, 0, 0), (3, 6, 6)),))  # type: ignore[arg-type]


def test_batches_mix_hard_negatives_in_at_the_configured_rate() -> None:
    config = TrainConfig(batch_size=1, patch_size=(8, 16, 16), negative_fraction=0.5, augment=False, seed=3)
    transforms = training_transforms(config.patch_size, (1.5, 1.0, 1.0), augment=False)
    negatives = 0
    for step in range(60):
        _, box, label = make_batch([_case("real")], transforms, config, step)
        # A negative sample marks a box that holds no tumour voxel of the patch.
        if box.sum() > 0 and not (label[box > 0] > 0).any():
            negatives += 1
    assert 15 <= negatives <= 45


def test_real_cases_are_drawn_by_their_weight() -> None:
    cases = [_case(f"{PHANTOM_PREFIX}-{i}") for i in range(4)] + [_case("LUNG1-x")]
    # Tell the cases apart by the image value they carry.
    cases[-1].image[cases[-1].label > 0] = 2.0
    transforms = training_transforms((8, 16, 16), (1.5, 1.0, 1.0), pos_fraction=1.0, augment=False)
    share = {}
    for weight in (1.0, 12.0):
        config = TrainConfig(batch_size=1, patch_size=(8, 16, 16), pos_fraction=1.0, augment=False,
                             real_case_weight=weight)
        real = sum(float(make_batch(cases, transforms, config, s)[0].max()) == 2.0 for s in range(150))
        share[weight] = real / 150
    assert share[1.0] == pytest.approx(0.2, abs=0.1)  # 1 of 5 cases
    assert share[12.0] == pytest.approx(0.75, abs=0.1)  # 12 / (12 + 4)


def test_fine_tuning_starts_from_the_given_weights(phantom_case: TrainingCase) -> None:
    torch.manual_seed(123)
    start = RASeg(TINY).state_dict()
    config = TrainConfig(steps=1, batch_size=1, learning_rate=1e-12, patch_size=(16, 32, 32), device="cpu",
                         num_threads=1, augment=False, seed=9)
    tuned = train_model([phantom_case], [], TINY, config, initial_state=start).model.state_dict()
    fresh = train_model([phantom_case], [], TINY, config).model.state_dict()
    name = next(k for k in start if k.endswith("weight") and start[k].ndim == 5)
    assert torch.allclose(tuned[name], start[name], atol=1e-6)
    assert not torch.allclose(fresh[name], start[name], atol=1e-3)


@pytest.mark.parametrize("bad", [{"negative_fraction": 1.0}, {"negative_fraction": -0.1}, {"real_case_weight": 0}])
def test_bad_sampling_settings_are_refused(bad: dict) -> None:
    with pytest.raises(TrainingError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_resuming_a_finished_run_leaves_its_checkpoint_alone(tmp_path, phantom_case: TrainingCase) -> None:
    config = TrainConfig(steps=2, batch_size=1, patch_size=(16, 32, 32), device="cpu", num_threads=1,
                         augment=False, checkpoint_every=1)
    first = train_model([phantom_case], [phantom_case], TINY, config, tmp_path)
    checkpoint = tmp_path / "last.pt"
    before = checkpoint.read_bytes()
    again = train_model([phantom_case], [phantom_case], TINY, config, tmp_path, resume=True)
    assert again.resumed_from == 2 and again.step == 2
    assert checkpoint.read_bytes() == before  # not rewritten: a parallel reader never sees it replaced
    assert again.val_history == first.val_history  # the validation is not recorded twice
