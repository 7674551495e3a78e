#!/usr/bin/env python3
"""
Write a synthetic COCO-format detection set of circles, squares and triangles on noisy backgrounds.

The generator lives in ``fal_d2.data.shapes_coco`` (importable as ``make_shapes_coco``); this is its
command line. The builtin names ``shapes_coco_train`` / ``shapes_coco_val`` read
``$DETECTRON2_DATASETS/shapes_coco/{train,val}``:

    python datasets/make_shapes_coco.py --output datasets/shapes_coco/train --num-images 400 --seed 0
    python datasets/make_shapes_coco.py --output datasets/shapes_coco/val --num-images 50 --seed 1
"""
import argparse
import sys

from fal_d2.data.shapes_coco import make_shapes_coco

__all__ = ["make_shapes_coco"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output", required=True, help="folder to write (replaced if it exists)")
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--size", type=int, default=128, help="side of the square images, in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        json_path, image_dir = make_shapes_coco(args.output, args.num_images, args.size, args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {json_path} and {args.num_images} images in {image_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
