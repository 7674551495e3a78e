#!/usr/bin/env python
"""Train and evaluate fal_d2 models (UC Merced classification, COCO detection) with Detectron2.

    python tools/train_net.py --config-file configs/fal_p2p3.yaml
    python tools/train_net.py --config-file configs/fal_p2p3.yaml --eval-only \\
        --opts MODEL.WEIGHTS out/model_final.pth
    python tools/train_net.py --config-file configs/fal_p2p3.yaml --num-gpus 8

This is Detectron2's standard train_net.py with fal_d2's config keys, data mapper and evaluators;
config overrides go after --opts or, as in Detectron2, at the end of the line. It fails early,
with one line, on what would otherwise give a wrong answer quietly: a typo in the config (naming
the YAML file), an unknown level (checked before the first iteration), no weights for --eval-only
(unless --allow-random-weights) and weights that do not fit the model (unless
MODEL.WEIGHTS_PARTIAL). Checkpoints are written atomically and --resume skips a damaged one
(fal_d2/checkpoint.py); it is exact, as checkpoints also hold the data position and the run's
seed (fal_d2/engine/exact_resume.py). --eval-only appends its results, with the weights file and
its sha256, to OUTPUT_DIR/metrics.json.
"""
import json
import logging
import os

import torch

import detectron2.utils.comm as comm
from detectron2.data import (
    DatasetMapper,
    MetadataCatalog,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks, launch
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, verify_results
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils.logger import setup_logger

import fal_d2  # registers models and datasets
from fal_d2.checkpoint import FALCheckpointer, check_weights_given, file_sha256
from fal_d2.config import check_config_against_datasets, check_training_recipe, load_config
from fal_d2.data import (
    ClassificationDatasetMapper,
    build_batched_test_loader,
    build_classification_train_loader,
    build_resumable_train_loader,
)
from fal_d2.engine import ExactResumeMixin
from fal_d2.evaluation import ClassificationEvaluator, ExplanationEvaluator
from fal_d2.evaluation.explanation_evaluator import check_explain_config
from fal_d2.evaluation.report import write_evaluation_report
from fal_d2.evaluation.tensorboard_grids import put_explanation_grids
from fal_d2.levels import check_levels
from fal_d2.task import is_classifier
from fal_d2.utils.atomic_io import atomic_write_text
from fal_d2.utils.distributed import broadcast_buffers_from_main_process, end_distributed_run
from fal_d2.utils.tool_args import ToolArgumentParser
from fal_d2.weight_ema import WeightEMA


class Trainer(ExactResumeMixin, DefaultTrainer):
    """DefaultTrainer with the classification mapper, fal_d2's evaluators, its checkpointer and
    exact resume (a resumable training loader, :class:`~fal_d2.engine.ExactResumeMixin`)."""

    def build_hooks(self):
        # DefaultTrainer.__init__ builds a plain DetectionCheckpointer just before the hooks; swap
        # in FALCheckpointer here, so that the PeriodicCheckpointer hook saves through it too.
        # In the explanation head's second stage, MODEL.WEIGHTS must hold all but the head.
        plain = self.checkpointer
        self.checkpointer = FALCheckpointer(
            plain.model, plain.save_dir, save_to_disk=plain.save_to_disk,
            partial=self.cfg.MODEL.WEIGHTS_PARTIAL, training=True,
            new_prefixes=("explanation_head.",) if self.cfg.MODEL.EXPLAIN_HEAD.TRAIN_ONLY_HEAD
            else None, **plain.checkpointables,
        )
        hook_list = super().build_hooks()
        if self.cfg.MODEL.EMA.ENABLED:
            hook_list = self._with_weight_ema(hook_list)
        return hook_list

    def _with_weight_ema(self, hook_list):
        """Insert :class:`WeightEMA` before the checkpointer (so each checkpoint holds the average
        up to its own step, and ``model_final`` the average itself) and evaluate the average."""
        self.weight_ema = WeightEMA(self.model, self.cfg.MODEL.EMA.DECAY)
        first = next(i for i, hook in enumerate(hook_list)
                     if isinstance(hook, (hooks.PeriodicCheckpointer, hooks.EvalHook)))
        hook_list.insert(first, self.weight_ema)

        def test_weight_ema():  # DefaultTrainer's evaluation function, on the average
            self._last_eval_results = self.test(self.cfg, self.weight_ema.ema_model)
            return self._last_eval_results

        return [hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, test_weight_ema)
                if isinstance(hook, hooks.EvalHook) else hook for hook in hook_list]

    @classmethod
    def build_train_loader(cls, cfg):
        """A loader that checkpoints can reposition; Detectron2's for detection with another
        DATALOADER.SAMPLER_TRAIN (whose resume then restarts the sample order)."""
        if is_classifier(cfg):
            return build_classification_train_loader(cfg)
        if cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler":
            return build_resumable_train_loader(cfg, DatasetMapper(cfg, is_train=True))
        return build_detection_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader, but with TEST.IMS_PER_BATCH images per batch."""
        if is_classifier(cfg):
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
    def test(cls, cfg, model, evaluators=None, weights_note=None):
        """
        Detectron2's test, with the model handed to the evaluators and an HTML report per dataset.
        ``weights_note`` says in the report which weights were evaluated; None: the model being
        trained in this run. During training, the explanation grids also go to TensorBoard.
        """
        if weights_note is None:
            start = f"initialised from {cfg.MODEL.WEIGHTS}" if cfg.MODEL.WEIGHTS else "from scratch"
            average = ", their EMA" if cfg.MODEL.EMA.ENABLED else ""
            weights_note = f"weights: trained in this run ({cfg.OUTPUT_DIR}, {start}{average})"
        if evaluators is None:
            bare_model = getattr(model, "module", model)  # unwrap DistributedDataParallel
            evaluators = [
                cls.build_evaluator(cfg, name, model=bare_model) for name in cfg.DATASETS.TEST
            ]
        # Each worker's BatchNorm statistics follow its own batches (DDP with broadcast_buffers=
        # False); evaluate everywhere the model the main process saves.
        broadcast_buffers_from_main_process(model)
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
                    f"attention levels {list(cfg.MODEL.FAL.ATTENTION_LEVELS)}, {weights_note}",
                )
                if cfg.TEST.EXPLAIN.ENABLED and cfg.TEST.EXPLAIN.VIS_PER_CLASS > 0:
                    put_explanation_grids(os.path.join(explain_root, dataset_name), dataset_name,
                                          cfg.TEST.EXPLAIN.METHODS)
        return results


def get_parser():
    """Detectron2's argument parser, plus --opts and --allow-random-weights."""
    parser = ToolArgumentParser(__doc__, parents=[default_argument_parser()], add_help=False)
    parser.add_overrides_argument()
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="let --eval-only run without MODEL.WEIGHTS (a random model)")
    return parser


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("fal_d2").warning("CUDA is not available: running on the CPU")
        cfg.MODEL.DEVICE = "cpu"
    check_config_against_datasets(cfg)
    check_explain_config(cfg)
    check_levels(cfg)
    check_training_recipe(cfg)
    resumable = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if args.eval_only and not resumable:
        check_weights_given(cfg.MODEL.WEIGHTS, getattr(args, "allow_random_weights", False),
                            "--eval-only", "pass --allow-random-weights")
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup logs Detectron2's and fvcore's messages; fal_d2's (checkpoint fits, resume
    # warnings) go to the same console and OUTPUT_DIR/log.txt.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="fal_d2")
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


