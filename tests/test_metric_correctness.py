"""Explanation metrics against answers known by construction, not against our own code.

The toy classifier's class-0 logit is the sum of the normalised red channel over four known
pixels (EVIDENCE); class 1's logit is 0. Each image carries its own saliency map in its green
channel, with known ranks, so that for any mask S the confidence O = sigmoid(sum over EVIDENCE of
the masked normalised red) is computed here by hand, from the definitions:

* mean-colour fill ("normalized"): a masked pixel's normalised value is S * n;
* black fill ("pixel"): it is (S * I - MEAN) / STD;
* a binary budget of c pixels has S = 1 on the c highest-ranked pixels, a valued one S = the map.

These tests would fail if a budget scored the whole map, if the normalised convention masked to
black (in Average Drop or in deletion), if the budget mode were ignored, or if maps and images
of a batch were paired wrongly.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from conftest import make_tiny_cfg, tiny_detection_overrides
from fal_d2.explain import RandomSaliency, SaliencyMethod
from fal_d2.explain.metrics import budget_saliency, normalize_saliency, ranked_pixel_masks
from fal_d2.explain.random_map import GRID_SIZE
from fal_d2.explain.scoring import score_explanations

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 4  # images are SIDE x SIDE: 16 pixels, so a 25 % budget keeps 4 and a 50 % budget 8
MEAN, STD = 100.0, 50.0  # the toy model's pixel mean and std, the same in every channel
EVIDENCE = [(2, 2), (2, 3), (3, 2), (3, 3)]  # the pixels class 0's logit reads
LEVEL = "pixels"


class _IdentityBackbone(nn.Module):
    """One "level": the normalised image itself, so that a map's pixels are the image's."""

    def forward(self, images):
        return {LEVEL: images}

    def output_shape(self):
        return {LEVEL: ShapeSpec(channels=3, stride=1)}


class _EvidenceHead(nn.Module):
    def forward(self, features):
        red = features[LEVEL][:, 0]
        evidence = torch.stack([red[:, y, x] for y, x in EVIDENCE], dim=1).sum(dim=1)
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


class EvidenceClassifier(nn.Module):
    """Two classes; P(class 0) = sigmoid(sum of the normalised red channel over EVIDENCE)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pixel_mean", torch.full((3, 1, 1), MEAN), False)
        self.register_buffer("pixel_std", torch.full((3, 1, 1), STD), False)
        self.backbone = _IdentityBackbone()
        self.head = _EvidenceHead()

    def forward(self, batched_inputs):
        images = torch.stack([inputs["image"].float() for inputs in batched_inputs])
        logits = self.head(self.backbone((images - self.pixel_mean) / self.pixel_std))
        return [{"scores": scores} for scores in logits.softmax(dim=1)]


class GreenChannelMap(SaliencyMethod):
    """The map each image carries in its normalised green channel, optionally transformed."""

    needs_gradients = False

    def __init__(self, model, levels, transform=None):
        super().__init__(model, levels)
        self.transform = transform or (lambda values: values)

    def compute_maps(self, features, gradients, classes):
        return {level: self.transform(features[level][:, 1].clamp(0, 1)) for level in self.levels}


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


