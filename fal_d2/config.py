"""Config keys added by fal_d2, in Detectron2's ``add_*_config`` style."""
import re
from typing import List, Optional, Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


def add_fal_config(cfg):
    """Add fal_d2's keys to a Detectron2 config, with defaults for training from scratch."""
    # No ImageNet weights are assumed: FrozenBN and a frozen stem would cripple training.
    cfg.MODEL.RESNETS.NORM = "BN"  # trainable BatchNorm in the ResNet trunk
    cfg.MODEL.BACKBONE.FREEZE_AT = 0  # train every ResNet stage, stem included

    cfg.MODEL.CHANNELS_LAST = False  # NHWC tensors: tensor-core convolutions without layout transposes (GPU + AMP)
    cfg.MODEL.WEIGHTS_PARTIAL = False  # load MODEL.WEIGHTS even if tensors are missing, extra or of another shape (fal_d2/checkpoint.py)
    cfg.MODEL.FAL = CN()
    cfg.MODEL.FAL.ATTENTION_LEVELS = []  # backbone outputs that get an attention branch; [] = plain backbone
    cfg.MODEL.FAL.ATTENTION_BRANCH = "ABNAttentionBranch"  # name in ATTENTION_BRANCH_REGISTRY
    cfg.MODEL.FAL.BRANCH_CHANNELS = 64  # a 1x1 conv first reduces a level to this width, keeping p2 cheap
    cfg.MODEL.FAL.BRANCH_NUM_CONVS = 2  # 3x3 convs at the reduced width before the class-response conv
    cfg.MODEL.FAL.BRANCH_NORM = "BN"  # norm of the branch convs ("" for none, else get_norm names); BN kinds also after K and M
    cfg.MODEL.FAL.ATT_LOSS_WEIGHT = 1.0  # lambda in L = L_per + sum_levels lambda * L_att(level), as in ABN
    cfg.MODEL.FAL.RESNET_ATTENTION_AFTER = "res4"  # ABN on a plain ResNet: the stage whose output is attended

    # A decoupled explanation head (FALClassifier only): per level, a few convs on the *detached*
    # features give one map per class, trained against the frozen classifier to keep its decision
    # on the map's top k % and lose it on the rest; it cannot change the prediction. Trained
    # jointly (from START_ITER) or as a second stage (TRAIN_ONLY_HEAD). See
    # fal_d2/modeling/explanation_head.py and explanation_head_loss.py.
    cfg.MODEL.EXPLAIN_HEAD = CN()
    cfg.MODEL.EXPLAIN_HEAD.ENABLED = False  # build the head (outputs "explanation"; method "head")
    cfg.MODEL.EXPLAIN_HEAD.LEVELS = ["p2", "p3"]  # backbone outputs that get a head
    cfg.MODEL.EXPLAIN_HEAD.CHANNELS = 64  # a 1x1 conv first reduces the level to this width
    cfg.MODEL.EXPLAIN_HEAD.NUM_CONVS = 2  # 3x3 conv+BN+ReLU layers after it, before the 1x1 conv to K maps
    cfg.MODEL.EXPLAIN_HEAD.TARGET = "pred"  # class trained for: "pred" (frozen model's) or "label"
    cfg.MODEL.EXPLAIN_HEAD.KEEP_WEIGHT = 1.0  # weight of CE(f(T*x), c): the top k % keeps c
    cfg.MODEL.EXPLAIN_HEAD.DESTROY_WEIGHT = 1.0  # weight of p_c(f((1-T)*x)): hiding it loses c
    cfg.MODEL.EXPLAIN_HEAD.AREA_WEIGHT = 0.2  # weight of mean(S): low outside the evidence
    cfg.MODEL.EXPLAIN_HEAD.TV_WEIGHT = 0.2  # weight of S's total variation: a smooth map
    cfg.MODEL.EXPLAIN_HEAD.BUDGETS = [15, 50]  # k % kept by T, drawn per image from these
    cfg.MODEL.EXPLAIN_HEAD.SHARPNESS = 20.0  # T = sigmoid(SHARPNESS * (S - q_k)), soft top k %
    cfg.MODEL.EXPLAIN_HEAD.IMS_PER_LEVEL = 4  # images masked per level and batch; 0 = all
    cfg.MODEL.EXPLAIN_HEAD.START_ITER = 0  # joint training: first iteration with its losses
    cfg.MODEL.EXPLAIN_HEAD.TRAIN_ONLY_HEAD = False  # 2nd stage: all else frozen, only head losses

    cfg.MODEL.CLS_HEAD = CN()
    cfg.MODEL.CLS_HEAD.NAME = "PooledFusionHead"  # name in CLS_HEAD_REGISTRY (perception head)
    cfg.MODEL.CLS_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]  # backbone outputs the head pools and fuses
    cfg.MODEL.CLS_HEAD.NUM_CLASSES = 21  # K; must equal the number of classes of the training dataset
    cfg.MODEL.CLS_HEAD.DROPOUT = 0.0  # dropout before the final linear layer
    cfg.MODEL.CLS_HEAD.LABEL_SMOOTHING = 0.0  # epsilon of label smoothing for L_per and every L_att, in [0, 1)

    # An exponential moving average of the weights (FALClassifier training), evaluated instead of
    # the trained weights: from scratch on 1680 images the last iterates are noisy. See fal_d2/weight_ema.py.
    cfg.MODEL.EMA = CN()
    cfg.MODEL.EMA.ENABLED = False  # keep the EMA, evaluate it, and write it as model_final.pth
    cfg.MODEL.EMA.DECAY = 0.999  # per-iteration decay, in (0, 1); ramped up as (1 + t) / (10 + t) early on

    cfg.INPUT.CLS = CN()
    cfg.INPUT.CLS.SIZE = 256  # train and test images are resized to SIZE x SIZE
    cfg.INPUT.CLS.RANDOM_FLIP = True  # random horizontal and vertical flips (aerial scenes have no "up")
    cfg.INPUT.CLS.RANDOM_ROTATE90 = True  # random rotation by a multiple of 90 degrees
    cfg.INPUT.CLS.COLOR_JITTER = 0.0  # max relative change of brightness, contrast and saturation; 0 = off
    cfg.INPUT.CLS.CROP_SCALE = [1.0, 1.0]  # random resized crop: [min, max] fraction of the area kept, in (0, 1]; [1, 1] = off
    cfg.INPUT.CLS.CROP_RATIO = [0.75, 1.3333]  # [min, max] aspect ratio (w / h) of the random crop
    # Batch mixing (FALClassifier training): images and their one-hot labels are mixed in the model,
    # so L_per and every L_att take the same mixed targets. See fal_d2/modeling/batch_mixing.py.
    cfg.INPUT.CLS.MIXUP_ALPHA = 0.0  # mixup (Zhang et al., 2018): lambda ~ Beta(alpha, alpha); 0 = off
    cfg.INPUT.CLS.CUTMIX_ALPHA = 0.0  # CutMix (Yun et al., 2019): box area ~ Beta(alpha, alpha); 0 = off
    cfg.INPUT.CLS.MIX_PROB = 1.0  # probability that a batch is mixed; with both on, each is picked half the time

    # Your own images, <ROOT>/<class name>/<image>, registered by the tools as <NAME>_train,
    # <NAME>_test and <NAME>_all (fal_d2/data/image_folder.py): name them in DATASETS.TRAIN/TEST.
    cfg.DATASETS.IMAGE_FOLDER = CN()
    cfg.DATASETS.IMAGE_FOLDER.NAME = ""  # prefix of the registered names; "" = register none
    cfg.DATASETS.IMAGE_FOLDER.ROOT = ""  # the folder holding one sub-folder of images per class
    cfg.DATASETS.IMAGE_FOLDER.SPLIT_FILE = ""  # JSON {"train": [...], "test": [...]}; "" = seeded
    cfg.DATASETS.IMAGE_FOLDER.TEST_FRACTION = 0.2  # seeded split: share of each class for test
    cfg.DATASETS.IMAGE_FOLDER.SEED = 0  # seeded split: seed of the shuffle (not the training SEED)

    cfg.DATALOADER.CACHE_IMAGES = True  # keep decoded images in memory: the set is small, decoding is not

    cfg.TEST.IMS_PER_BATCH = 1  # images per inference batch per process; 1 is Detectron2's timing convention
    cfg.TEST.EXPLAIN = CN()
    cfg.TEST.EXPLAIN.ENABLED = False  # add ExplanationEvaluator beside the accuracy evaluator
    cfg.TEST.EXPLAIN.METHODS = ["branch_cam", "attention", "gradcam", "gradcampp", "head", "random"]  # saliency methods (fal_d2.explain); "random": the control
    cfg.TEST.EXPLAIN.LEVELS = ["p2", "p3", "p4", "p5"]  # pyramid levels to explain
    cfg.TEST.EXPLAIN.TARGET = "pred"  # class explained: "pred" (predicted) or "gt" (ground truth)
    cfg.TEST.EXPLAIN.VIS_PER_CLASS = 2  # images per class drawn as heatmaps in the grid figure and report
    cfg.TEST.EXPLAIN.OUTPUT_DIR = ""  # heatmaps, grids, metrics and report go to <this>/<dataset>; "" = OUTPUT_DIR/explain
    cfg.TEST.EXPLAIN.AUC_STEPS = 16  # steps of the RISE deletion/insertion curves; 0 skips them (2*(steps+1) forwards/image)
    cfg.TEST.EXPLAIN.INSERTION_BASELINE = "blur"  # image the insertion curve starts from: "blur" (RISE) or "zero"
    cfg.TEST.EXPLAIN.MASK = "normalized"  # masked pixels: "normalized" (mean colour, as pytorch-grad-cam/TorchCAM) or "pixel" (black)
    cfg.TEST.EXPLAIN.BUDGETS = [15, 50]  # AD/IC also with only each map's top k % of pixels kept (TAME); 100 = the whole map
    cfg.TEST.EXPLAIN.BUDGET_MODE = "binary"  # a budget keeps its pixels at 1 ("binary": ranking only) or at their values ("valued", TAME)


