"""Saliency methods on tiny real models: formulas, batching, model state, level checks."""
import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

from fal_d2.explain import (
    SALIENCY_METHODS,
    AttentionSaliency,
    BranchCAM,
    FusedSaliency,
    GradCAM,
    GradCAMPlusPlus,
    build_saliency_method,
)
from fal_d2.explain.metrics import normalize_saliency

ABN_OPTS = ("MODEL.RESNETS.OUT_FEATURES", ["res4", "res5"])


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(tiny_cfg, config="fal_p2p3.yaml", *opts, seed=0):
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(config, *opts))
    # Random running statistics and a non-zero head, so that maps are not trivially flat.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    torch.nn.init.normal_(model.head.linear.weight, std=0.5)
    return model


def _inputs(n, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator),
         "height": size, "width": size}
        for _ in range(n)
    ]


def _features_and_gradients(model, inputs, targets, levels):
    """A level's activations A and d(target logit)/dA by plain autograd, without hooks."""
    model.eval()
    features = model.backbone(model.preprocess_image(inputs).tensor)
    for level in levels:
        features[level].retain_grad()
    logits = model.head(features)
    logits[torch.arange(len(inputs)), targets].sum().backward()
    activations = {level: features[level].detach().double().numpy() for level in levels}
    gradients = {level: features[level].grad.double().numpy() for level in levels}
    return activations, gradients


MODELS = [("fal_p2p3.yaml", (), ["p2", "p3", "p4"]), ("abn_r50.yaml", ABN_OPTS, ["res4", "res5"])]


@pytest.mark.parametrize("config, opts, levels", MODELS, ids=["fal", "abn"])
def test_gradcam_and_gradcampp_match_direct_formulas(tiny_cfg, config, opts, levels):
    model = _model(tiny_cfg, config, *opts)
    inputs = _inputs(2)
    targets = torch.tensor([1, 3])
    gradcam = GradCAM(model, levels)(inputs, targets)
    gradcampp = GradCAMPlusPlus(model, levels)(inputs, targets)
    activations, gradients = _features_and_gradients(model, inputs, targets, levels)

    positive = []  # Grad-CAM++ maps may all be 0 on a level of a random model, but not everywhere
    for level in levels:
        a, g = activations[level], gradients[level]
        expected = np.maximum(0, np.einsum("nk,nkhw->nhw", g.mean(axis=(2, 3)), a))
        assert expected.max() > 0
        np.testing.assert_allclose(gradcam.maps[level].numpy(), expected, rtol=1e-4,
                                   atol=1e-5 * expected.max())

        weights = np.zeros(g.shape[:2])
        for n, k in np.ndindex(*weights.shape):
            gk, ak = g[n, k], a[n, k]
            denominator = 2 * gk**2 + ak.sum() * gk**3
            safe_denominator = np.where(denominator != 0, denominator, 1)
            alpha = np.where(denominator != 0, gk**2 / safe_denominator, 0)
            weights[n, k] = (alpha * np.maximum(gk, 0)).sum()
        expected = np.maximum(0, np.einsum("nk,nkhw->nhw", weights, a))
        positive.append(expected.max() > 0)
        np.testing.assert_allclose(gradcampp.maps[level].numpy(), expected, rtol=1e-4,
                                   atol=1e-5 * expected.max())
    assert any(positive)


@pytest.mark.parametrize("name", sorted(SALIENCY_METHODS))
def test_same_maps_whatever_the_batch_size(tiny_cfg, name):
    model = _model(tiny_cfg, "fal_p2p3.yaml", "MODEL.EXPLAIN_HEAD.ENABLED", True)
    for head in model.explanation_head.values():
        head.num_updates.fill_(1)  # "head" explains only with a head that has been trained
    method = build_saliency_method(name, model, ["p2", "p3"])
    inputs = _inputs(3)
    batched = method(inputs)
    singles = [method([x]) for x in inputs]
    assert batched.target_classes.tolist() == [int(s.target_classes) for s in singles]
    assert torch.allclose(batched.scores, torch.cat([s.scores for s in singles]), atol=1e-5)
    for level, maps in batched.maps.items():
        single_maps = torch.cat([s.maps[level] for s in singles])
        assert maps.shape == single_maps.shape
        assert torch.allclose(maps, single_maps, rtol=1e-4, atol=1e-5 * float(maps.max()))
        assert maps.min() >= 0