class ToyImage:
    """
    An image whose normalised red channel is ``red`` on EVIDENCE (0 elsewhere: irrelevant to the
    model) and whose map ranks EVIDENCE at ``evidence_ranks`` (0: most salient); the other
    pixels take the remaining ranks in raster order. The map is (15 - rank) / 15: distinct values,
    minimum 0 and maximum 1, so min-max normalisation leaves it as it is.
    """

    def __init__(self, red, evidence_ranks):
        self.red = np.zeros((SIDE, SIDE))
        self.rank = np.full((SIDE, SIDE), -1)
        for (y, x), value, rank in zip(EVIDENCE, red, evidence_ranks):
            self.red[y, x], self.rank[y, x] = value, rank
        others = iter(sorted(set(range(SIDE * SIDE)) - set(evidence_ranks)))
        for y, x in np.ndindex(SIDE, SIDE):
            if self.rank[y, x] < 0:
                self.rank[y, x] = next(others)
        self.map = (SIDE * SIDE - 1 - self.rank) / (SIDE * SIDE - 1)

    def inputs(self):
        blue = np.full((SIDE, SIDE), MEAN)
        image = np.stack([MEAN + STD * self.red, MEAN + STD * self.map, blue])
        return {"image": torch.tensor(image, dtype=torch.float32)}

    def confidence(self, mask, fill="normalized"):
        """P(class 0) on the image masked by ``mask`` (SIDE x SIDE), by the definitions above."""
        pixels = MEAN + STD * self.red
        masked = mask * self.red if fill == "normalized" else (mask * pixels - MEAN) / STD
        return _sigmoid(sum(masked[y, x] for y, x in EVIDENCE))

    @property
    def y(self):
        return self.confidence(np.ones((SIDE, SIDE)))

    def top(self, count):
        """1 on the ``count`` most salient pixels."""
        return (self.rank < count).astype(float)

    def budget_mask(self, percent, mode):
        top = self.top(round(SIDE * SIDE * percent / 100))
        return top if mode == "binary" else top * self.map

    def drop(self, o):
        return 100.0 * max(0.0, self.y - o) / self.y

    def curve_auc(self, steps, fill, insertion):
        """RISE deletion (or insertion onto the fill) AUC: steps of SIDE * SIDE / steps pixels."""
        scores = []
        for t in range(steps + 1):
            top = self.top(round(t * SIDE * SIDE / steps))
            scores.append(self.confidence(top if insertion else 1 - top, fill))
        return (sum(scores) - (scores[0] + scores[-1]) / 2) / steps


# A good map (the evidence ranked first), a poor one (ranked 5th to 8th) and a map that ranks one
# pixel of negative evidence last: keeping its top pixels raises the confidence.
GOOD = ToyImage(red=[1.0, 1.0, 1.0, 1.0], evidence_ranks=[0, 1, 2, 3])
POOR = ToyImage(red=[0.5, 0.5, 0.5, 0.5], evidence_ranks=[4, 5, 6, 7])
NEGATIVE = ToyImage(red=[1.0, 1.0, 1.0, -1.0], evidence_ranks=[0, 1, 2, 15])
IMAGES = [GOOD, POOR, NEGATIVE]


def _score(images=IMAGES, mode="binary", mask="normalized", transform=None, **kwargs):
    model = EvidenceClassifier()
    method = GreenChannelMap(model, [LEVEL], transform)
    scores = score_explanations(model, [image.inputs() for image in images], method,
                                mask=mask, budgets=[25, 50], budget_mode=mode, **kwargs)
    return scores, scores.levels[LEVEL]


def test_the_toy_construction_is_what_the_hand_computations_assume():
    scores, level = _score()
    assert scores.target_classes.tolist() == [0, 0, 0]
    assert scores.confidence == pytest.approx([image.y for image in IMAGES], rel=1e-6)
    for image, saliency in zip(IMAGES, level.saliency):
        assert saliency.numpy() == pytest.approx(image.map, abs=1e-6)


@pytest.mark.parametrize("mode", ["binary", "valued"])
@pytest.mark.parametrize("mask", ["normalized", "pixel"])
def test_budgeted_average_drop_and_increase_match_the_hand_computation(mode, mask):
    _, level = _score(mode=mode, mask=mask)
    for percent in (25, 50):
        budget = level.budgets[percent]
        expected_o = [image.confidence(image.budget_mask(percent, mode), mask)
                      for image in IMAGES]
        assert budget.explanation_confidence == pytest.approx(expected_o, rel=1e-5)
        assert budget.drop == pytest.approx(
            [image.drop(o) for image, o in zip(IMAGES, expected_o)], abs=1e-4)
        assert budget.increase.tolist() == [100.0 * (o > image.y + 1e-9)
                                            for image, o in zip(IMAGES, expected_o)]
    whole_o = [image.confidence(image.map, mask) for image in IMAGES]
    assert level.explanation_confidence == pytest.approx(whole_o, rel=1e-5)


def test_known_answers_of_the_binary_budget():
    """What the construction says without any arithmetic: the good map loses nothing at 25 %, the
    poor one keeps none of the evidence (O = sigmoid(0) = 0.5) at 25 % and all of it at 50 %, and
    dropping the negative evidence raises the confidence."""
    _, level = _score()
    top25, top50 = level.budgets[25], level.budgets[50]
    assert top25.drop[0] == pytest.approx(0.0, abs=1e-6)
    assert top25.explanation_confidence[1] == pytest.approx(0.5, abs=1e-6)
    assert top50.drop[1] == pytest.approx(0.0, abs=1e-6)
    assert top25.increase[2] == 100.0
    # The whole map keeps the evidence at its map values (54/15 of its 4), not at 1: a drop
    # where the 25 % budget has none.
    assert level.drop[0] == pytest.approx(GOOD.drop(_sigmoid(54 / 15)), rel=1e-4)
    assert level.drop[0] > 0.5


