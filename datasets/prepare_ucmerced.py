#!/usr/bin/env python3
"""
Prepare the UC Merced Land Use dataset in Detectron2's layout:

    <root>/UCMerced_LandUse/Images/<class>/<image>   (+ readme.txt)

where <root> is --root, else $DETECTRON2_DATASETS, else ./datasets.

The source (--source) is a folder in the original layout (<dir>/Images/<class>/<image>, or
<dir>/<one folder>/Images/...) or the official zip; without --source the official zip is
downloaded. Every image is decoded in full and converted to 8-bit RGB: images that already are
8-bit RGB are copied verbatim (their format kept), others (grayscale, palette, RGBA, 16-bit) are
written converted as PNG. The dataset is assembled in a temporary folder inside <root> and renamed
into place, so a failure leaves <root> as it was. Bad input ends with a one-line error that names
the offending file and a non-zero exit status.

Checksums:
  * The official zip's sha256 is not published. It is always computed and printed;
    OFFICIAL_ZIP_SHA256 pins it for downloads once a download has been verified (until then it is
    None and downloads are not checked); --sha256 checks any zip source against a given value.
  * --verify MANIFEST.tsv compares the sha256 of each image's decoded RGB pixels with the
    manifest's rgb_pixels_sha256, matching by class and stem so the extension does not matter.
    This holds for lossless copies (the original TIFFs, PNG, lossless WebP); a JPEG copy never
    matches.

Usage:
    python datasets/prepare_ucmerced.py [--source DIR_OR_ZIP] [--root ROOT] [--force]
        [--verify MANIFEST.tsv] [--sha256 HEX] [--workers N]
"""
import argparse
import csv
import hashlib
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from tqdm import tqdm

OFFICIAL_URL = "http://weegee.vision.ucmerced.edu/datasets/UCMerced_LandUse.zip"
# Pin after the first verified download (copy the sha256 this script prints). None: not checked.
OFFICIAL_ZIP_SHA256 = None
DATASET_DIRNAME = "UCMerced_LandUse"
# Same as fal_d2.data.ucmerced.CLASS_NAMES (a test checks); repeated here so that this script does
# not import Detectron2, which takes seconds.
CLASS_NAMES = (
    "agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
    "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
    "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
    "sparseresidential", "storagetanks", "tenniscourt",
)  # fmt: skip
IMAGE_EXTENSIONS = (".tif", ".tiff", ".webp", ".png", ".jpg", ".jpeg")
# PIL converts these to 8-bit RGB without loss of range (alpha is dropped).
PIL_CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
# Integer greyscale modes holding 16-bit values; PIL's own convert("RGB") would clip them at 255.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class PrepareError(Exception):
    """Bad input or environment: reported as one line, without a traceback."""


