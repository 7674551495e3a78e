"""The from-scratch training recipe: random resized crops, mixup/CutMix with the targets every loss
takes, label smoothing, an EMA of the weights, and their one-line config errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.modeling import build_model

from conftest import make_tiny_cfg
from fal_d2.config import check_training_recipe
from fal_d2.data import ClassificationDatasetMapper
from fal_d2.data.random_resized_crop import RandomResizedCrop
from fal_d2.modeling.batch_mixing import BatchMixer, soft_targets
from fal_d2.weight_ema import WeightEMA


def test_soft_targets_smooth_one_hot_labels():
    targets = soft_targets(torch.tensor([2, 0]), num_classes=4, smoothing=0.2)
    assert torch.allclose(targets.sum(dim=1), torch.ones(2))
    assert targets[0, 2] == pytest.approx(0.85) and targets[0, 1] == pytest.approx(0.05)


def _batch(n=4, size=16):
    torch.manual_seed(0)
    return torch.randn(n, 3, size, size), torch.tensor([0, 1, 2, 3])[:n]


def test_mixup_blends_each_image_with_its_pair_and_their_targets_alike():
    images, labels = _batch()
    mixed, targets = BatchMixer(num_classes=5, mixup_alpha=0.4)(images, labels)
    # image i is blended with image N-1-i; the target says by how much
    lam = targets[0, labels[0]].item()
    assert 0 < lam < 1 and targets[0, labels[-1]].item() == pytest.approx(1 - lam, abs=1e-6)
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))


def test_cutmix_target_equals_the_pasted_area():
    images, labels = _batch(size=32)
    torch.manual_seed(3)
    mixed, targets = BatchMixer(num_classes=5, cutmix_alpha=1.0)(images, labels)
    pasted = (mixed[0] != images[0]).any(dim=0).float().mean().item()
    assert 0 < pasted < 1
    assert targets[0, labels[-1]].item() == pytest.approx(pasted, abs=1e-6)
    assert targets[0, labels[0]].item() == pytest.approx(1 - pasted, abs=1e-6)


def test_no_mixing_when_off_or_not_drawn():
    images, labels = _batch()
    for mixer in (BatchMixer(num_classes=5), BatchMixer(num_classes=5, mixup_alpha=1.0, prob=0.0)):
        mixed, targets = mixer(images, labels)
        assert mixed is images and torch.equal(targets, F.one_hot(labels, 5).float())


def test_branch_losses_take_the_same_mixed_targets_as_the_head():
    cfg = make_tiny_cfg("fal_p2p3.yaml", "INPUT.CLS.MIXUP_ALPHA", 1.0,
                        "MODEL.CLS_HEAD.LABEL_SMOOTHING", 0.1)
    model = build_model(cfg).train()
    seen = {}
    model.batch_mixer.register_forward_hook(lambda m, i, out: seen.update(out=out))
    inputs = [{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "label": k}
              for k in range(4)]
    losses = model(inputs)
    pixels, targets = seen["out"]
    assert not torch.allclose(pixels, model.preprocess_image(inputs).tensor)  # mixed
    assert (targets > 0).sum(dim=1).min() == 5  # smoothed: every class has mass
    with torch.no_grad():  # train-mode BN: the outputs depend only on this batch
        logits, attention, _ = model.classify(pixels)
    assert losses["loss_cls"].item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    for level in ("p2", "p3"):
        expected = F.cross_entropy(attention[level].logits, targets).item()
        assert losses[f"loss_att_{level}"].item() == pytest.approx(expected, rel=1e-5)


def test_random_resized_crop_keeps_the_size_and_takes_the_asked_area():
    np.random.seed(0)
    image = np.arange(64 * 64 * 3, dtype=np.float32).reshape(64, 64, 3)
    transform = RandomResizedCrop(scale=(0.25, 0.25), ratio=(1.0, 1.0)).get_transform(image)
    crop, resize = transform.transforms
    assert (crop.w, crop.h) == (32, 32)
    out = transform.apply_image(image)
    assert out.shape == image.shape
    assert out.min() >= image[crop.y0:crop.y0 + 32, crop.x0:crop.x0 + 32].min() - 1e-3


def test_mapper_crops_in_training_only():
    cfg = make_tiny_cfg("fal_p2p3.yaml", "INPUT.CLS.CROP_SCALE", [0.3, 1.0])
    train = [type(a).__name__ for a in ClassificationDatasetMapper(cfg, is_train=True).augmentations.augs]
    test = ClassificationDatasetMapper(cfg, is_train=False).augmentations.augs
    assert train[0] == "RandomResizedCrop" and test == []


def _toy_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def test_weight_ema_averages_with_a_ramped_decay_and_round_trips():
    model = _toy_model()
    ema = WeightEMA(model, decay=0.9)
    history = []
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].num_batches_tracked.add_(1)
        history.append(model[0].weight.clone())
        ema.update()
    expected = _toy_model()[0].weight.clone()
    for t, weights in enumerate(history, start=1):
        decay = min(0.9, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * weights
    assert torch.allclose(ema.ema_model[0].weight, expected, atol=1e-6)
    assert ema.ema_model[1].num_batches_tracked.item() == 3  # integer buffers are copied
    restored = WeightEMA(_toy_model(), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 3
    assert torch.equal(restored.ema_model[0].weight, ema.ema_model[0].weight)


@pytest.mark.parametrize("key, value, message", [
    ("INPUT.CLS.MIXUP_ALPHA", -0.2, "INPUT.CLS.MIXUP_ALPHA=-0.2: must be >= 0"),
    ("INPUT.CLS.CUTMIX_ALPHA", -1.0, "INPUT.CLS.CUTMIX_ALPHA=-1.0: must be >= 0"),
    ("INPUT.CLS.MIX_PROB", 1.5, "INPUT.CLS.MIX_PROB=1.5: must be in"),
    ("MODEL.CLS_HEAD.LABEL_SMOOTHING", 1.0, "MODEL.CLS_HEAD.LABEL_SMOOTHING=1.0: must be in"),
    ("INPUT.CLS.CROP_SCALE", [0.9, 0.5], r"INPUT.CLS.CROP_SCALE=\[0.9, 0.5\]: must be"),
    ("INPUT.CLS.CROP_RATIO", [2.0, 1.0], r"INPUT.CLS.CROP_RATIO=\[2.0, 1.0\]: must be"),
    ("MODEL.EMA.DECAY", 1.0, r"MODEL.EMA.DECAY=1.0: must be in \(0, 1\)"),
])
def test_recipe_values_out_of_range_fail_naming_the_key(key, value, message):
    cfg = make_tiny_cfg("fal_p2p3.yaml", key, value, "MODEL.EMA.ENABLED", True)
    with pytest.raises(ValueError, match=message) as error:
        check_training_recipe(cfg)
    assert "\n" not in str(error.value)

