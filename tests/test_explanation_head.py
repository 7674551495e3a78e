"""The decoupled explanation head (MODEL.EXPLAIN_HEAD): its maps, its objective, and that neither
can change the classifier, jointly trained or as a second stage."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from fal_d2.checkpoint import WeightsError
from fal_d2.config import merge_config_file, removed_key_message
from fal_d2.evaluation import ExplanationEvaluator
from fal_d2.explain import SALIENCY_METHODS, ExplanationHeadSaliency, build_saliency_method
from fal_d2.levels import check_levels
from fal_d2.modeling.explanation_head_loss import soft_top_k, total_variation

from conftest import REPO_ROOT, load_script, make_tiny_cfg, mini_train_opts

pytestmark = pytest.mark.usefixtures("one_thread")

ON = ("MODEL.EXPLAIN_HEAD.ENABLED", True)
MODELS = ["fal_p2p3.yaml", "fpn_baseline.yaml"]  # with attention branches, and a plain FPN


def _inputs(n, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8,
                                    generator=generator),
             "label": i % 5, "height": size, "width": size} for i in range(n)]


def _pair(config, *opts):
    """The same model built with and without the head, from the same seed."""
    torch.manual_seed(0)
    plain = build_model(make_tiny_cfg(config, *opts))
    torch.manual_seed(0)
    with_head = build_model(make_tiny_cfg(config, *ON, *opts))
    return plain, with_head


def _outside_head(state):
    return {key: value for key, value in state.items() if not key.startswith("explanation_head.")}


def _head_logits(model, inputs):
    """The perception head's logits on the model's own pass (its first call)."""
    seen = []
    handle = model.head.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    try:
        outputs = model(inputs)
    finally:
        handle.remove()
    return outputs, seen[0]


# ---------------------------------------------------------------- the head cannot change the model


@pytest.mark.parametrize("config", MODELS)
def test_the_head_leaves_logits_and_losses_bit_identical(config):
    """Built from the same seed, the model with the head has the same weights outside it, and
    the same logits and losses in training (head losses on) and in inference; the global RNG
    ends where it would without the head."""
    torch.manual_seed(0)
    plain = build_model(make_tiny_cfg(config))
    plain_rng = torch.get_rng_state()
    torch.manual_seed(0)
    with_head = build_model(make_tiny_cfg(config, *ON))
    assert torch.equal(torch.get_rng_state(), plain_rng)
    assert all(torch.equal(value, plain.state_dict()[key])
               for key, value in _outside_head(with_head.state_dict()).items())
    inputs = _inputs(4)
    torch.manual_seed(1)
    plain_losses, plain_logits = _head_logits(plain.train(), inputs)
    plain_rng = torch.get_rng_state()
    torch.manual_seed(1)
    losses, logits = _head_logits(with_head.train(), inputs)
    assert torch.equal(torch.get_rng_state(), plain_rng)
    assert {key for key in losses if key.startswith("loss_head_")} == {
        "loss_head_keep", "loss_head_destroy", "loss_head_area", "loss_head_tv"}
    assert torch.equal(logits, plain_logits)
    for key, value in plain_losses.items():
        assert torch.equal(losses[key], value), key
    # the masked passes left the BatchNorm statistics as the plain model's training step did
    assert all(torch.equal(value, plain.state_dict()[key])
               for key, value in _outside_head(with_head.state_dict()).items())
    with torch.no_grad():
        plain_out, plain_logits = _head_logits(plain.eval(), inputs)
        out, logits = _head_logits(with_head.eval(), inputs)
    assert torch.equal(logits, plain_logits)
    assert all(torch.equal(a["scores"], b["scores"]) for a, b in zip(out, plain_out))


def test_joint_sgd_steps_leave_the_other_weights_as_without_the_head():
    """Three SGD steps (momentum, weight decay, CutMix drawing from the global RNG): every weight
    and buffer outside the head ends equal to a run without it."""
    opts = ("INPUT.CLS.CUTMIX_ALPHA", 1.0, "MODEL.EXPLAIN_HEAD.IMS_PER_LEVEL", 2)
    plain, with_head = _pair("fal_p2p3.yaml", *opts)
    initial_head = {key: value.clone() for key, value in with_head.state_dict().items()
                    if key.startswith("explanation_head.") and value.is_floating_point()}
    for model in (plain, with_head):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        torch.manual_seed(2)
        for step in range(3):
            losses = model(_inputs(6, seed=step))
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    trained = _outside_head(with_head.state_dict())
    assert all(torch.equal(value, plain.state_dict()[key]) for key, value in trained.items())
    assert all(not torch.equal(value, with_head.state_dict()[key])  # the head did train
               for key, value in initial_head.items())
    assert all(int(head.num_updates) == 3 for head in with_head.explanation_head.values())


@pytest.mark.parametrize("config", MODELS)
def test_head_losses_give_no_gradient_outside_the_head(config):
    _, model = _pair(config)
    losses = model.train()(_inputs(4))
    sum(value for key, value in losses.items() if key.startswith("loss_head_")).backward()
    outside = [name for name, param in model.named_parameters()
               if not name.startswith("explanation_head.")
               and param.grad is not None and bool(param.grad.any())]
    assert outside == []
    for head in model.explanation_head.values():
        assert float(head.class_logits.weight.grad.abs().sum()) > 0


def test_head_losses_start_at_start_iter():
    _, model = _pair("fal_p2p3.yaml", "MODEL.EXPLAIN_HEAD.START_ITER", 5)
    model.train()
    with EventStorage(start_iter=4):
        assert not [key for key in model(_inputs(2)) if key.startswith("loss_head_")]
    with EventStorage(start_iter=5):
        assert "loss_head_keep" in model(_inputs(2))
    assert int(model.explanation_head["p2"].num_updates) == 1


@pytest.mark.parametrize("config", MODELS)
def test_second_stage_model_trains_only_the_head(config):
    model = build_model(make_tiny_cfg(config, *ON, "MODEL.EXPLAIN_HEAD.TRAIN_ONLY_HEAD", True))
    model.train()
    head_modules = set(model.explanation_head.modules())
    assert all(module.training == (module in head_modules) for module in model.modules()
               if module is not model)
    assert {name for name, param in model.named_parameters() if param.requires_grad} == {
        f"explanation_head.{name}" for name, _ in model.explanation_head.named_parameters()}
    before = {key: value.clone() for key, value in model.state_dict().items()}
    losses = model(_inputs(4))
    assert set(losses) == {"loss_head_keep", "loss_head_destroy", "loss_head_area",
                           "loss_head_tv"}
    sum(losses.values()).backward()
    assert all(param.grad is None for name, param in model.named_parameters()
               if not name.startswith("explanation_head."))
    assert all(torch.equal(value, before[key])
               for key, value in _outside_head(model.state_dict()).items())


@pytest.mark.parametrize("target", ["pred", "label"])
def test_maps_are_trained_for_the_frozen_prediction_or_the_label(target):
    _, model = _pair("fal_p2p3.yaml", "MODEL.EXPLAIN_HEAD.TARGET", target)
    inputs = _inputs(4)
    with torch.no_grad():
        predicted = [output["pred_class"] for output in model.eval()(inputs)]
    expected = predicted if target == "pred" else [x["label"] for x in inputs]
    assert predicted != [x["label"] for x in inputs]
    explained = []
    for head in model.explanation_head.values():
        def recording(features, classes, class_maps=head.class_maps):
            explained.append(classes.tolist())
            return class_maps(features, classes)
        head.class_maps = recording
    model.train()(inputs)
    assert explained == [expected, expected]


def test_draws_depend_only_on_the_seed_and_the_update_count():
    """The images and budgets drawn at a step follow from (SEED, the heads' num_updates), not
    from the global RNG: a copy at the same count draws the same, the next step draws anew."""
    _, model = _pair("fal_p2p3.yaml", "MODEL.EXPLAIN_HEAD.IMS_PER_LEVEL", 2, "SEED", 3)
    model.train()
    copy = build_model(make_tiny_cfg("fal_p2p3.yaml", *ON, "MODEL.EXPLAIN_HEAD.IMS_PER_LEVEL", 2,
                                     "SEED", 3)).train()
    copy.load_state_dict(model.state_dict())
    inputs = _inputs(6)
    torch.manual_seed(0)
    first = model(inputs)
    torch.manual_seed(1)
    assert torch.equal(copy(inputs)["loss_head_keep"], first["loss_head_keep"])
    assert not torch.equal(model(inputs)["loss_head_keep"], first["loss_head_keep"])


# ---------------------------------------------------------------- maps and objective


def test_explanation_output_is_the_heads_map_of_the_predicted_class():
    _, model = _pair("fal_p2p3.yaml")
    inputs = [dict(x, height=48, width=80) for x in _inputs(3)]
    with torch.no_grad():
        outputs = model.eval()(inputs)
        features = model.backbone(model.preprocess_image(inputs).tensor)
    for i, output in enumerate(outputs):
        assert set(output["explanation"]) == {"p2", "p3"}
        for level, resized in output["explanation"].items():
            logits = model.explanation_head[level](features[level][i : i + 1])
            level_map = torch.sigmoid(logits[:, output["pred_class"]])
            expected = level_map[:, None]
            for size in ((64, 64), (48, 80)):  # the padded batch, then the original size
                expected = F.interpolate(expected, size=size, mode="bilinear",
                                         align_corners=False)
            expected = expected[0, 0]
            torch.testing.assert_close(resized, expected)
            assert 0 <= float(resized.min()) and float(resized.max()) <= 1
    plain_outputs = _pair("fal_p2p3.yaml")[0].eval()(inputs)
    assert "explanation" not in plain_outputs[0]


def test_class_maps_of_no_class_are_zero():
    _, model = _pair("fpn_baseline.yaml")
    head = model.explanation_head["p3"].eval()
    features = torch.randn(2, 32, 8, 8)
    maps = head.class_maps(features, torch.tensor([3, -1]))
    torch.testing.assert_close(maps[0], torch.sigmoid(head(features)[0, 3]))
    assert not maps[1].any()


def test_soft_top_k_keeps_about_the_budget_at_one():
    maps = torch.linspace(0, 1, 400).view(1, 20, 20).repeat(2, 1, 1)
    mask = soft_top_k(maps, torch.tensor([25.0, 50.0]), sharpness=500.0)
    kept = (mask > 0.5).float().flatten(1).mean(dim=1)
    torch.testing.assert_close(kept, torch.tensor([0.25, 0.5]), atol=0.01, rtol=0)
    assert float(mask.flatten(1)[:, -1].min()) > 0.99 and float(mask[0].min()) < 0.01


def test_total_variation_is_zero_for_a_constant_map_and_counts_each_step():
    assert float(total_variation(torch.full((2, 5, 5), 0.7))) == 0.0
    step = torch.zeros(1, 4, 4)
    step[:, :, 2:] = 1.0  # one vertical edge: 4 unit differences over 16 pixels
    assert float(total_variation(step)) == pytest.approx(4 / 16)


# ---------------------------------------------------------------- the "head" saliency method


def test_head_saliency_method_reads_the_heads_maps_without_a_backward():
    assert SALIENCY_METHODS["head"] is ExplanationHeadSaliency
    _, model = _pair("fal_p2p3.yaml")
    for head in model.explanation_head.values():
        head.num_updates.fill_(1)
    method = build_saliency_method("head", model, ["p2", "p3"])
    assert not method.needs_gradients
    inputs = _inputs(3)
    classes = torch.tensor([4, 0, 2])
    saliency = method(inputs, target_classes=classes)
    with torch.no_grad():
        features = model.eval().backbone(model.preprocess_image(inputs).tensor)
    for level in ("p2", "p3"):
        expected = model.explanation_head[level].class_maps(features[level], classes)
        torch.testing.assert_close(saliency.maps[level], expected)
    assert all(param.grad is None for param in model.parameters())


def test_head_saliency_method_fails_naming_levels_without_a_trained_head():
    _, model = _pair("fal_p2p3.yaml")
    with pytest.raises(ValueError, match=r"^ExplanationHeadSaliency: the explanation head of "
                                         r"level\(s\) \['p2'\] was never trained; levels with a "
                                         r"trained head: none \(with a head: \['p2', 'p3'\]\)$"):
        ExplanationHeadSaliency(model, ["p2"])
    model.explanation_head["p3"].num_updates.fill_(5)
    with pytest.raises(ValueError, match=r"level\(s\) \['p4'\] have no explanation head; levels "
                                         r"with a trained head: \['p3'\]"):
        ExplanationHeadSaliency(model, ["p3", "p4"])
    plain, _ = _pair("fal_p2p3.yaml")
    with pytest.raises(ValueError, match=r"the model has none \(MODEL.EXPLAIN_HEAD.ENABLED"):
        ExplanationHeadSaliency(plain, ["p2"])


def test_the_evaluator_explains_with_head_only_where_a_trained_head_is(mini_datasets):
    """"head" is a default method: models without a (trained) head skip it, others use it."""
    _, test_set = mini_datasets
    methods = make_tiny_cfg().TEST.EXPLAIN.METHODS
    assert "head" in methods
    plain, model = _pair("fal_p2p3.yaml", "MODEL.CLS_HEAD.NUM_CLASSES", 21)
    for candidate in (plain, model):  # no head; a head never trained
        evaluator = ExplanationEvaluator(test_set, candidate, methods, ["p2", "p3"],
                                         distributed=False)
        assert "head" not in evaluator.method_levels and "gradcam" in evaluator.method_levels
    model.explanation_head["p3"].num_updates.fill_(1)
    evaluator = ExplanationEvaluator(test_set, model, methods, ["p2", "p3"], distributed=False)
    assert evaluator.method_levels["head"] == ["p3"]


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("opts, message", [
    (("MODEL.EXPLAIN_HEAD.BUDGETS", [0]), r"MODEL.EXPLAIN_HEAD.BUDGETS=\[0\]: give percentages"),
    (("MODEL.EXPLAIN_HEAD.TV_WEIGHT", -1.0), "MODEL.EXPLAIN_HEAD.TV_WEIGHT=-1.0 must be >= 0"),
    (("MODEL.EXPLAIN_HEAD.SHARPNESS", 0.0), "MODEL.EXPLAIN_HEAD.SHARPNESS=0.0 must be > 0"),
    (("MODEL.EXPLAIN_HEAD.TARGET", "gt"), "MODEL.EXPLAIN_HEAD.TARGET='gt': expected"),
    (("MODEL.EXPLAIN_HEAD.LEVELS", ["p2", "p2"]), r"MODEL.EXPLAIN_HEAD.LEVELS=\['p2', 'p2'\]"),
    (("MODEL.EXPLAIN_HEAD.LEVELS", ["p9"]), r"MODEL.EXPLAIN_HEAD.LEVELS: unknown level\(s\) "
                                            r"\['p9'\]"),
    (("MODEL.EXPLAIN_HEAD.TRAIN_ONLY_HEAD", True, "MODEL.EXPLAIN_HEAD.START_ITER", 10),
     "MODEL.EXPLAIN_HEAD.START_ITER=10: must be 0 with TRAIN_ONLY_HEAD"),
])
def test_bad_values_fail_at_build_time_naming_the_key(opts, message):
    with pytest.raises(ValueError, match=message):
        build_model(make_tiny_cfg("fal_p2p3.yaml", *ON, *opts))


def test_train_only_head_without_a_head_fails_naming_both_keys():
    cfg = make_tiny_cfg("fal_p2p3.yaml", "MODEL.EXPLAIN_HEAD.TRAIN_ONLY_HEAD", True)
    with pytest.raises(ValueError, match="MODEL.EXPLAIN_HEAD.TRAIN_ONLY_HEAD needs "
                                         "MODEL.EXPLAIN_HEAD.ENABLED True"):
        build_model(cfg)


def test_head_levels_are_checked_at_setup():
    cfg = make_tiny_cfg("fal_p2p3.yaml", *ON, "MODEL.EXPLAIN_HEAD.LEVELS", ["p2", "res4"])
    with pytest.raises(ValueError, match=r"^MODEL.EXPLAIN_HEAD.LEVELS: unknown level\(s\) "
                                         r"\['res4'\]; the backbone"):
        check_levels(cfg)


def test_a_config_with_the_removed_faithful_map_keys_fails_naming_the_replacement(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text(f"_BASE_: {REPO_ROOT}/configs/fal_p2p3.yaml\n"
                      "MODEL:\n  FAL:\n    FAITHFUL_MAP:\n      ENABLED: True\n")
    cfg = make_tiny_cfg()
    with pytest.raises(ValueError, match=rf"^{config}: MODEL.FAL.FAITHFUL_MAP: this key was "
                                         rf"removed; MODEL.EXPLAIN_HEAD replaces it") as error:
        merge_config_file(cfg, str(config))
    assert "\n" not in str(error.value)
    with pytest.raises(AssertionError) as error:  # a command-line override
        cfg.merge_from_list(["MODEL.FAL.FAITHFUL_MAP.START_ITER", "5"])
    assert removed_key_message(str(error.value)) == (
        "MODEL.FAL.FAITHFUL_MAP.START_ITER: this key was removed; MODEL.EXPLAIN_HEAD replaces it "
        "(a decoupled explanation head that cannot change the prediction)")
    assert removed_key_message("Non-existent config key: MODEL.FAL.FAITHFUL") is None


# ---------------------------------------------------------------- the second stage in train_net

HEAD_CONFIG = os.path.join(REPO_ROOT, "configs", "explain_head", "fal_p2p3_R18_cpu_head.yaml")


def _base_weights(path, config=HEAD_CONFIG, *opts):
    """A base model's weights file (random, no head), of the head config's architecture."""
    cfg = make_tiny_cfg(config, "MODEL.EXPLAIN_HEAD.ENABLED", False,
                        "MODEL.EXPLAIN_HEAD.TRAIN_ONLY_HEAD", False, "MODEL.CLS_HEAD.NUM_CLASSES",
                        21, *opts)
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    torch.save({"model": state}, path)
    return state


def _second_stage_args(train_net, output_dir, datasets, weights, config=HEAD_CONFIG):
    opts = mini_train_opts(output_dir, *datasets) + [
        "MODEL.WEIGHTS", str(weights), "TEST.EXPLAIN.METHODS", "['head']"]
    return train_net.get_parser().parse_args(["--config-file", config, *opts])


def test_second_stage_through_train_net_changes_only_the_head(tmp_path, mini_datasets):
    """Three iterations of the real trainer (EMA on, as in Base-FAL): the optimizer holds only the
    head's parameters, every other weight and buffer of model_final equals the base file's, and
    the trained head is evaluated as the "head" method."""
    train_net = load_script(os.path.join("tools", "train_net.py"))
    base = _base_weights(tmp_path / "base.pth")
    cfg = train_net.setup(_second_stage_args(train_net, tmp_path / "run", mini_datasets,
                                             tmp_path / "base.pth"))
    assert cfg.MODEL.EMA.ENABLED
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    optimized = {id(param) for group in trainer.optimizer.param_groups for param in group["params"]}
    assert optimized == {id(param) for param in trainer.model.explanation_head.parameters()}
    trainer.train()

    final = torch.load(tmp_path / "run" / "model_final.pth", weights_only=False)["model"]
    assert set(_outside_head(final)) == set(base)
    changed = [key for key, value in _outside_head(final).items()
               if not torch.equal(value, base[key])]
    assert changed == []
    assert int(final["explanation_head.p2.num_updates"]) == 3
    with open(tmp_path / "run" / "metrics.json") as f:
        records = [json.loads(line) for line in f]
    assert "loss_head_keep" in records[0] and "loss_cls" not in records[0]
    assert any(key.startswith("explanation/head/p2/") for key in records[-1])


def test_second_stage_weights_must_hold_everything_but_the_head(tmp_path, mini_datasets):
    """A file of another model (no branches, for a config with them), or none, fails before
    training, in one line naming what is missing."""
    train_net = load_script(os.path.join("tools", "train_net.py"))
    _base_weights(tmp_path / "fpn.pth", HEAD_CONFIG, "MODEL.FAL.ATTENTION_LEVELS", [])
    for weights, message in [
        (tmp_path / "fpn.pth",
         rf"^{tmp_path / 'fpn.pth'} does not fit the FALClassifier: \d+ tensor\(s\) of the model "
         r"missing from the file \(e.g. backbone.attention_branches.\S+\) \(this run trains only "
         r"explanation_head.\*: the file must hold every other tensor\); set MODEL.WEIGHTS_"),
        ("", r"^MODEL.WEIGHTS is empty, but this run trains only explanation_head.\*: give the "
             r"weights of the rest$"),
    ]:
        args = _second_stage_args(train_net, tmp_path / "run", mini_datasets, weights)
        with pytest.raises(WeightsError, match=message) as error:
            train_net.main(args)
        assert "\n" not in str(error.value)
        assert not (tmp_path / "run" / "last_checkpoint").exists()