def to_rgb8(image):
    """
    Convert a decoded PIL image to an HxWx3 uint8 RGB array. 16-bit greyscale is scaled to
    round(v / 257), which maps 0..65535 onto 0..255 and inverts the usual 8-to-16-bit expansion
    v * 257 exactly. Mode "I" (32-bit) is read as 16-bit, as PIL decodes some 16-bit files to it.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"mode {image.mode} values outside the 16-bit range 0..65535")
        grey = ((values + 128) // 257).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode not in PIL_CONVERTIBLE_MODES:
        raise ValueError(f"unsupported image mode {image.mode}")
    return np.asarray(image.convert("RGB"))


def _decode(path):
    """Returns (RGB array, whether the file is 8-bit RGB); raises ValueError if unreadable."""
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        image = Image.open(path)
        image.load()
    except Image.UnidentifiedImageError:
        raise ValueError("not a readable image") from None
    except Exception as e:  # decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise ValueError(" ".join(f"cannot decode: {e}".split())) from None
    with image:
        return to_rgb8(image), image.mode == "RGB"


def process_image(task):
    """
    Decode one image and write it to the output folder. Runs in worker processes.

    Args:
        task (tuple[str, str]): source path, output folder.

    Returns:
        dict: "src", "error" (None or the reason), "sha256" of the decoded RGB pixels, "converted".
    """
    src, out_dir = task
    try:
        rgb, is_rgb8 = _decode(src)
    except ValueError as e:
        return {"src": src, "error": str(e), "sha256": None, "converted": False}
    name = os.path.basename(src)
    if is_rgb8:
        shutil.copyfile(src, os.path.join(out_dir, name))
    else:
        Image.fromarray(rgb).save(os.path.join(out_dir, os.path.splitext(name)[0] + ".png"))
    sha256 = hashlib.sha256(rgb.tobytes()).hexdigest()
    return {"src": src, "error": None, "sha256": sha256, "converted": not is_rgb8}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, dest):
    """Download ``url`` to the file ``dest``, with a progress bar."""
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url) as response, open(dest, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        raise PrepareError(f"{url}: download failed: {getattr(e, 'reason', e)}") from None


def extract_zip(zip_path, dest):
    """Extract ``zip_path`` into ``dest``, refusing members that would land outside it."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for name in archive.namelist():
                parts = PurePosixPath(name.replace("\\", "/")).parts
                if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
                    raise PrepareError(
                        f"{zip_path}: member {name!r} would be extracted outside the target folder"
                    )
            archive.extractall(dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise PrepareError(f"{zip_path}: not a valid zip archive ({e})") from None


def find_images_dir(base, describe):
    """``base/Images``, or ``base/<only folder>/Images`` as in the official zip."""
    candidates = [base / "Images"]
    subdirs = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    if len(subdirs) == 1:
        candidates.append(subdirs[0] / "Images")
    for images_dir in candidates:
        if images_dir.is_dir():
            return images_dir
    raise PrepareError(f"{describe(base)}: no Images/ folder (expected Images/<class>/<image>)")


def list_images(images_dir, describe):
    """Returns {class name: sorted image paths}; checks the folder holds exactly the 21 classes."""
    for entry in sorted(images_dir.iterdir()):
        if not entry.name.startswith(".") and entry.name not in CLASS_NAMES:
            raise PrepareError(f"{describe(entry)}: unexpected entry, expected only class folders")
    images = {}
    for class_name in CLASS_NAMES:
        class_dir = images_dir / class_name
        if not class_dir.is_dir():
            raise PrepareError(f"{describe(class_dir)}: class folder is missing")
        paths = sorted(p for p in class_dir.iterdir() if not p.name.startswith("."))
        if not paths:
            raise PrepareError(f"{describe(class_dir)}: class folder is empty")
        stems = {}
        for path in paths:
            if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
                expected = ", ".join(IMAGE_EXTENSIONS)
                raise PrepareError(f"{describe(path)}: not an image file ({expected})")
            if path.stem in stems:
                raise PrepareError(f"{describe(path)}: same stem as {stems[path.stem].name}")
            stems[path.stem] = path
        images[class_name] = paths
    return images


def read_manifest(path):
    """Returns {(class, stem): rgb_pixels_sha256} of a MANIFEST.tsv."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError as e:
        raise PrepareError(f"{path}: cannot read manifest ({e.strerror})") from None
    for column in ("path", "class", "rgb_pixels_sha256"):
        if not rows or column not in rows[0]:
            raise PrepareError(f"{path}: manifest has no column {column!r}")
    return {
        (row["class"], PurePosixPath(row["path"]).stem): row["rgb_pixels_sha256"] for row in rows
    }


def verify(results, manifest, manifest_path, describe):
    """Check each image's decoded-pixel sha256 against the manifest; all listed must be present."""
    errors = []
    seen = set()
    for result in results:
        src = Path(result["src"])
        key = (src.parent.name, src.stem)
        seen.add(key)
        expected = manifest.get(key)
        if expected is None:
            errors.append(f"{describe(src)}: not listed in {manifest_path}")
        elif expected != result["sha256"]:
            errors.append(f"{describe(src)}: decoded RGB pixels do not match {manifest_path}")
    missing = sorted(set(manifest) - seen)
    if missing:
        errors.append(f"{manifest_path}: lists {len(missing)} images missing from the source, "
                      f"e.g. {'/'.join(missing[0])}")
    _raise_first(errors)


def _raise_first(errors):
    if errors:
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        raise PrepareError(errors[0] + more)


def _process_all(tasks, workers):
    if workers > 1 and len(tasks) > 1:
        with multiprocessing.Pool(workers) as pool:
            results = pool.imap(process_image, tasks, chunksize=16)
            results = tqdm(results, total=len(tasks), desc="validating", unit="img", disable=None)
            return list(results)
    return [process_image(t) for t in tqdm(tasks, desc="validating", unit="img", disable=None)]


def _install(new_dir, target, trash_dir):
    """Rename ``new_dir`` to ``target``; an existing target is first moved into ``trash_dir``."""
    previous = trash_dir / "previous"
    if target.exists():
        os.rename(target, previous)
    try:
        os.rename(new_dir, target)
    except OSError:
        if previous.exists():
            os.rename(previous, target)
        raise


def prepare(source, root, force=False, manifest=None, sha256=None, workers=1):
    """
    Build ``<root>/UCMerced_LandUse`` from ``source`` (see the module docstring).

    Args:
        source (str or None): folder or zip; None downloads the official zip.
        root (str): dataset root.
        force (bool): replace an existing dataset.
        manifest (str or None): MANIFEST.tsv to verify decoded pixels against.
        sha256 (str or None): expected sha256 of a zip source.
        workers (int): processes decoding images.

    Returns:
        tuple[Path, dict]: the dataset folder and {class name: (images, converted to PNG)}.
    """
    root = Path(root)
    target = root / DATASET_DIRNAME
    if target.exists() and not force:
        raise PrepareError(f"{target}: already exists; pass --force to replace it")
    if source is not None and not Path(source).exists():
        raise PrepareError(f"{source}: no such file or folder")
    if sha256 is not None and source is not None and Path(source).is_dir():
        raise PrepareError(f"{source}: --sha256 applies to a zip source, not a folder")
    manifest_entries = read_manifest(manifest) if manifest else None

    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DATASET_DIRNAME}.tmp-", dir=root))
    succeeded = False
    try:
        if source is None:
            source = staging / "download.zip"
            download(OFFICIAL_URL, source)
            sha256 = sha256 or OFFICIAL_ZIP_SHA256
        source = Path(source)
        if source.is_file():
            digest = file_sha256(source)
            print(f"{source}: sha256 {digest}")
            if sha256 is not None and digest != sha256.lower():
                raise PrepareError(f"{source}: sha256 {digest} differs from the expected {sha256}")
            base = staging / "extracted"
            extract_zip(source, base)

            def describe(path):
                return f"{source}:{Path(path).relative_to(base).as_posix()}"

        else:
            base = source

            def describe(path):
                return str(path)

        images_dir = find_images_dir(base, describe)
        images = list_images(images_dir, describe)
        out = staging / DATASET_DIRNAME
        tasks = []
        for class_name, paths in images.items():
            (out / "Images" / class_name).mkdir(parents=True)
            tasks += [(str(p), str(out / "Images" / class_name)) for p in paths]
        results = _process_all(tasks, workers)
        _raise_first([f"{describe(r['src'])}: {r['error']}" for r in results if r["error"]])
        if manifest_entries is not None:
            verify(results, manifest_entries, manifest, describe)
        readme = images_dir.parent / "readme.txt"
        if readme.is_file():
            shutil.copyfile(readme, out / "readme.txt")
        _install(out, target, staging)
        succeeded = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_root and not succeeded:
            root.rmdir()  # empty again once the staging folder is gone

    counts = {name: [0, 0] for name in CLASS_NAMES}
    for result in results:
        counts[Path(result["src"]).parent.name][0] += 1
        counts[Path(result["src"]).parent.name][1] += result["converted"]
    return target, {name: tuple(c) for name, c in counts.items()}


