"""LeNet-5 architecture and the batch augmentation."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from training.augment import AffineAugment  # noqa: E402
from training.data import NORMALIZATION  # noqa: E402
from training.model import EXPECTED_PARAMETERS, Deskew, ExportModule, LeNet5, count_parameters, lenet5  # noqa: E402

BACKGROUND = -NORMALIZATION.mean / NORMALIZATION.std


def test_parameter_count() -> None:
    assert count_parameters(LeNet5()) == EXPECTED_PARAMETERS == 61_706


@pytest.mark.parametrize("batch", [1, 7])
def test_output_shapes(batch: int) -> None:
    logits, probabilities = ExportModule(LeNet5()).eval()(torch.randn(batch, 1, 28, 28))
    assert logits.shape == probabilities.shape == (batch, 10)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(batch))


def test_deskew_adds_no_parameters_and_stands_a_leaning_bar_upright() -> None:
    assert count_parameters(lenet5(deskew=True)) == EXPECTED_PARAMETERS
    image = torch.full((2, 1, 28, 28), BACKGROUND)
    for y in range(4, 24):  # a bar leaning right by 0.4 px per row, and one standing upright
        x = round(14 + 0.4 * (y - 14))
        image[0, 0, y, x - 1:x + 2] = 2.0
        image[1, 0, y, 13:16] = 2.0
    upright = Deskew(BACKGROUND)(image)
    columns = [float((upright[0, 0, y] > 0).nonzero().float().mean()) for y in range(6, 22)]
    assert max(columns) - min(columns) <= 1.0  # was 6 px from top to bottom
    torch.testing.assert_close(upright[1], image[1], atol=1e-4, rtol=0)  # nothing to undo: unchanged
    blank = torch.full((1, 1, 28, 28), BACKGROUND)
    torch.testing.assert_close(Deskew(BACKGROUND)(blank), blank)


def test_layer_shapes() -> None:
    features = LeNet5().features(torch.zeros(2, 1, 28, 28))
    assert features.shape == (2, 16, 5, 5)


def test_augment_is_reproducible_and_keeps_background() -> None:
    augment = AffineAugment(background=BACKGROUND)
    images = torch.full((16, 1, 28, 28), BACKGROUND)
    images[:, :, 10:18, 12:16] = 2.0  # a bar of "ink" in the middle
    first = augment(images, torch.Generator().manual_seed(5))
    second = augment(images, torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert first.shape == images.shape
    # Pixels pulled in from outside the image are background, not zero.
    torch.testing.assert_close(first[:, :, 0, :], torch.full_like(first[:, :, 0, :], BACKGROUND))
    assert not torch.equal(first[0], first[1])  # each digit gets its own distortion


def test_augment_without_range_is_identity() -> None:
    augment = AffineAugment(background=BACKGROUND, max_rotation_deg=0, max_shift_px=0, scale_range=(1, 1))
    images = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(augment(images, torch.Generator().manual_seed(0)), images)


def test_augment_shift_moves_by_pixels() -> None:
    augment = AffineAugment(background=0.0, max_rotation_deg=0, max_shift_px=2, scale_range=(1, 1))
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 14, 14] = 1.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        moved = augment(image, generator)
        rows, cols = torch.nonzero(moved[0, 0] > 0.01, as_tuple=True)
        assert rows.min() >= 12 and rows.max() <= 16 and cols.min() >= 12 and cols.max() <= 16


def test_saved_teachers_load_as_the_network_they_are() -> None:
    # `--teachers-from` runs may hold LeNet-5s or wide teachers: each file loads into its own network.
    from training.model import WideTeacher, teacher_kind, teacher_model

    for made in (lenet5(), WideTeacher()):
        state = made.state_dict()
        loaded = teacher_model(teacher_kind(state))
        loaded.load_state_dict(state)
        assert type(loaded) is type(made)