def test_budget_modes_differ_as_computed():
    """The good map's evidence has map values 1, 14/15, 13/15 and 12/15: binary keeps it whole,
    valued scales it to 54/15 of its 4."""
    binary = _score(mode="binary")[1].budgets[25]
    valued = _score(mode="valued")[1].budgets[25]
    assert binary.explanation_confidence[0] == pytest.approx(_sigmoid(4.0), rel=1e-6)
    assert valued.explanation_confidence[0] == pytest.approx(_sigmoid(54 / 15), rel=1e-5)
    assert valued.drop[0] == pytest.approx(GOOD.drop(_sigmoid(54 / 15)), rel=1e-4)


@pytest.mark.parametrize("mask", ["normalized", "pixel"])
def test_deletion_and_insertion_match_the_hand_computation(mask):
    steps = 4
    _, level = _score(mask=mask, auc_steps=steps, insertion_baseline="zero")
    assert level.deletion_auc == pytest.approx(
        [image.curve_auc(steps, mask, insertion=False) for image in IMAGES], rel=1e-5)
    assert level.insertion_auc == pytest.approx(
        [image.curve_auc(steps, mask, insertion=True) for image in IMAGES], rel=1e-5)


def test_every_image_is_scored_with_its_own_map_in_any_batch_order():
    forward = _score(auc_steps=4, insertion_baseline="zero")[1]
    backward = _score(images=IMAGES[::-1], auc_steps=4, insertion_baseline="zero")[1]
    for values, reversed_values in [
        (forward.budgets[25].drop, backward.budgets[25].drop),
        (forward.budgets[50].explanation_confidence, backward.budgets[50].explanation_confidence),
        (forward.deletion_auc, backward.deletion_auc),
    ]:
        assert values == pytest.approx(reversed_values[::-1], rel=1e-6)
    # ... and these are the per-image hand values, which differ between the images.
    expected = [image.confidence(image.budget_mask(25, "binary")) for image in IMAGES]
    assert len({round(value, 6) for value in expected}) == len(IMAGES)
    assert forward.budgets[25].explanation_confidence == pytest.approx(expected, rel=1e-6)


def test_monotone_rescaling_changes_the_valued_budget_only():
    plain = _score(mode="binary")[1]
    cubed = _score(mode="binary", transform=lambda values: values ** 3)[1]
    for percent in (25, 50):
        assert cubed.budgets[percent].drop == pytest.approx(plain.budgets[percent].drop,
                                                            abs=1e-9)
    plain_valued = _score(mode="valued")[1].budgets[25].drop
    cubed_valued = _score(mode="valued", transform=lambda values: values ** 3)[1].budgets[25].drop
    cubes = np.where(GOOD.top(4) > 0, GOOD.map ** 3, 0.0)
    assert cubed_valued[0] == pytest.approx(GOOD.drop(GOOD.confidence(cubes)), rel=1e-4)
    assert cubed_valued[0] > plain_valued[0] + 1.0


# ---------------------------------------------------------------- budgets and ties, no model


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 7, 9), (2, 13, 5)])
@pytest.mark.parametrize("percent", [1, 15, 50, 85, 100])
def test_binary_budget_keeps_exactly_its_share_of_pixels_at_one(shape, percent):
    generator = torch.Generator().manual_seed(sum(shape) + percent)
    saliency = (torch.rand(shape, generator=generator) * 4).floor() / 3  # four values: ties
    kept = budget_saliency(saliency, percent, "binary")
    count = round(shape[1] * shape[2] * percent / 100)
    assert set(kept.unique().tolist()) <= {0.0, 1.0}
    assert kept.flatten(1).sum(dim=1).tolist() == [count] * shape[0]
    for one_map, one_kept in zip(saliency, kept.bool()):
        if 0 < count < one_map.numel():  # no dropped pixel is more salient than a kept one
            assert one_map[one_kept].min() >= one_map[~one_kept].max()
    valued = budget_saliency(saliency, percent, "valued")
    assert torch.equal(valued, torch.where(kept.bool(), saliency, torch.zeros_like(saliency)))


