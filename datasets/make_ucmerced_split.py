#!/usr/bin/env python3
"""
Rebuild fal_d2/data/ucmerced_split.json, the fixed UC Merced split, from a prepared dataset.

The committed file is the reference; rerunning this on any complete copy of the dataset (any
image format) reproduces it byte for byte, which tests/test_ucmerced_data.py checks.

Usage:
    python datasets/make_ucmerced_split.py [--dataset DIR] [--output FILE] [--seed 42]
"""
import argparse
import json
import os
import sys

from fal_d2.data.ucmerced import CLASS_NAMES, SPLIT_FILE, SPLIT_SEED, build_ucmerced_split


def stems_by_class(dataset_dir):
    """Class name -> image stems found under ``<dataset_dir>/Images/<class>/``."""
    stems = {}
    for class_name in CLASS_NAMES:
        class_dir = os.path.join(dataset_dir, "Images", class_name)
        if not os.path.isdir(class_dir):
            raise FileNotFoundError(f"{class_dir}: class folder not found")
        stems[class_name] = [
            os.path.splitext(name)[0] for name in os.listdir(class_dir) if not name.startswith(".")
        ]
    return stems


def main(argv=None):
    default_dataset = os.path.join(
        os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "UCMerced_LandUse"
    )
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dataset", default=default_dataset, help="prepared dataset folder")
    parser.add_argument("--output", default=SPLIT_FILE, help="split file to write")
    parser.add_argument("--seed", type=int, default=SPLIT_SEED)
    args = parser.parse_args(argv)
    try:
        split = build_ucmerced_split(stems_by_class(args.dataset), seed=args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with open(args.output, "w") as f:
        json.dump(split, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
