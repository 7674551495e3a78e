#!/usr/bin/env python
"""Train and evaluate fal_d2 models (UC Merced classification, COCO detection) with Detectron2.

    python tools/train_net.py --config-file configs/fal_p2p3.yaml
    python tools/train_net.py --config-file configs/fal_p2p3.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
    python tools/train_net.py --config-file configs/fal_p2p3.yaml --num-gpus 8

This is Detectron2's standard ``train_net.py`` with fal_d2's config keys, data mapper and evaluators.
"""
import logging
import os

import torch

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import (
    DatasetMapper,
    MetadataCatalog,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, verify_results

import fal_d2  # noqa: F401  (registers models and datasets)
from fal_d2.config import add_fal_config, check_config_against_datasets
from fal_d2.data import (
    ClassificationDatasetMapper,
    build_batched_test_loader,
    build_classification_train_loader,
)
from fal_d2.evaluation import ClassificationEvaluator, ExplanationEvaluator
from fal_d2.evaluation.explanation_evaluator import check_explain_config
from fal_d2.evaluation.report import write_evaluation_report

CLASSIFICATION_META_ARCHS = {"FALClassifier"}


def is_classification(cfg):
    return cfg.MODEL.META_ARCHITECTURE in CLASSIFICATION_META_ARCHS


class Trainer(DefaultTrainer):
    """DefaultTrainer with the classification mapper and fal_d2's evaluators."""

    @classmethod
    def build_train_loader(cls, cfg):
        if is_classification(cfg):
            return build_classification_train_loader(cfg)
        return build_detection_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader, but with TEST.IMS_PER_BATCH images per batch."""
        if is_classification(cfg):
            mapper = ClassificationDatasetMapper(cfg, is_train=False)
        else:
            mapper = DatasetMapper(cfg, is_train=False)
        return build_batched_test_loader(
            get_detection_dataset_dicts([dataset_name], filter_empty=False),
            mapper=mapper,
            batch_size=cfg.TEST.IMS_PER_BATCH,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None, model=None):
        """Accuracy (or COCO AP) for the dataset's ``evaluator_type``, plus explanations if enabled.

        Explanations need the model (they run saliency methods), which Detectron2 does not pass to
        ``build_evaluator``; :meth:`test` passes it.
        """
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
        if evaluator_type == "classification":
            evaluators = [ClassificationEvaluator(dataset_name, output_dir=output_folder)]
        elif evaluator_type == "coco":
            # The fast COCOeval needs compiled ops; the pure-Python API gives the same numbers.
            evaluators = [COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)]
        else:
            raise NotImplementedError(
                f"no evaluator for dataset '{dataset_name}' with evaluator_type={evaluator_type!r}"
            )
        if cfg.TEST.EXPLAIN.ENABLED and model is not None:
            evaluators.append(ExplanationEvaluator.from_config(cfg, dataset_name, model))
        return DatasetEvaluators(evaluators)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Detectron2's test, with the model handed to the evaluators and an HTML report per dataset."""
        if evaluators is None:
            bare_model = getattr(model, "module", model)  # unwrap DistributedDataParallel
            evaluators = [
                cls.build_evaluator(cfg, name, model=bare_model) for name in cfg.DATASETS.TEST
            ]
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            for dataset_name in cfg.DATASETS.TEST:
                inference_dir = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
                os.makedirs(inference_dir, exist_ok=True)
                explain_root = cfg.TEST.EXPLAIN.OUTPUT_DIR or os.path.join(cfg.OUTPUT_DIR, "explain")
                write_evaluation_report(
                    os.path.join(inference_dir, "report.html"),
                    dataset_name=dataset_name,
                    results=results if len(cfg.DATASETS.TEST) == 1 else results.get(dataset_name),
                    inference_dir=inference_dir,
                    explain_dir=os.path.join(explain_root, dataset_name),
                    notes=f"config: {cfg.MODEL.META_ARCHITECTURE}, "
                    f"attention levels {list(cfg.MODEL.FAL.ATTENTION_LEVELS)}, "
                    f"weights: {cfg.MODEL.WEIGHTS or 'trained in this run'}",
                )
        return results


def setup(args):
    cfg = get_cfg()
    add_fal_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("fal_d2").warning("CUDA is not available: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    check_config_against_datasets(cfg)
    check_explain_config(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def print_outputs(cfg):
    """Tell the user where the results are."""
    paths = [os.path.join(cfg.OUTPUT_DIR, name) for name in ("metrics.json", "model_final.pth")]
    for dataset_name in cfg.DATASETS.TEST:
        folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        if os.path.isdir(folder):
            paths += [os.path.join(folder, name) for name in sorted(os.listdir(folder))]
    paths.append(cfg.TEST.EXPLAIN.OUTPUT_DIR or os.path.join(cfg.OUTPUT_DIR, "explain"))
    print("Outputs:")
    for path in paths:
        if os.path.exists(path):
            print(f"  {path}")


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
            print_outputs(cfg)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    if comm.is_main_process():
        print_outputs(cfg)
    return results


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
