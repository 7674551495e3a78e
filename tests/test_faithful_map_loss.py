"""The budgeted keep/destroy objective on the branches' class maps (MODEL.FAL.FAITHFUL_MAP)."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from fal_d2.modeling.faithful_map_loss import FaithfulMapLoss, batchnorm_in_eval

pytestmark = pytest.mark.usefixtures("one_thread")

ON = ("MODEL.FAL.FAITHFUL_MAP.ENABLED", True)


def _inputs(n, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8,
                                    generator=generator), "label": i % 5} for i in range(n)]


def test_losses_are_added_and_train_the_class_maps(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("fal_p2p3.yaml", *ON)).train()
    losses = model(_inputs(4))
    assert set(losses) == {"loss_cls", "loss_att_p2", "loss_att_p3", "loss_map_keep",
                           "loss_map_destroy", "loss_map_area"}
    assert all(torch.isfinite(value) for value in losses.values())
    # the keep term reaches the class-logit conv through the mask, not only through L_att
    model.zero_grad()
    losses["loss_map_keep"].backward()
    grad = model.backbone.attention_branches["p2"].class_logits.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_masked_passes_leave_batchnorm_statistics_alone(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("fal_p2p3.yaml", *ON)).train()
    plain = build_model(tiny_cfg("fal_p2p3.yaml"))
    plain.load_state_dict(model.state_dict())
    plain.train()
    inputs = _inputs(4)
    model(inputs)
    plain(inputs)
    stats = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(value, plain.state_dict()[key]) for key, value in stats.items())
    assert all(m.training for m in model.modules())  # train mode restored after the passes


def test_objective_starts_at_start_iter(tiny_cfg):
    model = build_model(tiny_cfg("fal_p2p3.yaml", *ON, "MODEL.FAL.FAITHFUL_MAP.START_ITER", 5))
    model.train()
    with EventStorage(start_iter=4):
        assert "loss_map_keep" not in model(_inputs(2))
    with EventStorage(start_iter=5):
        assert "loss_map_keep" in model(_inputs(2))


def test_soft_budget_mask_keeps_about_the_budget():
    loss = FaithfulMapLoss(budgets=[25], sharpness=200.0)
    saliency = torch.linspace(0, 1, 400).view(1, 20, 20)
    mask = loss.soft_budget_mask(saliency)
    kept = mask > 0.5 * saliency
    assert abs(kept.float().mean().item() - 0.25) < 0.02  # the top quarter, soft at the edge
    assert torch.all(mask <= saliency + 1e-6)  # T = S * weight, never above S


def test_batchnorm_in_eval_restores_modes():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1)).train()
    with batchnorm_in_eval(model):
        assert not model[1].training and model[0].training
    assert model[1].training


@pytest.mark.parametrize("key, value, message", [
    ("BUDGETS", [0], r"BUDGETS=\[0\]: give percentages in \(0, 100\)"),
    ("BUDGETS", [15, 100], r"BUDGETS=\[15, 100\]"),
    ("AREA_WEIGHT", -1.0, "AREA_WEIGHT=-1.0 must be >= 0"),
    ("SHARPNESS", 0.0, "SHARPNESS=0.0 must be > 0"),
    ("IMS_PER_LEVEL", 0, "IMS_PER_LEVEL=0 must be >= 1"),
])
def test_bad_values_fail_at_build_time_naming_the_key(tiny_cfg, key, value, message):
    cfg = tiny_cfg("fal_p2p3.yaml", *ON, f"MODEL.FAL.FAITHFUL_MAP.{key}", value)
    with pytest.raises(ValueError, match=f"MODEL.FAL.FAITHFUL_MAP.{message}"):
        build_model(cfg)


@pytest.mark.parametrize("update_classifier", [False, True])
def test_masked_passes_train_the_classifier_only_when_asked(tiny_cfg, update_classifier):
    """By default the masked passes run on detached weights (TAME's frozen classifier): their
    gradient reaches the class maps through T, and never the head, which only they feed."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("fal_p2p3.yaml", *ON, "MODEL.FAL.FAITHFUL_MAP.UPDATE_CLASSIFIER",
                                 update_classifier)).train()
    losses = model(_inputs(4))
    model.zero_grad()
    (losses["loss_map_keep"] + losses["loss_map_destroy"]).backward()
    head_grad = model.head.linear.weight.grad
    branch_grad = model.backbone.attention_branches["p3"].class_logits.weight.grad
    assert float(branch_grad.abs().sum()) > 0
    assert (head_grad is not None and float(head_grad.abs().sum()) > 0) == update_classifier