def _state(model):
    return (
        [(name, module.training) for name, module in model.named_modules()],
        [(name, p.requires_grad) for name, p in model.named_parameters()],
        [
            (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()
        ],
    )


@pytest.mark.parametrize("method_class", [GradCAM, AttentionSaliency])
def test_model_state_is_restored_also_after_an_exception(tiny_cfg, method_class):
    model = _model(tiny_cfg)
    model.train()
    model.head.eval()  # a mixed state must come back as it was, not as all-train
    model.backbone.bottom_up.stem.conv1.weight.requires_grad_(False)
    before = _state(model)
    method = method_class(model, ["p2", "p3"])

    saliency = method(_inputs(2))
    assert _state(model) == before
    assert all(p.grad is None for p in model.parameters())
    assert all(not m.requires_grad for m in saliency.maps.values())

    with pytest.raises(ValueError, match="outside"):  # raised after the forward pass
        method(_inputs(2), target_classes=[0, 99])
    assert _state(model) == before
    bad = _inputs(1)
    bad[0]["image"] = torch.zeros(4, 32, 32, dtype=torch.uint8)
    with pytest.raises(RuntimeError):  # raised inside the forward, with the hooks in place
        method(bad)
    assert _state(model) == before


def test_explicit_targets_and_their_checks(tiny_cfg):
    model = _model(tiny_cfg)
    method = GradCAM(model, ["p3"])
    inputs = _inputs(2)
    predicted = method(inputs)
    other = (predicted.target_classes + 1) % 5
    explained = method(inputs, other)
    assert explained.target_classes.tolist() == other.tolist()
    assert torch.allclose(explained.scores, predicted.scores)
    assert not torch.allclose(explained.maps["p3"], predicted.maps["p3"])
    with pytest.raises(ValueError, match="3 target classes for 2 images"):
        method(inputs, [0, 1, 2])


def test_attention_is_the_branch_map(tiny_cfg):
    model = _model(tiny_cfg).eval()
    inputs = _inputs(2)
    saliency = AttentionSaliency(model, ["p2", "p3"])(inputs)
    with torch.no_grad():
        outputs = model(inputs)
    for level in ("p2", "p3"):
        expected = torch.stack([output["attention_raw"][level] for output in outputs])
        assert torch.allclose(saliency.maps[level], expected)
    assert saliency.target_classes.tolist() == [output["pred_class"] for output in outputs]


def test_fused_averages_normalised_levels(tiny_cfg):
    model = _model(tiny_cfg)
    inputs = _inputs(2)
    levels = ["p2", "p3", "p5"]
    fused = FusedSaliency(model, levels)(inputs)
    gradcam = GradCAM(model, levels)(inputs)
    assert list(fused.maps) == ["p2+p3+p5"]
    expected = torch.stack(
        [normalize_saliency(gradcam.maps[level], (32, 32)) for level in levels]
    ).mean(0)
    assert torch.allclose(fused.maps["p2+p3+p5"], expected, atol=1e-5)
    assert 0 <= float(expected.min()) and float(expected.max()) <= 1


def test_plain_fpn_and_abn_models(tiny_cfg):
    fpn = _model(tiny_cfg, "fpn_baseline.yaml")
    saliency = GradCAM(fpn, ["p2", "p3", "p4", "p5"])(_inputs(1))
    assert {level: tuple(m.shape) for level, m in saliency.maps.items()} == {
        "p2": (1, 8, 8), "p3": (1, 4, 4), "p4": (1, 2, 2), "p5": (1, 1, 1)
    }
    no_branch = r"\['p2'\] have no attention branch; the model has none \(MODEL.FAL"
    for method in (AttentionSaliency, BranchCAM):
        with pytest.raises(ValueError, match=no_branch):
            method(fpn, ["p2"])

    abn = _model(tiny_cfg, "abn_r50.yaml", *ABN_OPTS)
    attention = AttentionSaliency(abn, ["res4"])(_inputs(1))
    assert attention.maps["res4"].shape == (1, 2, 2)
    with pytest.raises(ValueError, match="res5.*no attention branch"):
        AttentionSaliency(abn, ["res5"])


def test_unknown_levels_and_methods_are_named(tiny_cfg):
    model = _model(tiny_cfg)
    unknown = r"unknown level\(s\) \['p9'\]; the backbone produces \['p2', "
    with pytest.raises(ValueError, match=unknown):
        GradCAMPlusPlus(model, ["p2", "p9"])
    with pytest.raises(KeyError, match="unknown saliency method 'cam'"):
        build_saliency_method("cam", model, ["p2"])


def test_branch_cam_is_the_branch_class_logit_map_of_the_explained_class(tiny_cfg):
    model = _model(tiny_cfg)
    inputs = _inputs(3)
    targets = torch.tensor([4, 0, 2])
    saliency = BranchCAM(model, ["p2", "p3"])(inputs, targets)
    assert saliency.target_classes.tolist() == targets.tolist()
    model.eval()
    with torch.no_grad():
        model.backbone(model.preprocess_image(inputs).tensor)
        for level in ("p2", "p3"):
            branch = model.backbone.attention_branches[level]
            output = model.backbone.last_attention[level]
            # the branch's own 1x1 class-logit conv on its class response, channel c
            logits = branch.class_logits(output.class_response)[torch.arange(3), targets]
            expected = logits - logits.flatten(1).min(dim=1).values[:, None, None]
            assert torch.allclose(saliency.maps[level], expected, atol=1e-5)
            # pooled, the maps are the logits L_att trains: a CAM of the branch
            assert torch.allclose(output.class_maps.mean(dim=(2, 3)), output.logits, atol=1e-5)
    assert not BranchCAM.needs_gradients

    # without target classes, the classifier's predicted class is explained
    predicted = BranchCAM(model, ["p2"])(inputs)
    assert predicted.target_classes.tolist() == predicted.scores.argmax(dim=1).tolist()


def test_branch_cam_names_the_levels_that_have_a_branch(tiny_cfg):
    model = _model(tiny_cfg)
    with pytest.raises(ValueError, match=r"BranchCAM: level\(s\) \['p4'\] have no attention "
                                         r"branch; levels with a branch: \['p2', 'p3'\]"):
        build_saliency_method("branch_cam", model, ["p2", "p4"])