def test_ties_are_broken_in_a_seeded_random_order_not_in_raster_order():
    constant = torch.zeros(1, 16, 16)
    kept = budget_saliency(constant, 25, "binary")[0].bool()
    raster = torch.zeros(16, 16, dtype=torch.bool)
    raster[:4] = True  # the first 64 pixels in raster order
    assert int(kept.sum()) == 64 and not torch.equal(kept, raster)
    assert int(kept[8:].sum()) > 16  # scattered over the image: the bottom half has its share
    deletion = ranked_pixel_masks(constant[0], steps=4)[1].bool()
    assert int(deletion.sum()) == 64 and int(deletion[8:].sum()) > 16

    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert torch.equal(budget_saliency(constant, 25, "binary")[0].bool(), kept)
    assert torch.equal(ranked_pixel_masks(constant[0], steps=4)[1].bool(), deletion)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone


def test_ranked_masks_grow_by_rank_and_break_ties_among_equal_pixels_only():
    saliency = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 0.0]])
    masks = ranked_pixel_masks(saliency, steps=9)
    assert masks.sum(dim=(1, 2)).tolist() == list(range(10))
    assert bool((masks[1:] >= masks[:-1]).all())  # each mask contains the previous one
    assert masks[1, 1, 1] == 1 and masks[2, 0, 0] == 1  # 0.9 first, then 0.5, then the zeros


# ---------------------------------------------------------------- the random control


def _random_maps(model, inputs, levels):
    saliency = RandomSaliency(model, levels)(inputs)
    return {level: [normalize_saliency(maps[i : i + 1], size, saliency.padded_size)[0]
                    for i, size in enumerate(saliency.image_sizes)]
            for level, maps in saliency.maps.items()}


def _photo(seed, height=64, width=64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def test_random_control_is_deterministic_per_image_and_differs_between_images():
    model = EvidenceClassifier()
    images = [_photo(0), _photo(1)]
    first = _random_maps(model, [{"image": image} for image in images], [LEVEL])[LEVEL]
    again = _random_maps(model, [{"image": image} for image in images[::-1]], [LEVEL])[LEVEL]
    as_float = _random_maps(model, [{"image": images[0].float()}], [LEVEL])[LEVEL]
    assert torch.equal(first[0], again[1]) and torch.equal(first[1], again[0])
    assert torch.equal(first[0], as_float[0])  # seeded by the pixels, not by their dtype
    assert (first[0] - first[1]).abs().max() > 0.3
    # Smooth: a GRID_SIZE grid upsampled to 64 px changes little between neighbouring pixels,
    # unlike pixel noise.
    for one_map in first:
        assert float(one_map.max() - one_map.min()) > 0.5
        steps = torch.cat([one_map.diff(dim=0).flatten(), one_map.diff(dim=1).flatten()])
        assert float(steps.abs().max()) < 1.5 * GRID_SIZE / 64


def test_random_control_is_the_same_on_any_model_level_and_batch():
    image = _photo(2, 96, 96)
    toy = _random_maps(EvidenceClassifier(), [{"image": image}], [LEVEL])[LEVEL][0]
    torch.manual_seed(0)
    classifier = build_model(make_tiny_cfg("fal_p2p3.yaml")).eval()
    levels = _random_maps(classifier, [{"image": image}, {"image": _photo(3)}], ["p2", "p5"])
    assert torch.equal(levels["p2"][0], toy) and torch.equal(levels["p5"][0], toy)

    torch.manual_seed(0)
    detector = build_model(make_tiny_cfg(
        "COCO-Detection/faster_rcnn_R_50_FPN_baseline_1x.yaml",
        *tiny_detection_overrides("unused_train", "unused_val", 96),
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)).eval()
    small = image[:, :40, :56]  # padded to 64 x 64 alone, to 96 x 96 beside the larger image
    alone = _random_maps(detector, [{"image": small}], ["p3"])["p3"][0]
    padded = _random_maps(detector, [{"image": image}, {"image": small}], ["p3"])["p3"]
    assert torch.equal(padded[1], alone) and torch.equal(padded[0], toy)
    scores = score_explanations(detector, [{"image": image}, {"image": small}],
                                RandomSaliency(detector, ["p3"]), auc_steps=0, budgets=[15])
    assert bool(scores.explained.all())
    assert np.isfinite(scores.levels["p3"].budgets[15].drop).all()
