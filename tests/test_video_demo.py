"""tools/demo.py --video-input: one annotated frame per input frame, written atomically."""
import glob
import os

import cv2
import numpy as np
import pytest

from conftest import MINI_ROOT, REPO_ROOT, TINY_OVERRIDES, load_script

# Loaded first: the demo sets ffmpeg's log level, which OpenCV reads when it first opens a video.
demo = load_script(os.path.join("tools", "demo.py"))

HEIGHT, WIDTH = 80, 96  # even sides, as mp4v needs; not square, so that no axis is confused
NUM_FRAMES = 6


@pytest.fixture
def clip(tmp_path):
    """A 6-frame mp4v video of mini-set images of different classes."""
    images = sorted(glob.glob(os.path.join(MINI_ROOT, "Images", "*", "*.jpg")))[::20][:NUM_FRAMES]
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for image in images:
        writer.write(cv2.resize(cv2.imread(image), (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA))
    writer.release()
    return path


def _frames(path):
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    frames = list(demo.read_frames(capture))
    capture.release()
    return frames


def _run_demo(video, output, config="fal_p2p3.yaml"):
    opts = [str(o) for o in TINY_OVERRIDES]
    opts[opts.index("MODEL.CLS_HEAD.NUM_CLASSES") + 1] = "21"
    return demo.main(["--config-file", os.path.join(REPO_ROOT, "configs", config),
                      "--video-input", str(video), "--output", str(output),
                      "--allow-random-weights", *opts])


def _mean_difference(a, b):
    return float(np.abs(a.astype(np.int16) - b).mean())


# The default maps: branch_cam and attention on the branches' levels (p2, p3) of a FAL model,
# Grad-CAM on TEST.EXPLAIN.LEVELS (p2 to p5) of a plain FPN; one panel each after the frame.
@pytest.mark.parametrize("config,maps", [("fal_p2p3.yaml", 2 * 2), ("fpn_baseline.yaml", 4)])
def test_video_demo_writes_one_annotated_frame_per_input_frame(tmp_path, clip, config, maps):
    output = tmp_path / "out" / "explained.mp4"
    assert _run_demo(clip, output, config) == 0
    assert os.listdir(output.parent) == ["explained.mp4"]  # no temp file left beside it

    inputs, outputs = _frames(clip), _frames(output)
    assert len(inputs) == len(outputs) == NUM_FRAMES
    for frame, annotated in zip(inputs, outputs):
        # the frame, then one overlay per method and level
        assert annotated.shape == (HEIGHT, WIDTH * (1 + maps), 3)
        panels = np.split(annotated, 1 + maps, axis=1)
        # below its caption, the first panel is the frame, up to the codec's round trip
        noise = _mean_difference(panels[0][HEIGHT // 2:], frame[HEIGHT // 2:])
        caption = (slice(0, 10), slice(0, WIDTH // 2))
        assert _mean_difference(panels[0][caption], frame[caption]) > 5 * noise
        for overlay in panels[1:]:
            assert _mean_difference(overlay[HEIGHT // 2:], frame[HEIGHT // 2:]) > 5 * noise


def test_a_folder_output_gets_the_video_stem(tmp_path, clip):
    assert _run_demo(clip, tmp_path) == 0
    assert len(_frames(tmp_path / "clip_explained.mp4")) == NUM_FRAMES


@pytest.mark.parametrize("kind", ["missing", "not a video"])
def test_unreadable_video_fails_with_one_line_and_writes_nothing(tmp_path, capfd, kind):
    video = tmp_path / "clip.mp4"
    if kind == "not a video":
        video.write_text("not a video\n")
    output_dir = tmp_path / "out"
    capfd.readouterr()
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        _run_demo(video, output_dir / "explained.mp4")
    message = error.value.args[0]
    assert str(video) in message and "\n" not in message
    captured = capfd.readouterr()
    assert "moov" not in captured.out + captured.err  # nor ffmpeg's own complaint about the file
    assert not output_dir.exists()


def test_a_crash_leaves_no_partial_video(tmp_path, clip, monkeypatch):
    """The video is renamed into place at the end: a crash mid-video keeps what was there."""
    output = tmp_path / "explained.mp4"
    output.write_bytes(b"the previous video")
    annotate_frame = demo.annotate_frame
    frames_done = []

    def crash_on_the_fourth_frame(*args):
        if len(frames_done) == 3:
            raise RuntimeError("simulated crash")
        frames_done.append(True)
        return annotate_frame(*args)

    monkeypatch.setattr(demo, "annotate_frame", crash_on_the_fourth_frame)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run_demo(clip, output)
    assert len(frames_done) == 3  # frames were written to the temp file before the crash
    assert output.read_bytes() == b"the previous video"
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4", "explained.mp4"]
