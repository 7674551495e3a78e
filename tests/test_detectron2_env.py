"""The Detectron2 install works in any fresh process, and compiled-only ops fail clearly."""
import itertools
import subprocess
import sys

import pytest
import torch

from conftest import has_compiled_ops

MODULES = ["detectron2.modeling", "detectron2.engine", "detectron2.evaluation", "detectron2.model_zoo"]

pytestmark = pytest.mark.filterwarnings("ignore")

needs_pure_python_build = pytest.mark.skipif(
    has_compiled_ops(), reason="an official Detectron2 with compiled ops is installed"
)


@pytest.mark.parametrize(
    "order",
    [MODULES, MODULES[::-1], list(itertools.permutations(MODULES))[9]],
    ids=["forward", "reverse", "shuffled"],
)
def test_imports_in_fresh_process(order):
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in order)
    code += "import fal_d2\nassert 'fal_d2' in sys.modules\n".replace("sys.", "__import__('sys').")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_model_zoo_config_files_resolve():
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("Base-RCNN-FPN.yaml")
    assert path.endswith("Base-RCNN-FPN.yaml")
    with pytest.raises(RuntimeError, match="not available"):
        model_zoo.get_config_file("no/such.yaml")


def test_transform_default_interpolation_is_bilinear():
    from PIL import Image

    from detectron2.data.transforms import ExtentTransform

    transform = ExtentTransform(src_rect=(0, 0, 8, 8), output_size=(4, 4))
    assert transform.interp == Image.BILINEAR
    assert transform.apply_image(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()).shape == (4, 4, 3)


def _assert_names_op(excinfo, op_text):
    message = str(excinfo.value)
    assert not isinstance(excinfo.value, AttributeError)
    assert op_text in message
    assert "built without compiled ops" in message


@needs_pure_python_build
def test_deformable_conv_error_names_op():
    from detectron2.layers import DeformConv
    from detectron2.layers.deform_conv import _C

    conv = DeformConv(2, 2, kernel_size=3, padding=1)
    x = torch.rand(1, 2, 5, 5)
    offset = torch.zeros(1, 18, 5, 5)
    # On CPU, Detectron2 runs the forward through torchvision; CUDA tensors reach the compiled op.
    assert conv(x, offset).shape == (1, 2, 5, 5)
    for op in ["deform_conv_forward", "modulated_deform_conv_forward"]:
        with pytest.raises(Exception) as excinfo:
            getattr(_C, op)(x, conv.weight, offset)
        _assert_names_op(excinfo, "deformable convolution")


@needs_pure_python_build
def test_rotated_ops_error_names_op():
    from detectron2.layers import ROIAlignRotated, nms_rotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]])
    with pytest.raises(Exception) as excinfo:
        nms_rotated(boxes, torch.ones(1), 0.5)
    _assert_names_op(excinfo, "rotated NMS")
    with pytest.raises(Exception) as excinfo:
        pairwise_iou_rotated(boxes, boxes)
    _assert_names_op(excinfo, "rotated box IoU")
    with pytest.raises(Exception) as excinfo:
        ROIAlignRotated((2, 2), 1.0, 0)(torch.zeros(1, 1, 8, 8), torch.tensor([[0.0, 4, 4, 4, 4, 0]]))
    _assert_names_op(excinfo, "ROIAlignRotated")


@needs_pure_python_build
def test_fast_cocoeval_error_names_op():
    from pycocotools.coco import COCO

    from detectron2.evaluation.fast_eval_api import COCOeval_opt

    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": 1, "width": 10, "height": 10}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}
        ],
    }
    ground_truth.createIndex()
    detections = ground_truth.loadRes([{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 1.0}])
    with pytest.raises(Exception) as excinfo:
        COCOeval_opt(ground_truth, detections, "bbox").evaluate()
    _assert_names_op(excinfo, "fast COCOeval")
