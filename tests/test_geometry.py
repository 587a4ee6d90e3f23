import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from regioncl.geometry import (
    View,
    clip_boxes,
    map_boxes,
    map_points,
    random_resized_crop,
    render_view,
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
