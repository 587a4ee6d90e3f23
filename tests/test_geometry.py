import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from regioncl.geometry import (
    View,
    boxes_inside,
    boxes_overlap,
    cell_index,
    clip_boxes,
    crop_intersection,
    grid_cells,
    jitter_boxes,
    map_boxes,
    map_points,
    points_inside,
    random_resized_crop,
    render_view,
    sample_fixed_k,
    sliding_windows,
)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    width=st.integers(8, 600),
    height=st.integers(8, 600),
    out_size=st.integers(8, 256),
    box=st.tuples(*[st.floats(0, 1)] * 4),
)
def test_box_mapped_into_a_random_resized_crop_and_back_is_unchanged(seed, width, height, out_size, box):
    rng = np.random.default_rng(seed)
    view = random_resized_crop(width, height, out_size, rng, scale=(0.2, 1.0))
    source = View.identity(width, height)
    fx1, fx2 = sorted((box[0] * width, box[2] * width))
    fy1, fy2 = sorted((box[1] * height, box[3] * height))
    boxes = np.array([[fx1, fy1, fx2, fy2]])
    there = map_boxes(boxes, source, view)
    assert (there[:, 0] <= there[:, 2]).all() and (there[:, 1] <= there[:, 3]).all()
    np.testing.assert_allclose(map_boxes(there, view, source), boxes, atol=1e-6 * max(width, height))


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), width=st.integers(2, 600), height=st.integers(2, 600))
def test_random_resized_crop_stays_inside_the_image(seed, width, height):
    view = random_resized_crop(width, height, (32, 24), np.random.default_rng(seed))
    x1, y1, x2, y2 = view.crop
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert (view.out_w, view.out_h) == (32, 24)


def test_flip_mirrors_x_and_keeps_corners_ordered():
    view = View(crop=(10.0, 20.0, 50.0, 60.0), out_w=80, out_h=40, flip=True)  # x scale 2, y scale 1
    mapped = map_boxes(np.array([[10.0, 20.0, 20.0, 30.0]]), View.identity(100, 100), view)
    # unflipped x: [0, 20] -> flipped: [80 - 20, 80 - 0]; y: [0, 10]
    np.testing.assert_allclose(mapped, [[60.0, 0.0, 80.0, 10.0]])
    np.testing.assert_allclose(map_points(np.array([[0.0, 0.0]]), view, View.identity(100, 100)), [[50.0, 20.0]])


def test_box_outside_the_view_is_flagged_invalid_and_partial_box_is_clipped():
    view = View(crop=(0.0, 0.0, 50.0, 50.0), out_w=50, out_h=50)
    boxes = map_boxes(np.array([[60.0, 60.0, 90.0, 90.0], [40.0, 10.0, 70.0, 20.0]]), View.identity(100, 100), view)
    clipped, valid = clip_boxes(boxes, view)
    assert valid.tolist() == [False, True]
    np.testing.assert_allclose(clipped[1], [40.0, 10.0, 50.0, 20.0])


def test_rendered_view_shows_the_source_box_where_map_boxes_puts_it():
    pixels = np.zeros((60, 80, 3), dtype=np.uint8)
    pixels[20:40, 30:50] = 255  # a white box x1=30, y1=20, x2=50, y2=40
    view = View(crop=(20.0, 10.0, 60.0, 50.0), out_w=80, out_h=80, flip=True)
    rendered = np.asarray(render_view(Image.fromarray(pixels), view))[..., 0]
    expected = map_boxes(np.array([[30.0, 20.0, 50.0, 40.0]]), View.identity(80, 60), view)[0]
    rows, cols = np.nonzero(rendered > 127)
    np.testing.assert_allclose([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], expected, atol=1.0)


# --- views derived from a crop: intersections, windows, grids, points -----------------------

def _views(seed: int, width: int, height: int, out_a: int, out_b: int, out_small: int) -> tuple[View, View, View]:
    """Two random resized crops (random flips) and the first one at another output size (SoCo's V3)."""
    rng = np.random.default_rng(seed)
    a = random_resized_crop(width, height, out_a, rng, scale=(0.2, 1.0))
    b = random_resized_crop(width, height, (out_b, out_b + 7), rng, scale=(0.2, 1.0))
    return a, b, a.resized(out_small)