def format_counts(counts):
    width = max(len(name) for name in counts)
    lines = [f"{'class':<{width}}  images  converted"]
    lines += [f"{name:<{width}}  {n:>6}  {c:>9}" for name, (n, c) in counts.items()]
    total = [sum(c[i] for c in counts.values()) for i in range(2)]
    lines.append(f"{'total':<{width}}  {total[0]:>6}  {total[1]:>9}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Prepare UC Merced Land Use in <root>/UCMerced_LandUse (see module docstring)."
    )
    parser.add_argument(
        "--source",
        help=f"folder with Images/<class>/<image>, or the official zip (default: {OFFICIAL_URL})",
    )
    parser.add_argument(
        "--root",
        default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")),
        help="dataset root (default: $DETECTRON2_DATASETS, else ./datasets)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing dataset")
    parser.add_argument(
        "--verify",
        metavar="MANIFEST.tsv",
        help="check decoded RGB pixels against its rgb_pixels_sha256 (lossless sources only)",
    )
    parser.add_argument("--sha256", help="expected sha256 of the zip (overrides the pinned value)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="decoding processes (default: the CPU count, at most 8)",
    )
    args = parser.parse_args(argv)
    try:
        target, counts = prepare(
            args.source,
            args.root,
            force=args.force,
            manifest=args.verify,
            sha256=args.sha256,
            workers=args.workers,
        )
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. an unwritable root or a full disk: still one line
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(format_counts(counts))
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
