"""Our saliency maps and explanation metrics against pytorch-grad-cam, the reference implementation.

Average Drop, Increase in Confidence and Grad-CAM maps are only comparable with published numbers
if they are computed as the reference implementations compute them. These tests run our Grad-CAM,
Grad-CAM++ and Average Drop / Increase in Confidence next to pytorch-grad-cam's (``grad-cam`` on
PyPI, a test-only dependency in requirements.in) on tiny real models, and state where the
definitions differ on purpose.

pytorch-grad-cam sees our classifier as a plain module from the normalised, padded batch tensor to
the logits (:class:`_LogitsOfNormalized`), with a level's module as its target layer.

The images are 96 px, not the 32 px of other tests: every level, p6 included, is then at least
2 x 2. A 1 x 1 level gives a constant map, which both normalise to zeros
(``test_constant_level_map_normalises_to_zeros_as_in_the_reference``).
"""
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip(
    "pytorch_grad_cam",
    reason="pytorch-grad-cam (grad-cam in requirements.in) is not installed: the reference "
    "implementation these tests compare against",
)
from pytorch_grad_cam import GradCAM as ReferenceGradCAM  # noqa: E402
from pytorch_grad_cam import GradCAMPlusPlus as ReferenceGradCAMPlusPlus  # noqa: E402
from pytorch_grad_cam.metrics.cam_mult_image import (  # noqa: E402
    DropInConfidence,
    IncreaseInConfidence,
)
from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import (  # noqa: E402
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)

from detectron2.modeling import build_model  # noqa: E402

from fal_d2.explain import GradCAM, GradCAMPlusPlus  # noqa: E402
from fal_d2.explain.metrics import normalize_saliency  # noqa: E402
from fal_d2.explain.scoring import score_explanations  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 96
LEVELS = ["p2", "p3", "p4", "p5", "p6"]
TARGETS = torch.tensor([1, 3, 0, 2])  # explicit classes, not all of them the predicted ones
MODELS = ["fpn_baseline.yaml", "fal_p2p3.yaml"]
MAP_ATOL = 1e-5  # maps in [0, 1]; measured differences are below 1e-6
PERCENT_ATOL = 1e-3  # Average Drop in percent; measured differences are below 1e-4
GRADCAMPP_EPS = 1e-6  # pytorch-grad-cam's GradCAMPlusPlus: eps in the alpha denominator


def _model(tiny_cfg, config, head_std=0.02, seed=0):
    """A tiny classifier in eval mode, with random BN statistics so that maps are not flat. The
    head's weights (std 0.02) keep the softmax away from 0 and 1: Y is 0.1 to 0.35, so that
    Average Drop's division by Y is well conditioned and O is never within rounding of Y."""
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(config))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    nn.init.normal_(model.head.linear.weight, std=head_std)
    return model.eval()


def _inputs(n=len(TARGETS), size=SIZE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator),
         "height": size, "width": size}
        for _ in range(n)
    ]


class _LogitsOfNormalized(nn.Module):
    """
    Our classifier as pytorch-grad-cam sees a model: the normalised, padded batch tensor
    (``model.preprocess_image(inputs).tensor``) in, ``head(backbone(x))`` logits out.

    ``taps`` are identity modules on the named levels of the feature dict, for levels that no
    module of the backbone outputs as a tensor: pytorch-grad-cam hooks a target layer's output and
    needs a tensor (a non-tensor output gets no gradient hook). In Detectron2's FPN, p6 comes from
    ``top_block`` (LastLevelMaxPool), which returns a list; an attended FAL level is
    ``features * (1 + M)``, computed inside the attention branch, whose output is an
    AttentionOutput tuple. A tap sits between the backbone and the head, so it is only right for
    levels that reach the score through the head alone: true of p6 and of attended levels (the top
    block reads the un-attended p5), not of p5, which also feeds p6.
    """

    def __init__(self, model, taps=()):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.taps = nn.ModuleDict({level: nn.Identity() for level in taps})

    def forward(self, x):
        features = self.backbone(x)
        for level, tap in self.taps.items():
            features[level] = tap(features[level])
        return self.head(features)


def _tapped_levels(model):
    return ["p6"] + list(getattr(model.backbone, "attention_branches", {}))


def _target_layer(model, wrapper, level):
    """The module whose output is ``level``: Detectron2 names pN's output conv ``fpn_output{N}``."""
    if level in wrapper.taps:
        return wrapper.taps[level]
    return getattr(model.backbone, f"fpn_output{level[1:]}")