def _model_num_classes(cfg):
    """(key, value) of the class count the model's classifier is built with."""
    from fal_d2.task import is_classifier, is_retinanet

    if is_classifier(cfg):
        return "MODEL.CLS_HEAD.NUM_CLASSES", cfg.MODEL.CLS_HEAD.NUM_CLASSES
    if is_retinanet(cfg):
        return "MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES
    return "MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES


def check_config_against_datasets(cfg):
    """Fail early, naming the key, when the model's class count disagrees with its datasets."""
    from detectron2.data import MetadataCatalog

    key, num_classes = _model_num_classes(cfg)
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"{key}={num_classes} but dataset '{name}' has {len(classes)} classes")


def model_class_names(cfg) -> Optional[List[str]]:
    """The names of the model's classes: the first test set's ``thing_classes`` when it has as many
    as the model, else None (the names of another label set would be wrong ones)."""
    from detectron2.data import MetadataCatalog

    if not cfg.DATASETS.TEST:
        return None
    names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes")
    _, num_classes = _model_num_classes(cfg)
    return list(names) if names is not None and len(names) == num_classes else None


def load_config(config_file: str, opts: Sequence[str] = ()):
    """A Detectron2 config with fal_d2's keys, ``config_file`` merged (errors name the file), then
    the ``KEY VALUE`` overrides ``opts``, its image-folder dataset registered; not frozen, so that
    a tool can still set its keys."""
    cfg = get_cfg()
    add_fal_config(cfg)
    merge_config_file(cfg, config_file)
    cfg.merge_from_list(list(opts))
    from fal_d2.data.image_folder import register_from_config

    register_from_config(cfg)  # a user's image-folder dataset (DATASETS.IMAGE_FOLDER), if any
    return cfg


