"""Explanation metrics on hand-computed cases (pure functions, no model)."""
import numpy as np
import pytest
import torch

from fal_d2.explain.faithfulness import gaussian_blur, mask_fill
from fal_d2.explain.metrics import (
    average_drop,
    budget_saliency,
    coverage,
    curve_auc,
    deletion_scores,
    drop_per_image,
    explanation_images,
    increase_in_confidence,
    increase_per_image,
    insertion_scores,
    normalize_saliency,
    ranked_pixel_masks,
    win_rate,
)


@pytest.mark.parametrize(
    "y, o, drop, increase",
    [
        (0.5, 0.8, 0.0, 100.0),  # O > Y: no drop, an increase
        (0.5, 0.5, 0.0, 0.0),  # O = Y: neither
        (0.5, 0.0, 100.0, 0.0),  # O = 0: the whole confidence is lost
        (0.8, 0.2, 75.0, 0.0),
        (0.0, 0.3, 0.0, 100.0),  # Y = 0: nothing to lose
    ],
)
def test_single_image_cases(y, o, drop, increase):
    assert drop_per_image([y], [o]) == pytest.approx([drop])
    assert increase_per_image([y], [o]) == pytest.approx([increase])


def test_mixed_batch_averages():
    y = torch.tensor([0.8, 0.5, 0.4, 0.6])
    o = torch.tensor([0.9, 0.5, 0.0, 0.3])
    assert drop_per_image(y, o) == pytest.approx([0.0, 0.0, 100.0, 50.0], rel=1e-6)
    assert average_drop(y, o) == pytest.approx(37.5, rel=1e-6)
    assert increase_in_confidence(y, o) == pytest.approx(25.0)
    # Per-image values sum to the same metric over any split: streaming sums are exact.
    streamed = drop_per_image(y[:1], o[:1]).sum() + drop_per_image(y[1:], o[1:]).sum()
    assert streamed / 4 == pytest.approx(average_drop(y, o))


def test_win_rate_counts_ties_for_neither():
    drop_a = [0.0, 10.0, 5.0, 0.0]
    drop_b = [5.0, 10.0, 0.0, 0.0]
    assert win_rate(drop_a, drop_b) == pytest.approx(25.0)
    assert win_rate(drop_b, drop_a) == pytest.approx(25.0)


@pytest.mark.parametrize(
    "y, o, message",
    [([0.5, 0.5], [0.5], "shapes"), ([[0.5]], [[0.5]], "1-D"), ([], [], "zero images")],
)
def test_bad_confidences_are_rejected(y, o, message):
    with pytest.raises(ValueError, match=message):
        average_drop(y, o)


def test_normalize_saliency_min_max_and_constant_maps():
    saliency = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]])
    normalized = normalize_saliency(saliency, (2, 2))
    assert torch.allclose(normalized[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(normalized[1], torch.zeros(2, 2))  # constant map -> zeros
    assert normalize_saliency(saliency, (8, 6)).shape == (2, 8, 6)


def test_normalize_saliency_crops_the_padding():
    # A 2x2 map covering a 4x4 padded batch; the image is its top 2x4. Upsampled rows are
    # 0, 0.25, 0.75, 1; the crop keeps 0 and 0.25, which min-max stretches to 0 and 1.
    saliency = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    normalized = normalize_saliency(saliency, (2, 4), padded_size=(4, 4))
    assert torch.allclose(normalized, torch.tensor([[[0.0] * 4, [1.0] * 4]]))


def test_explanation_images_multiply_in_pixel_space():
    images = torch.full((2, 3, 2, 2), 200, dtype=torch.uint8)
    saliency = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]]).expand(2, 2, 2)
    explained = explanation_images(images, saliency)
    assert explained.dtype == torch.float32
    assert torch.allclose(explained[1, 2], torch.tensor([[0.0, 100.0], [200.0, 50.0]]))
    assert explanation_images(images[0], saliency[0]).shape == (3, 2, 2)
    with pytest.raises(ValueError, match="does not match"):
        explanation_images(images, saliency[:, :1])


def test_normalized_convention_multiplies_the_normalised_image():
    """E = fill + S (I - fill) is S times the normalised image once the model normalises it:
    masked pixels become the mean colour (pytorch-grad-cam's multiply_tensor_with_cam)."""
    mean, std = torch.tensor([120.0, 110.0, 100.0]), torch.tensor([50.0, 60.0, 70.0])
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    saliency = torch.rand(2, 4, 4)
    explained = explanation_images(images, saliency, fill=mean)

    def normalise(x):
        return (x - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)

    expected = normalise(images.float()) * saliency[:, None]
    assert torch.allclose(normalise(explained), expected, atol=1e-5)
    blank = explanation_images(images, torch.zeros(2, 4, 4), fill=mean)
    assert torch.allclose(blank, mean.view(1, 3, 1, 1).expand(2, 3, 4, 4))