def _reference_maps(cam_class, model, wrapper, level, tensor, classes):
    """(N, H, W) maps of pytorch-grad-cam's ``cam_class`` with the level as the only target layer,
    explaining the logit of each image's class (ClassifierOutputTarget), as our methods do."""
    cam = cam_class(model=wrapper, target_layers=[_target_layer(model, wrapper, level)])
    try:
        return cam(input_tensor=tensor, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    finally:
        cam.activations_and_grads.release()  # no hooks left on our model


def _our_maps(saliency, level, size=SIZE):
    """(N, H, W) maps at the input size, min-max normalised, as our metrics use them."""
    return normalize_saliency(saliency.maps[level], (size, size), saliency.padded_size).numpy()


def _normalized_batch(model, inputs):
    with torch.no_grad():
        return model.preprocess_image(inputs).tensor


@pytest.mark.parametrize("config", MODELS)
def test_gradcam_matches_pytorch_grad_cam_on_every_level(tiny_cfg, config):
    """
    Our GradCAM equals pytorch-grad-cam's GradCAM on each level, with that level's module as
    target layer, once both maps are at the input size in [0, 1]. pytorch-grad-cam min-max
    normalises (with a 1e-7 eps), resizes with cv2 INTER_LINEAR and normalises again; we resize
    (bilinear, align_corners=False, the same half-pixel sampling) then normalise. Resizing is
    linear and keeps constants, so both orders give the same map up to rounding. For p5, the
    target layer is fpn_output5, whose output also feeds p6: equal maps mean our gradient at p5
    includes the path through p6.
    """
    model = _model(tiny_cfg, config)
    inputs = _inputs()
    wrapper = _LogitsOfNormalized(model, _tapped_levels(model))
    tensor = _normalized_batch(model, inputs)
    ours = GradCAM(model, LEVELS)(inputs, TARGETS)
    assert ours.target_classes.tolist() == TARGETS.tolist()
    for level in LEVELS:
        our_maps = _our_maps(ours, level)
        reference = _reference_maps(ReferenceGradCAM, model, wrapper, level, tensor, TARGETS)
        assert reference.shape == our_maps.shape == (len(inputs), SIZE, SIZE)
        # Not vacuous: every image's map spans [0, 1] (none is constant, hence all zeros).
        np.testing.assert_allclose(our_maps.reshape(len(inputs), -1).max(axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(our_maps, reference, rtol=0, atol=MAP_ATOL, err_msg=level)


def _level_gradients(model, inputs, classes):
    """{level: (activations A, d logit / dA)} in float64, by plain autograd without hooks."""
    features = model.backbone(model.preprocess_image(inputs).tensor)
    for level in LEVELS:
        features[level].retain_grad()
    logits = model.head(features)
    logits[torch.arange(len(inputs)), classes].sum().backward()
    return {level: (features[level].detach().double(), features[level].grad.double())
            for level in LEVELS}


@pytest.mark.parametrize("config", MODELS)
def test_gradcampp_matches_pytorch_grad_cam_where_its_eps_is_negligible(tiny_cfg, config):
    """
    Grad-CAM++ weights are w_k = sum_ij alpha_kij ReLU(g_kij) with g = d y_c / dA and

        ours:               alpha = g^2 / (2 g^2 + sum_ab A_kab g^3)          (0 where that is 0)
        pytorch-grad-cam:   alpha = g^2 / (2 g^2 + sum_ab A_kab g^3 + 1e-6)   (0 where g is 0)

    The eps is not in the paper and, unlike the rest, is not scale-free: with the gradients of
    this tiny model (|g| from 1e-7 to 1e-2) it dominates the denominator, and on p2 the maps
    differ by 0.7 to 0.8 (asserted below: by more than 0.1). Both are the same function where eps
    is negligible, so the maps are compared on the same model with its head's weights scaled up
    (gradients are linear in them, the features do not depend on them), after checking that eps
    is below 1e-6 of every denominator.
    """
    inputs = _inputs()
    model = _model(tiny_cfg, config)
    wrapper = _LogitsOfNormalized(model, _tapped_levels(model))
    tensor = _normalized_batch(model, inputs)
    ours = GradCAMPlusPlus(model, ["p2"])(inputs, TARGETS)
    reference = _reference_maps(ReferenceGradCAMPlusPlus, model, wrapper, "p2", tensor, TARGETS)
    assert np.abs(_our_maps(ours, "p2") - reference).max() > 0.1  # the eps matters here

    model = _model(tiny_cfg, config, head_std=5e4)
    wrapper = _LogitsOfNormalized(model, _tapped_levels(model))
    for level, (activations, grad) in _level_gradients(model, inputs, TARGETS).items():
        denominator = 2 * grad**2 + activations.sum(dim=(2, 3), keepdim=True) * grad**3
        nonzero = grad != 0
        assert bool((GRADCAMPP_EPS < 1e-6 * denominator[nonzero].abs()).all()), level

    ours = GradCAMPlusPlus(model, LEVELS)(inputs, TARGETS)
    for level in LEVELS:
        our_maps = _our_maps(ours, level)
        reference = _reference_maps(ReferenceGradCAMPlusPlus, model, wrapper, level, tensor,
                                    TARGETS)
        np.testing.assert_allclose(our_maps.reshape(len(inputs), -1).max(axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(our_maps, reference, rtol=0, atol=MAP_ATOL, err_msg=level)


@pytest.mark.parametrize("config", MODELS)
def test_average_drop_and_increase_match_pytorch_grad_cam(tiny_cfg, config):
    """
    Average Drop and Increase in Confidence of Grad-CAM maps: ours from score_explanations with
    the "normalized" mask convention (masked pixels become the pixel mean, i.e. S times the
    normalised input), pytorch-grad-cam's DropInConfidence / IncreaseInConfidence (the normalised
    input tensor times the cam, ClassifierOutputSoftmaxTarget) on its own maps.

    The definitions differ in one respect: pytorch-grad-cam's DropInConfidence is the absolute drop
    max(0, Y - O) per image; ours is Grad-CAM++'s relative drop 100 * max(0, Y - O) / Y. So ours is
    100 * theirs / Y. Its IncreaseInConfidence is 1[O > Y]; ours is 100 * 1[O > Y].

    With black masked pixels (mask="pixel", not the reference's convention) the drops differ.
    """
    model = _model(tiny_cfg, config)
    inputs = _inputs()
    wrapper = _LogitsOfNormalized(model, _tapped_levels(model))
    tensor = _normalized_batch(model, inputs)
    softmax_targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in TARGETS]
    with torch.no_grad():
        reference_y = torch.softmax(wrapper(tensor), dim=1)[torch.arange(len(inputs)), TARGETS]
    reference_y = reference_y.double().numpy()

    scores = score_explanations(model, inputs, GradCAM(model, LEVELS), TARGETS, auc_steps=0,
                                mask="normalized")
    np.testing.assert_allclose(scores.confidence, reference_y, rtol=0, atol=1e-6)
    assert reference_y.min() > 0.05  # Average Drop divides by Y
    for level in LEVELS:
        ours = scores.levels[level]
        cams = _reference_maps(ReferenceGradCAM, model, wrapper, level, tensor, TARGETS)
        drop = DropInConfidence()(tensor, cams, softmax_targets, wrapper)
        increase = IncreaseInConfidence()(tensor, cams, softmax_targets, wrapper)
        # O is far from Y, so 1[O > Y] cannot flip on rounding (the maps agree to 1e-6).
        assert np.abs(ours.explanation_confidence - scores.confidence).min() > 1e-3, level
        np.testing.assert_allclose(ours.drop, 100 * drop / reference_y, rtol=0,
                                   atol=PERCENT_ATOL, err_msg=level)
        np.testing.assert_array_equal(ours.increase, 100 * increase, err_msg=level)

    # Not vacuous: some images lose confidence and some gain it.
    drops = np.stack([scores.levels[level].drop for level in LEVELS])
    increases = np.stack([scores.levels[level].increase for level in LEVELS])
    assert drops.max() > 1 and increases.max() == 100 and increases.min() == 0
    pixel = score_explanations(model, inputs, GradCAM(model, LEVELS), TARGETS, auc_steps=0,
                               mask="pixel")
    pixel_drops = np.stack([pixel.levels[level].drop for level in LEVELS])
    assert np.abs(pixel_drops - drops).max() > 1


@pytest.mark.parametrize("level_size", [1, 2])
def test_constant_level_map_normalises_to_zeros_as_in_the_reference(level_size):
    """
    A constant map carries no localisation: pytorch-grad-cam's scale_cam_image makes it zeros,
    and so, by its docstring, should our normalize_saliency. A 1 x 1 level (p6 for images of
    64 px and less, p5 for 32 px) always gives one.
    """
    constant = np.full((1, level_size, level_size), 0.3, dtype=np.float32)
    reference = scale_cam_image(constant, (64, 64))
    ours = normalize_saliency(torch.from_numpy(constant), (64, 64)).numpy()
    assert not reference.any()
    np.testing.assert_array_equal(ours, reference)
