"""
Tests of datasets/prepare_ucmerced.py on small synthetic trees and zips built in tmp_path.

The --verify test needs real MANIFEST.tsv lines and lossless images: it looks for them in
$FAL_D2_SHARED/datasets/UCMerced_LandUse, by default ../shared relative to the repository root,
the location CI provides, and is skipped when they are absent.
"""
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "datasets" / "prepare_ucmerced.py"
MINI = REPO / "tests" / "data" / "ucmerced_mini"
SHARED_UCMERCED = (
    Path(os.getenv("FAL_D2_SHARED", REPO.parent / "shared")) / "datasets" / "UCMerced_LandUse"
)


def _load_script():
    """Registered in sys.modules by load_script: worker processes unpickle its functions by name."""
    return load_script(os.path.join("datasets", "prepare_ucmerced.py"))


prep = _load_script()


def random_rgb(seed, size=8):
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)


def make_source(base, per_class=1):
    """A tree in the original layout: ``base/Images/<class>/<class>NN.png``, random RGB images."""
    for i, class_name in enumerate(prep.CLASS_NAMES):
        class_dir = base / "Images" / class_name
        class_dir.mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(random_rgb(100 * i + j)).save(class_dir / f"{class_name}{j:02d}.png")
    return base


def make_zip(zip_path, source, prefix="UCMerced_LandUse/", extra_members=()):
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(source).as_posix())
        for name, data in extra_members:
            archive.writestr(name, data)
    return zip_path


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else None


