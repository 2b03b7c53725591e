import numpy as np
import pytest
import torch

from mmgen.data.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    ShapeObject,
    ShapesDataset,
    caption,
    classify_color,
    region_mean_color,
    render,
    sample_objects,
)

PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
           "bottom": "at the bottom", "center": "in the center"}


def _mask(image: np.ndarray) -> np.ndarray:
    return image.max(axis=-1) > 127


def test_item_deterministic_across_instances_and_order():
    a, b = ShapesDataset(size=20, seed=3), ShapesDataset(size=20, seed=3)
    first = {i: a[i] for i in range(20)}
    for i in reversed(range(20)):
        img, cap = b[i]
        assert cap == first[i][1]
        assert torch.equal(img, first[i][0])
    assert torch.equal(a[5][0], a[-15][0])
    other = ShapesDataset(size=20, seed=4)
    assert any(other[i][1] != first[i][1] for i in range(20))


def test_tensor_shape_dtype_range():
    img, cap = ShapesDataset(size=4, resolution=32)[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= -1.0 and img.max() <= 1.0
    assert img.min() == -1.0  # black background
    assert img.max() > 0.0  # at least one bright object
    assert isinstance(cap, str) and cap.startswith(("a ", "an "))


@pytest.mark.parametrize("res", [8, 64])
def test_resolutions(res):
    ds = ShapesDataset(size=8, resolution=res, max_objects=5)
    for i in range(len(ds)):
        img, _ = ds[i]
        assert img.shape == (3, res, res)
        assert img.max() > 0.0


def test_caption_mentions_everything_and_positions_distinct():
    ds = ShapesDataset(size=50, max_objects=5)
    counts = set()
    for i in range(len(ds)):
        objs = ds.objects(i)
        counts.add(len(objs))
        assert len({o.position for o in objs}) == len(objs)
        cap = ds[i][1]
        assert cap == caption(objs)
        for o in objs:
            assert f"{o.color} {o.shape} {PHRASES[o.position]}" in cap
    assert counts == {1, 2, 3, 4, 5}


def test_caption_format():
    r, b, o = (ShapeObject("red", "circle", "left"), ShapeObject("blue", "square", "top"),
               ShapeObject("orange", "triangle", "center"))
    assert caption([r]) == "a red circle on the left"
    assert caption([r, b]) == "a red circle on the left and a blue square at the top"
    assert caption([r, b, o]) == ("a red circle on the left, a blue square at the top "
                                  "and an orange triangle in the center")


def test_sample_objects_valid():
    rng = np.random.default_rng(0)
    for _ in range(100):
        objs = sample_objects(rng, max_objects=3)
        assert 1 <= len(objs) <= 3
        assert len({o.position for o in objs}) == len(objs)
        assert all(o.color in COLORS and o.shape in SHAPES for o in objs)


@pytest.mark.parametrize("res", [8, 32])
def test_color_recovered_per_region(res):
    rng = np.random.default_rng(1)
    for k, color in enumerate(COLORS):
        pos = POSITIONS[k % len(POSITIONS)]
        other = POSITIONS[(k + 1) % len(POSITIONS)]
        shape = SHAPES[k % len(SHAPES)]
        img = render([ShapeObject(color, shape, pos)], res, rng)
        mean = region_mean_color(img, pos)
        assert classify_color(mean[None]) == color
        assert classify_color(img.reshape(-1, 3)) == color
        assert np.all(region_mean_color(img, other) == 0)  # stays inside its cell


def test_classify_color_exact():
    for name, rgb in COLORS.items():
        assert classify_color(np.array([rgb] * 4, dtype=np.uint8)) == name
        assert classify_color(np.array([rgb, (0, 0, 0)], dtype=np.float32)) == name
        dim = (np.array([rgb, rgb]) * [[1.0], [0.45]]).astype(np.uint8)  # anti-aliased edge
        assert classify_color(dim) == name
        assert classify_color(np.array(rgb) * 0.3) == name  # nothing bright: uses all pixels


def test_geometry_circle_square_triangle():
    res = 64
    area = {s: _mask(render([ShapeObject("red", s, "center")], res)).sum() for s in SHAPES}
    assert area["triangle"] < area["circle"] < area["square"]
    assert abs(area["circle"] / area["square"] - np.pi / 4) < 0.05
    tri = _mask(render([ShapeObject("green", "triangle", "center")], res))
    rows = np.nonzero(tri.any(axis=1))[0]
    mid = (rows[0] + rows[-1] + 1) / 2
    ys = np.nonzero(tri)[0]
    assert (ys >= mid).sum() > 2 * (ys < mid).sum()  # wide base at the bottom


def test_deterministic_render_is_centered_and_symmetric():
    img = render([ShapeObject("blue", "circle", "center")], 33)
    assert np.array_equal(img, img[::-1]) and np.array_equal(img, img[:, ::-1])
    left = render([ShapeObject("blue", "square", "left")], 30)
    ys, xs = np.nonzero(_mask(left))
    assert xs.max() < 10 and 10 <= ys.min() and ys.max() < 20


@pytest.mark.parametrize(
    "kwargs, match",
    [({"resolution": 4}, "resolution"), ({"max_objects": 0}, "max_objects"),
     ({"max_objects": 6}, "max_objects"), ({"size": 0}, "size"), ({"seed": -1}, "seed")],
)
def test_bad_dataset_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesDataset(**kwargs)


def test_bad_index_and_objects():
    ds = ShapesDataset(size=3)
    with pytest.raises(IndexError, match="out of range"):
        ds[3]
    with pytest.raises(IndexError, match="out of range"):
        ds.objects(-4)
    with pytest.raises(ValueError, match="color"):
        ShapeObject("pink", "circle", "left")
    with pytest.raises(ValueError, match="shape"):
        ShapeObject("red", "hexagon", "left")
    with pytest.raises(ValueError, match="distinct"):
        render([ShapeObject("red", "circle", "left"), ShapeObject("blue", "square", "left")], 16)
    with pytest.raises(ValueError, match="resolution"):
        render([ShapeObject("red", "circle", "left")], 7)
    with pytest.raises(ValueError, match="position"):
        region_mean_color(np.zeros((8, 8, 3)), "middle")