def write_eval_metrics(cfg, results, weights_file, sha256, iteration):
    """Add one JSON line to OUTPUT_DIR/metrics.json, in the trainer's writer's format: the results
    flattened ("classification/top1"...), the weights file, its sha256, its iteration and fal_d2's
    version. The file is rewritten atomically, so a kill cannot leave the earlier lines
    half-written."""
    record = {"eval_only": True, "weights": weights_file, "weights_sha256": sha256,
              "iteration": iteration, "fal_d2_version": fal_d2.__version__,
              **flatten_results_dict(results)}
    path = os.path.join(cfg.OUTPUT_DIR, "metrics.json")
    existing = ""
    if os.path.isfile(path):
        with open(path) as f:
            existing = f.read()
    if existing and not existing.endswith("\n"):
        existing += "\n"  # a line cut by a killed writer stays a line of its own
    atomic_write_text(path, existing + json.dumps(record, sort_keys=True) + "\n")


def evaluate(cfg, args):
    """--eval-only: load the weights (checked), evaluate, and record which file was evaluated."""
    model = Trainer.build_model(cfg)
    checkpointer = FALCheckpointer(model, save_dir=cfg.OUTPUT_DIR,
                                   partial=cfg.MODEL.WEIGHTS_PARTIAL)
    extra = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    weights_file = checkpointer.loaded_file
    sha256 = file_sha256(weights_file) if weights_file else None
    note = (f"weights: {weights_file} (sha256 {sha256})" if weights_file
            else "weights: none, randomly initialised (--allow-random-weights)")
    results = Trainer.test(cfg, model, weights_note=note)
    if comm.is_main_process():
        verify_results(cfg, results)
        write_eval_metrics(cfg, results, weights_file, sha256, extra.get("iteration"))
        print_outputs(cfg)
    end_distributed_run()
    return results


def main(args):
    cfg = setup(args)
    if args.eval_only:
        return evaluate(cfg, args)

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    if comm.is_main_process():
        print_outputs(cfg)
    end_distributed_run()
    return results


if __name__ == "__main__":
    args = get_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