def merge_config_file(cfg, path):
    """``cfg.merge_from_file(path)``, naming the YAML file when a key or value in it (or in its
    ``_BASE_`` files) is wrong: yacs's own message names only the key."""
    import yaml

    try:
        cfg.merge_from_file(path)
    except (KeyError, ValueError, AssertionError, yaml.YAMLError) as error:
        message = str(error.args[0] if error.args else error).splitlines()[0]
        raise ValueError(f"{path}: {removed_key_message(message) or message}") from None


# Keys that configs may still set, with what replaces them.
REMOVED_KEYS = {
    "MODEL.FAL.FAITHFUL_MAP": "MODEL.EXPLAIN_HEAD replaces it (a decoupled explanation head "
                              "that cannot change the prediction)",
}


def removed_key_message(message: str):
    """For yacs's "Non-existent config key: K" (from a file) or "Non-existent key: K" (from
    ``merge_from_list``) about a removed key K, a line saying so and what replaces it; None for
    any other message."""
    match = re.fullmatch(r"Non-existent (?:config )?key: (\S+)", message)
    key = match.group(1) if match else ""
    for removed, replacement in REMOVED_KEYS.items():
        if key == removed or key.startswith(removed + "."):
            return f"{key}: this key was removed; {replacement}"
    return None


def check_training_recipe(cfg):
    """Fail at setup, with one line naming the key, on a recipe value out of range: a mixing or
    smoothing value, a crop range with min > max, an EMA decay outside (0, 1)."""
    from fal_d2.data.random_resized_crop import check_crop_config
    from fal_d2.modeling.batch_mixing import check_batch_mixing
    from fal_d2.weight_ema import check_ema_config

    check_batch_mixing(cfg)
    check_crop_config(cfg)
    check_ema_config(cfg)
