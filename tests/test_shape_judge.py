"""ShapeJudge reads the objects of real shapes renders back: every scene of edit sources and targets at
16×16 and 32×32, nothing in a black image, each object of a two-object image named by its own cell, the
same answer from a PIL image, a uint8 array and a float tensor, and clear errors for other images."""

import itertools
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mmgen.data.edits import Scene, sample_edit
from mmgen.data.shapes import BRIGHT_THRESHOLD, POSITIONS, SHAPES, ShapeObject, ShapesDataset
from mmgen.shape_judge import ShapeJudge, cell_slices, min_bright, to_pixels

_JUDGES: dict[int, ShapeJudge] = {}


def judge(resolution: int) -> ShapeJudge:
    """One fitted judge per resolution for the whole module (each fit takes about a second)."""
    if resolution not in _JUDGES:
        _JUDGES[resolution] = ShapeJudge(resolution)
    return _JUDGES[resolution]


def as_set(objects) -> set[tuple[str, str, str]]:
    return {(o.color, o.shape, o.position) for o in objects}


@pytest.mark.parametrize("resolution", [16, 32])
def test_reads_the_objects_of_edit_scenes(resolution):
    j = judge(resolution)
    scenes = []
    for k in range(100):  # 400 scenes: the source and the target of 100 edits of each split
        for split in ("train", "held_out"):
            edit = sample_edit(random.Random(k), split)
            scenes += [edit.before, edit.after]
    right = [as_set(j.objects(s.render(resolution))) == as_set(s.objects) for s in scenes]
    assert len(right) == 400 and np.mean(right) >= 0.98, f"{sum(right)} of {len(right)} scenes read exactly"


def test_holdout_accuracy_is_high():
    assert judge(16).holdout_accuracy >= 0.98


@pytest.mark.parametrize("resolution", [16, 32])
def test_black_image_has_no_objects(resolution):
    j = judge(resolution)
    black = np.zeros((resolution, resolution, 3), dtype=np.uint8)
    assert j.objects(black) == []
    assert j.objects(Image.fromarray(black)) == []
    assert j.objects(-torch.ones(3, resolution, resolution)) == []


def test_each_object_is_judged_in_its_own_cell():
    """Two objects of different shapes (and colors) in every pair of cells: both named right. An SVM run on
    the whole image, or a cell cut from the wrong rows or columns, names at least one of them wrong."""
    j = judge(16)
    wrong = []
    for (p1, p2), (s1, s2) in itertools.product(itertools.permutations(POSITIONS, 2),
                                                itertools.permutations(SHAPES, 2)):
        scene = Scene((ShapeObject("red", s1, p1), ShapeObject("blue", s2, p2)), (1, 2))
        got = j.objects(scene.render(16))
        if as_set(got) != as_set(scene.objects):
            wrong.append((scene.objects, got))
    assert not wrong, wrong[:3]


def test_every_input_form_gives_the_same_objects():
    j = judge(16)
    scene = sample_edit(random.Random(3), kinds=["remove"]).before  # two objects
    pixels = scene.render(16)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    want = as_set(scene.objects)
    assert as_set(j.objects(pixels)) == as_set(j.objects(Image.fromarray(pixels))) == as_set(j.objects(tensor)) == want
    assert [o.position for o in j.objects(pixels)] == [p for p in POSITIONS if p in {o.position for o in scene.objects}]


def test_pil_images_follow_the_one_conversion_rule():
    """Transparency is composited over white, as for every image mmgen reads, not dropped."""
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:8] = (200, 30, 30, 255)  # an opaque red top half over a fully transparent (black) bottom half
    pixels = to_pixels(Image.fromarray(rgba, "RGBA"))
    assert pixels.dtype == np.uint8 and pixels.shape == (16, 16, 3)
    assert (pixels[:8] == (200, 30, 30)).all() and (pixels[8:] == 255).all()
    assert (to_pixels(Image.fromarray(rgba[..., :3])) == rgba[..., :3]).all()  # opaque RGB passes through


def test_shape_of_whole_single_object_images():
    j = judge(16)
    ds = ShapesDataset(size=30, resolution=16, max_objects=1, seed=7)
    want = [ds.objects(i)[0].shape for i in range(30)]
    batch = torch.stack([ds[i][0] for i in range(30)])  # (30, 3, 16, 16)
    assert j.shape(batch) == want
    assert j.shape([Image.fromarray(j.pixels(ds[i][0])) for i in range(30)]) == want


def test_a_few_stray_bright_pixels_are_no_object():
    j = judge(16)
    assert min_bright(16) == 3 and min_bright(32) == 10 and min_bright(8) == 1
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    rows, cols = cell_slices(16, "center")
    stray = [(rows.start + k, cols.start + k) for k in range(min_bright(16))]
    for y, x in stray[:-1]:
        image[y, x] = (BRIGHT_THRESHOLD + 100, 0, 0)
    assert j.objects(image) == []  # one pixel short
    image[stray[-1]] = (BRIGHT_THRESHOLD + 100, 0, 0)
    assert [(o.color, o.position) for o in j.objects(image)] == [("red", "center")]


def test_other_images_are_errors():
    j = judge(16)
    with pytest.raises(ValueError, match="16×16"):
        j.objects(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        j.objects(np.zeros((16, 16, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="float"):
        j.objects(torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="unsupported"):
        j.objects([[0]])
    with pytest.raises(ValueError, match=">= 8"):
        ShapeJudge(4)