VIEW_CASES = dict(
    seed=st.integers(0, 2**32 - 1),
    width=st.integers(16, 800),
    height=st.integers(16, 800),
    out_a=st.integers(16, 256),
    out_b=st.integers(16, 256),
    out_small=st.integers(8, 128),
)


def _assert_same_source(actual: np.ndarray, expected: np.ndarray, width: int, height: int) -> None:
    """Source px coordinates agree to 1e-6 relative to the image size."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6 * max(width, height))


@settings(max_examples=200, deadline=None)
@given(**VIEW_CASES, box=st.tuples(*[st.floats(0, 1)] * 4))
def test_a_source_box_mapped_into_every_view_maps_back_to_the_same_source_box(seed, width, height, out_a, out_b, out_small, box):
    source = View.identity(width, height)
    fx1, fx2 = sorted((box[0] * width, box[2] * width))
    fy1, fy2 = sorted((box[1] * height, box[3] * height))
    boxes = np.array([[fx1, fy1, fx2, fy2]])
    views = _views(seed, width, height, out_a, out_b, out_small)
    for view in views:
        _assert_same_source(map_boxes(map_boxes(boxes, source, view), view, source), boxes, width, height)
    # view -> view directly equals view -> source -> view
    a, b, small = views
    for first, second in ((a, b), (b, small), (small, a)):
        direct = map_boxes(map_boxes(boxes, source, first), first, second)
        _assert_same_source(map_boxes(direct, second, source), boxes, width, height)


@settings(max_examples=200, deadline=None)
@given(**VIEW_CASES)
def test_crop_intersection_lies_in_both_crops_and_is_none_only_when_they_do_not_overlap(
    seed, width, height, out_a, out_b, out_small
):
    a, b, _ = _views(seed, width, height, out_a, out_b, out_small)
    overlap = crop_intersection(a, b)
    assert overlap == crop_intersection(b, a)
    disjoint = a.crop[2] <= b.crop[0] or b.crop[2] <= a.crop[0] or a.crop[3] <= b.crop[1] or b.crop[3] <= a.crop[1]
    assert (overlap is None) == disjoint
    if overlap is not None:
        source = View.identity(width, height)
        for view in (a, b):
            assert boxes_inside(map_boxes(np.array([overlap]), source, view), view).all()


def test_crop_intersection_by_hand():
    a = View(crop=(0.0, 0.0, 50.0, 40.0), out_w=10, out_h=10)
    b = View(crop=(30.0, 10.0, 90.0, 80.0), out_w=20, out_h=20, flip=True)
    assert crop_intersection(a, b) == (30.0, 10.0, 50.0, 40.0)
    touching = View(crop=(50.0, 0.0, 60.0, 40.0), out_w=10, out_h=10)
    assert crop_intersection(a, touching) is None


@settings(max_examples=150, deadline=None)
@given(**VIEW_CASES, window=st.integers(4, 64), stride=st.integers(2, 48))
def test_windows_slid_over_the_overlap_in_one_view_map_to_the_same_source_windows_from_the_other(
    seed, width, height, out_a, out_b, out_small, window, stride
):
    a, b, small = _views(seed, width, height, out_a, out_b, out_small)
    overlap = crop_intersection(a, b)
    assume(overlap is not None)
    source = View.identity(width, height)
    region = map_boxes(np.array([overlap]), source, a)[0]  # the overlap in view a px
    windows = sliding_windows(region, window, stride)  # view a px
    assume(len(windows) > 0)
    assert (windows[:, 0] >= region[0] - 1e-9).all() and (windows[:, 2] <= region[2] + 1e-6).all()
    in_b = map_boxes(windows, a, b)
    assert boxes_inside(in_b, b, tolerance=1e-6 * max(b.out_w, b.out_h)).all()  # the overlap lies in both views
    in_small = map_boxes(windows, a, small)
    from_a = map_boxes(windows, a, source)
    _assert_same_source(map_boxes(in_b, b, source), from_a, width, height)
    _assert_same_source(map_boxes(in_small, small, source), from_a, width, height)


def test_sliding_windows_by_hand():
    # ReSim's C4 grid: 48-px windows every 32 px over a 224-px view: 6 x 6, starting at 0..160.
    windows = sliding_windows((0, 0, 224, 224), 48, 32)
    assert windows.shape == (36, 4)
    np.testing.assert_allclose(windows[:6, 0], [0, 32, 64, 96, 128, 160])
    np.testing.assert_allclose(windows[6], [0, 32, 48, 80])  # row-major: the second row starts at y = 32
    # non-square size/stride, offset region, a window ending exactly on the edge
    windows = sliding_windows((10.0, 5.0, 30.0, 12.0), (10, 7), (5, 3))
    np.testing.assert_allclose(windows, [[10, 5, 20, 12], [15, 5, 25, 12], [20, 5, 30, 12]])
    assert sliding_windows((0, 0, 20, 20), 32, 8).shape == (0, 4)


@settings(max_examples=150, deadline=None)
@given(**VIEW_CASES, rows=st.integers(1, 8), cols=st.integers(1, 8))
def test_grid_cell_i_in_either_view_is_the_same_source_cell_flips_included(
    seed, width, height, out_a, out_b, out_small, rows, cols
):
    a, b, small = _views(seed, width, height, out_a, out_b, out_small)
    overlap = crop_intersection(a, b)
    assume(overlap is not None)
    source = View.identity(width, height)
    cells = grid_cells(overlap, rows, cols)  # (rows * cols, 4) source px
    centers = (cells[:, :2] + cells[:, 2:]) / 2
    np.testing.assert_array_equal(cell_index(centers, overlap, rows, cols), np.arange(rows * cols))
    for view in (a, b, small):
        in_view = map_boxes(cells, source, view)
        _assert_same_source(map_boxes(in_view, view, source), cells, width, height)
        # the grid can also be built in the view: the same cells, up to the flip's column order
        view_grid = grid_cells(map_boxes(np.array([overlap]), source, view)[0], rows, cols)
        order = np.arange(rows * cols).reshape(rows, cols)
        if view.flip:
            order = order[:, ::-1]
        _assert_same_source(map_boxes(view_grid, view, source), cells[order.reshape(-1)], width, height)


@settings(max_examples=150, deadline=None)
@given(**VIEW_CASES, points=st.lists(st.tuples(st.floats(-0.2, 1.2), st.floats(-0.2, 1.2)), min_size=1, max_size=20))
def test_points_map_back_to_the_same_source_point_and_are_inside_a_view_iff_inside_its_crop(
    seed, width, height, out_a, out_b, out_small, points
):
    source = View.identity(width, height)
    points = np.array(points) * [width, height]  # (N, 2) source px, some outside the image
    for view in _views(seed, width, height, out_a, out_b, out_small):
        in_view = map_points(points, source, view)
        _assert_same_source(map_points(in_view, view, source), points, width, height)
        x1, y1, x2, y2 = view.crop
        margin = 1e-6 * max(width, height)
        x, y = points[:, 0], points[:, 1]
        clearly_in = (x > x1 + margin) & (x < x2 - margin) & (y > y1 + margin) & (y < y2 - margin)
        clearly_out = (x < x1 - margin) | (x > x2 + margin) | (y < y1 - margin) | (y > y2 + margin)
        inside = points_inside(in_view, view, tolerance=0.0)
        assert inside[clearly_in].all() and not inside[clearly_out].any()


def test_containment_and_overlap_of_boxes_against_a_view():
    view = View(crop=(0.0, 0.0, 100.0, 100.0), out_w=50, out_h=40)
    boxes = np.array(
        [
            [0, 0, 50, 40],  # the whole view: inside (edges touch)
            [10, 10, 20, 20],  # inside
            [40, 30, 60, 50],  # overlaps the corner
            [50, 0, 70, 10],  # touches the right edge only: no area in common
            [-5, 10, 3, 20],  # overlaps the left edge
            [60, 50, 70, 60],  # outside
        ]
    )
    assert boxes_inside(boxes, view).tolist() == [True, True, False, False, False, False]
    assert boxes_overlap(boxes, view).tolist() == [True, True, True, False, True, False]
    points = np.array([[0, 0], [50, 40], [25, 20], [50.1, 20], [10, -0.1]])
    assert points_inside(points, view).tolist() == [True, True, True, False, False]


# --- box jitter and fixed-K sampling --------------------------------------------------------

class _FixedDraws:
    """Stands in for a Generator: returns the given 'apply' uniforms and jitter ratios."""

    def __init__(self, apply_uniforms, ratios):
        self.apply_uniforms, self.ratios = np.asarray(apply_uniforms, float), np.asarray(ratios, float)

    def random(self, size):
        assert size == self.apply_uniforms.shape[0]
        return self.apply_uniforms

    def uniform(self, low, high, size):
        assert size == self.ratios.shape
        return self.ratios


def test_jitter_moves_centre_and_size_by_one_ratio_as_in_the_paper():
    image = View.identity(100, 100)
    boxes = np.array([[10.0, 20.0, 30.0, 60.0], [10.0, 20.0, 30.0, 60.0]])  # centre (20, 40), w 20, h 40
    # box 0 jittered with r = 0.1: centre (22, 44), size (22, 44); box 1 not drawn for jitter (0.7 >= 0.5)
    draws = _FixedDraws([0.2, 0.7], [[0.1], [0.1]])
    jittered = jitter_boxes(boxes, image, draws, ratio=0.1, probability=0.5)
    np.testing.assert_allclose(jittered, [[11.0, 22.0, 33.0, 66.0], [10.0, 20.0, 30.0, 60.0]])


def test_jitter_of_the_released_code_moves_the_corner_with_four_ratios_and_clips_to_the_image():
    image = View.identity(40, 100)
    boxes = np.array([[10.0, 20.0, 30.0, 60.0]])  # w 20, h 40
    draws = _FixedDraws([0.0], [[0.1, -0.1, 0.5, 0.0]])
    jittered = jitter_boxes(boxes, image, draws, independent=True, anchor="corner", ratio=0.5)
    # x1 = 10 + 2 = 12, y1 = 20 - 4 = 16, w = 30 -> x2 = 42 clipped to 40, h = 40 -> y2 = 56
    np.testing.assert_allclose(jittered, [[12.0, 16.0, 40.0, 56.0]])


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), independent=st.booleans(), anchor=st.sampled_from(["center", "corner"]))
def test_jittered_boxes_stay_in_the_image_and_within_the_ratio(seed, independent, anchor):
    rng = np.random.default_rng(seed)
    image = View.identity(300, 200)
    x1, y1 = rng.uniform(0, 150, 30), rng.uniform(0, 100, 30)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, 150, 30), y1 + rng.uniform(1, 100, 30)], axis=1)
    jittered = jitter_boxes(boxes, image, rng, ratio=0.1, probability=0.5, independent=independent, anchor=anchor)
    assert boxes_inside(jittered, image, tolerance=0.0).all()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    # every corner moves by at most (offset + half/whole size change) = 0.2 of the size
    assert (np.abs(jittered - boxes) <= 0.2 * np.stack([w, h, w, h], axis=1) + 1e-9).all()
    assert (jittered[:, 2] > jittered[:, 0]).all() and (jittered[:, 3] > jittered[:, 1]).all()


def test_jitter_draws_the_same_numbers_whatever_the_boxes():
    image = View.identity(100, 100)
    first, second = np.random.default_rng(3), np.random.default_rng(3)
    jitter_boxes(np.array([[0.0, 0.0, 10.0, 10.0]] * 4), image, first)
    jitter_boxes(np.array([[50.0, 50.0, 90.0, 60.0]] * 4), image, second)
    assert first.random() == second.random()


@pytest.mark.parametrize("count", [1, 3, 4, 9])
def test_fixed_k_sampling_gives_k_indices_distinct_when_enough_and_covering_all_when_not(count):
    indices = sample_fixed_k(count, 4, np.random.default_rng(count))
    assert indices.shape == (4,) and indices.dtype == np.int64
    assert ((indices >= 0) & (indices < count)).all()
    if count >= 4:
        assert len(set(indices.tolist())) == 4
    else:
        assert set(indices[:count].tolist()) == set(range(count))  # every item once, then duplicates
    np.testing.assert_array_equal(indices, sample_fixed_k(count, 4, np.random.default_rng(count)))


def test_fixed_k_sampling_of_nothing_fails_clearly():
    with pytest.raises(ValueError, match="at least one item"):
        sample_fixed_k(0, 4, np.random.default_rng(0))


# --- rendering: the painted source box is where the mapping says, in every view --------------

@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    out_size=st.integers(24, 96),
    small=st.integers(24, 48),
    box=st.tuples(st.floats(0.2, 0.8), st.floats(0.2, 0.8), st.floats(0, 1), st.floats(0, 1)),
)
def test_a_painted_source_box_renders_where_map_boxes_puts_it_in_crops_flips_and_downsampled_views(seed, out_size, small, box):
    width, height = 160, 120
    view = random_resized_crop(width, height, out_size, np.random.default_rng(seed), scale=(0.2, 1.0))
    x1, y1, x2, y2 = view.crop
    box_w, box_h = box[0] * (x2 - x1), box[1] * (y2 - y1)
    left, top = x1 + box[2] * (x2 - x1 - box_w), y1 + box[3] * (y2 - y1 - box_h)
    painted = np.array([[round(left), round(top), round(left + box_w), round(top + box_h)]], dtype=np.float64)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    px1, py1, px2, py2 = painted[0].astype(int)
    pixels[py1:py2, px1:px2] = 255
    image = Image.fromarray(pixels)
    for rendered_view in (view, view.resized(small)):
        expected, valid = clip_boxes(map_boxes(painted, View.identity(width, height), rendered_view), rendered_view)
        assume(valid[0] and (expected[0, 2:] - expected[0, :2] >= 4).all())
        rendered = np.asarray(render_view(image, rendered_view))[..., 0]
        rows, cols = np.nonzero(rendered > 127)
        np.testing.assert_allclose([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], expected[0], atol=1.0)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    width=st.integers(8, 600),
    height=st.integers(8, 600),
    outer=st.integers(16, 256),
    inner=st.integers(8, 256),
    outer_flip=st.booleans(),
    point=st.tuples(st.floats(0, 1), st.floats(0, 1)),
)
def test_a_subview_maps_points_as_its_crop_of_the_outer_view_image_does(seed, width, height, outer, inner, outer_flip, point):
    source = View.identity(width, height)
    outer_view = View(crop=random_resized_crop(width, height, outer, np.random.default_rng(seed)).crop, out_w=outer, out_h=outer, flip=outer_flip)
    crop = random_resized_crop(outer, outer, inner, np.random.default_rng(seed + 1), scale=(0.5, 1.0))  # in outer px
    composed = outer_view.subview(crop)
    inner_px = np.array([[point[0] * inner, point[1] * inner]])
    in_outer = map_points(inner_px, crop, View.identity(outer, outer))  # where the point is in the outer view's image
    _assert_same_source(map_points(inner_px, composed, source), map_points(in_outer, outer_view, source), width, height)
    assert composed.flip == (outer_flip != crop.flip) and (composed.out_w, composed.out_h) == (inner, inner)


def test_subview_by_hand():
    v1 = View(crop=(0.0, 0.0, 400.0, 200.0), out_w=100, out_h=100, flip=True)  # 4 and 2 source px per view px, mirrored
    v2 = v1.subview(View(crop=(10.0, 20.0, 60.0, 70.0), out_w=50, out_h=50))
    # view x 10..60 of a mirrored image is source x (100 - 60) * 4 .. (100 - 10) * 4
    assert v2 == View(crop=(160.0, 40.0, 360.0, 140.0), out_w=50, out_h=50, flip=True)