def test_budget_modes_keep_the_top_pixels_at_one_or_at_their_values():
    saliency = torch.tensor([[[0.9, 0.1], [0.5, 0.7]], [[0.3, 0.2], [0.0, 1.0]]])
    binary = budget_saliency(saliency, 50)  # the default mode
    assert torch.equal(binary, torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]))
    assert torch.equal(budget_saliency(saliency, 50, "binary"), binary)
    valued = budget_saliency(saliency, 50, "valued")
    assert torch.equal(valued, torch.tensor([[[0.9, 0.0], [0.0, 0.7]], [[0.3, 0.0], [0.0, 1.0]]]))
    assert torch.equal(budget_saliency(saliency, 25, "valued")[0],
                       torch.tensor([[0.9, 0.0], [0.0, 0.0]]))
    assert torch.equal(budget_saliency(saliency, 100, "valued"), saliency)
    assert torch.equal(budget_saliency(saliency, 100, "binary"), torch.ones_like(saliency))
    assert coverage(saliency).tolist() == pytest.approx([0.55, 0.375])
    assert coverage(valued).tolist() == pytest.approx([0.4, 0.325])
    assert coverage(binary).tolist() == pytest.approx([0.5, 0.5])  # the same area for every map
    for bad in (0, -5, 101):
        with pytest.raises(ValueError, match=r"budget must be in \(0, 100\]"):
            budget_saliency(saliency, bad)
    with pytest.raises(ValueError, match=r"budget mode 'soft'; expected one of \('binary', "
                                         r"'valued'\)"):
        budget_saliency(saliency, 50, "soft")


def test_mask_fill_of_each_convention():
    model = torch.nn.Module()
    model.register_buffer("pixel_mean", torch.tensor([1.0, 2.0, 3.0]).view(-1, 1, 1))
    assert mask_fill(model, "normalized").tolist() == [1.0, 2.0, 3.0]
    assert mask_fill(model, "pixel") is None
    with pytest.raises(ValueError, match=r"'black'; expected one of \('normalized', 'pixel'\)"):
        mask_fill(model, "black")
    with pytest.raises(TypeError, match="no pixel_mean"):
        mask_fill(torch.nn.Module(), "normalized")


def test_ranked_pixel_masks_follow_saliency_order():
    saliency = torch.tensor([[0.1, 0.4], [0.3, 0.2]])
    masks = ranked_pixel_masks(saliency, steps=4)
    expected = [[[0, 0], [0, 0]], [[0, 1], [0, 0]], [[0, 1], [1, 0]], [[0, 1], [1, 1]],
                [[1, 1], [1, 1]]]
    assert torch.equal(masks, torch.tensor(expected, dtype=torch.float32))
    assert ranked_pixel_masks(saliency, steps=2).sum(dim=(1, 2)).tolist() == [0, 2, 4]


def test_curve_auc_trapezoid():
    assert curve_auc([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert curve_auc([1.0, 0.0]) == pytest.approx(0.5)
    assert curve_auc(np.array([[0.0, 0.5, 1.0], [1.0, 0.0, 0.0]])) == pytest.approx([0.5, 0.25])
    with pytest.raises(ValueError, match="T >= 1"):
        curve_auc([1.0])


def test_deletion_and_insertion_curves_with_a_callable():
    image = torch.full((3, 2, 2), 255.0)
    saliency = torch.tensor([[0.9, 0.1], [0.5, 0.7]])

    def brightness(images):  # a "model" whose score is the mean brightness
        return images.mean(dim=(1, 2, 3)) / 255.0

    deletion = deletion_scores(brightness, image, saliency, steps=2)
    assert deletion.tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert curve_auc(deletion) == pytest.approx(0.5)
    insertion = insertion_scores(brightness, image, saliency, torch.zeros_like(image), steps=4)
    assert insertion.tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # deleted pixels take the fill (the mean colour) instead of black
    grey = torch.tensor([127.5, 127.5, 127.5])
    assert deletion_scores(brightness, image, saliency, 2, grey).tolist() == pytest.approx(
        [1.0, 0.75, 0.5])


def test_gaussian_blur_keeps_constants_and_smooths_edges():
    constant = torch.full((2, 3, 9, 9), 7.0)
    assert torch.allclose(gaussian_blur(constant), constant)
    step = torch.zeros(1, 1, 9, 9)
    step[..., 5:] = 1.0
    blurred = gaussian_blur(step, kernel_size=5, sigma=1.0)
    assert 0.0 < blurred[0, 0, 4, 4] < 1.0
    assert float(blurred.sum()) == pytest.approx(float(step.sum()), rel=0.1)