@pytest.fixture
def root(tmp_path):
    """A dataset root that already holds an unrelated file, which must survive every failure."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "other_dataset.txt").write_text("keep me\n")
    return root


def _truncated_image(src):
    path = src / "Images" / "beach" / "beach00.png"
    data = io.BytesIO()
    Image.fromarray(random_rgb(0, size=64)).save(data, format="PNG")
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    return path


def _zero_byte_tif(src):
    path = src / "Images" / "forest" / "forest07.tif"
    path.write_bytes(b"")
    return path


def _text_named_tif(src):
    path = src / "Images" / "river" / "river01.tif"
    path.write_text("this is not a TIFF\n")
    return path


def _empty_class(src):
    path = src / "Images" / "harbor"
    for f in path.iterdir():
        f.unlink()
    return path


def _missing_class(src):
    path = src / "Images" / "runway"
    shutil.rmtree(path)
    return path


def _missing_images_dir(src):
    shutil.rmtree(src / "Images")
    (src / "something_else").mkdir()
    return src


def _sixteen_bit_out_of_range(src):
    path = src / "Images" / "airplane" / "airplane00.tif"
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(path)
    return path


@pytest.mark.parametrize(
    "damage",
    [
        _truncated_image,
        _zero_byte_tif,
        _text_named_tif,
        _empty_class,
        _missing_class,
        _missing_images_dir,
        _sixteen_bit_out_of_range,
    ],
)
def test_bad_folder_source_fails_with_one_line(tmp_path, root, damage):
    src = make_source(tmp_path / "src")
    bad_path = damage(src)
    before = snapshot(root)
    result = run_cli("--source", src, "--root", root)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(bad_path) in lines[0]
    assert snapshot(root) == before


def _zip_with_wrong_content(tmp_path):
    path = tmp_path / "wrong.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("photos/cat.txt", "not the dataset")
        archive.writestr("notes/readme.txt", "nothing here")
    return path, str(path)


def _zip_with_parent_member(tmp_path):
    src = make_source(tmp_path / "src")
    path = make_zip(tmp_path / "evil.zip", src, extra_members=[("../escaped.txt", "x")])
    return path, "../escaped.txt"


def _zip_with_absolute_member(tmp_path):
    src = make_source(tmp_path / "src")
    path = make_zip(tmp_path / "abs.zip", src, extra_members=[("/tmp/absolute.txt", "x")])
    return path, "/tmp/absolute.txt"


def _not_a_zip(tmp_path):
    path = tmp_path / "UCMerced_LandUse.zip"
    path.write_bytes(b"PK\x03\x04 but then garbage" * 10)
    return path, str(path)


def _zip_with_bad_image(tmp_path):
    src = make_source(tmp_path / "src")
    _text_named_tif(src)
    path = make_zip(tmp_path / "bad_image.zip", src)
    return path, f"{path}:UCMerced_LandUse/Images/river/river01.tif"


@pytest.mark.parametrize(
    "make_bad_zip",
    [
        _zip_with_wrong_content,
        _zip_with_parent_member,
        _zip_with_absolute_member,
        _not_a_zip,
        _zip_with_bad_image,
    ],
)
def test_bad_zip_source_fails_with_one_line(tmp_path, root, make_bad_zip):
    zip_path, named = make_bad_zip(tmp_path)
    before = snapshot(root)
    result = run_cli("--source", zip_path, "--root", root)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert named in lines[0]
    assert snapshot(root) == before


def test_zip_sha256_mismatch_is_refused(tmp_path, root):
    zip_path = make_zip(tmp_path / "good.zip", make_source(tmp_path / "src"))
    result = run_cli("--source", zip_path, "--root", root, "--sha256", "0" * 64)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(zip_path) in result.stderr and "sha256" in result.stderr
    assert snapshot(root) == ["other_dataset.txt"]


def test_failure_does_not_create_missing_root(tmp_path):
    src = make_source(tmp_path / "src")
    _text_named_tif(src)
    root = tmp_path / "new_root"
    assert prep.main(["--source", str(src), "--root", str(root), "--workers", "1"]) != 0
    assert not root.exists()


def test_good_zip_round_trip(tmp_path):
    src = make_source(tmp_path / "src", per_class=2)
    (src / "readme.txt").write_text("UC Merced readme\n")
    zip_path = make_zip(tmp_path / "UCMerced_LandUse.zip", src)
    digest = hashlib.sha256(zip_path.read_bytes()).hexdigest()
    datasets = tmp_path / "datasets"
    # No --root: Detectron2's $DETECTRON2_DATASETS decides where the dataset goes.
    env = {"DETECTRON2_DATASETS": str(datasets)}
    result = run_cli("--source", zip_path, "--sha256", digest.upper(), env=env)
    assert result.returncode == 0, result.stderr
    assert f"sha256 {digest}" in result.stdout
    assert re.search(r"^airplane\s+2\s+0$", result.stdout, re.M)
    assert re.search(r"^total\s+42\s+0$", result.stdout, re.M)
    out = datasets / "UCMerced_LandUse"
    assert (out / "readme.txt").read_text() == "UC Merced readme\n"
    for class_name in prep.CLASS_NAMES:
        for j in range(2):
            name = f"Images/{class_name}/{class_name}{j:02d}.png"
            assert (out / name).read_bytes() == (src / name).read_bytes()
    assert sorted(p.name for p in datasets.iterdir()) == ["UCMerced_LandUse"]  # no leftovers


def test_existing_target_needs_force(tmp_path, root):
    target = root / "UCMerced_LandUse"
    target.mkdir()
    (target / "old.txt").write_text("old")
    src = make_source(tmp_path / "src")
    result = run_cli("--source", src, "--root", root)
    assert result.returncode != 0 and str(target) in result.stderr and "--force" in result.stderr
    assert (target / "old.txt").exists()

    assert prep.main(["--source", str(src), "--root", str(root), "--force", "--workers", "1"]) == 0
    assert not (target / "old.txt").exists()
    assert len(list((target / "Images").rglob("*.png"))) == 21
    assert sorted(p.name for p in root.iterdir()) == ["UCMerced_LandUse", "other_dataset.txt"]


def test_to_rgb8_scales_16bit_instead_of_clipping():
    values = np.array([[0, 128, 129, 1000, 257 * 77, 65535]], dtype=np.uint16)
    for image in (Image.fromarray(values), Image.fromarray(values.astype(np.int32))):
        rgb = prep.to_rgb8(image)
        assert rgb.dtype == np.uint8 and rgb.shape == (1, 6, 3)
        np.testing.assert_array_equal(rgb[..., 0], [[0, 0, 1, 4, 77, 255]])
        np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_non_rgb_images_are_converted_and_rgb_copied_verbatim(tmp_path, root):
    src = make_source(tmp_path / "src")
    rgb = random_rgb(7)
    grey = rgb[..., 0]
    sixteen = grey.astype(np.uint16) * 257
    rgba = np.dstack([rgb, np.full(grey.shape, 17, np.uint8)])
    class_dir = src / "Images" / "chaparral"
    Image.fromarray(grey).save(class_dir / "grey.tif")
    Image.fromarray(rgba).save(class_dir / "rgba.png")
    Image.fromarray(rgb).quantize(colors=16).save(class_dir / "palette.png")
    Image.fromarray(sixteen).save(class_dir / "sixteen.tif")
    Image.fromarray(sixteen.astype(np.int32)).save(class_dir / "thirtytwo.tif")
    Image.fromarray(rgb).save(class_dir / "photo.jpg", quality=90)

    target, counts = prep.prepare(str(src), str(root), workers=1)
    out = target / "Images" / "chaparral"
    assert counts["chaparral"] == (7, 5)

    def decoded(name):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            return np.asarray(image)

    for name in ("grey.png", "sixteen.png", "thirtytwo.png"):
        np.testing.assert_array_equal(decoded(name), np.dstack([grey] * 3))
    np.testing.assert_array_equal(decoded("rgba.png"), rgb)
    with Image.open(class_dir / "palette.png") as palette_image:
        expected = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_array_equal(decoded("palette.png"), expected)
    assert (out / "photo.jpg").read_bytes() == (class_dir / "photo.jpg").read_bytes()
    assert not (out / "grey.tif").exists()


def test_mini_subset_round_trip_with_worker_pool(root):
    target, counts = prep.prepare(str(MINI), str(root), workers=2)
    assert counts == {name: (5, 0) for name in prep.CLASS_NAMES}
    copied = sorted(p.relative_to(target / "Images") for p in (target / "Images").rglob("*.jpg"))
    originals = sorted(p.relative_to(MINI / "Images") for p in (MINI / "Images").rglob("*.jpg"))
    assert copied == originals and len(copied) == 105
    for rel in copied[::20]:
        assert (target / "Images" / rel).read_bytes() == (MINI / "Images" / rel).read_bytes()


@pytest.fixture
def lossless_subset(tmp_path):
    """Two real lossless images per class and their real MANIFEST.tsv lines."""
    manifest = SHARED_UCMERCED / "MANIFEST.tsv"
    if not manifest.is_file():
        pytest.skip(f"real UC Merced manifest not found at {manifest} (set FAL_D2_SHARED)")
    header, *rows = manifest.read_text().splitlines()
    per_class = {}
    for row in rows:
        per_class.setdefault(row.split("\t")[1], []).append(row)
    subset = [row for class_rows in per_class.values() for row in class_rows[:2]]
    src = tmp_path / "src"
    for row in subset:
        rel = row.split("\t")[0]
        (src / "Images" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED_UCMERCED / "Images" / rel, src / "Images" / rel)
    subset_manifest = tmp_path / "MANIFEST.tsv"
    subset_manifest.write_text("\n".join([header, *subset]) + "\n")
    return src, subset_manifest


def test_verify_accepts_real_pixels_and_rejects_changed_ones(tmp_path, root, lossless_subset):
    src, manifest = lossless_subset
    assert prep.main(["--source", str(src), "--root", str(root), "--verify", str(manifest)]) == 0

    # The same pixels in another lossless format still verify: matching ignores the extension.
    webp = next((src / "Images" / "beach").glob("*.webp"))
    with Image.open(webp) as image:
        pixels = np.asarray(image.convert("RGB")).copy()
    webp.unlink()
    Image.fromarray(pixels).save(webp.with_suffix(".png"))
    root2 = tmp_path / "root2"
    assert prep.main(["--source", str(src), "--root", str(root2), "--verify", str(manifest)]) == 0

    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(webp.with_suffix(".png"))
    result = run_cli("--source", src, "--root", tmp_path / "root3", "--verify", manifest)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(webp.with_suffix(".png")) in result.stderr and "do not match" in result.stderr
    assert not (tmp_path / "root3").exists()

    webp.with_suffix(".png").unlink()  # listed in the manifest but absent from the source
    result = run_cli("--source", src, "--root", tmp_path / "root4", "--verify", manifest)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(manifest) in result.stderr and "beach/" + webp.stem in result.stderr
