"""scripts/input_variants.py: the other inputs docs/teacher-experiments.md (2026-12-06) measured."""

from __future__ import annotations

import numpy as np

from scripts.input_variants import block_reduce, dark_line_response, fold_to_binary, stratified_subset, stretch


def test_stretch_spreads_each_image_on_its_own_and_keeps_a_flat_one_flat():
    rng = np.random.default_rng(0)
    dim = rng.integers(40, 80, (2, 8, 8), dtype=np.uint8)  # two images, their own ranges
    dim[1] += 100
    out = stretch(dim)
    for img in out:
        assert img.min() == 0 and img.max() == 255
    assert np.array_equal(stretch(np.full((1, 4, 4), 7, np.uint8)), np.zeros((1, 4, 4), np.uint8))


def test_block_reduce_keeps_the_darkest_or_brightest_pixel_of_each_block():
    image = np.full((8, 8), 200, np.uint8)
    image[1, 6] = 3  # one dark pixel in the top-right 4x4 block
    assert block_reduce(image, 2, "min").tolist() == [[200, 3], [200, 200]]
    assert block_reduce(image, 2, "max").tolist() == [[200, 200], [200, 200]]


def test_the_dark_line_response_marks_a_thin_dark_line_and_not_a_flat_or_bright_one():
    image = np.full((32, 32), 180.0)
    image[:, 10] = 60.0  # a dark vertical crack one pixel wide
    image[:, 24] = 250.0  # a bright line
    response = dark_line_response(image, 1.0)
    assert response[16, 10] > 20 * max(response[16, 3], 1e-3)  # the crack against flat ground
    assert response[16, 24] < 0.1 * response[16, 10]


def test_a_train_subset_keeps_the_class_mix_is_seeded_and_keeps_every_class():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 3 + [3] * 7)
    half = stratified_subset(labels, 0.5, seed=0)
    assert np.bincount(labels[half]).tolist() == [30, 15, 2, 4]  # round(1.5) = 2, round(3.5) = 4
    assert np.array_equal(half, stratified_subset(labels, 0.5, seed=0)) and np.all(np.diff(half) > 0)
    assert not np.array_equal(half, stratified_subset(labels, 0.5, seed=1))
    assert np.bincount(labels[stratified_subset(labels, 0.01, seed=0)]).tolist() == [1, 1, 1, 1]


def test_binary_folds_the_task_defective_classes_to_one_and_the_rest_to_zero():
    task = {"classes": ["functional", "possibly", "probably", "defective"], "defective": ["probably", "defective"]}
    labels = np.array([0, 1, 2, 3, 3, 0], dtype=np.int64)
    folded = fold_to_binary(labels, task)
    assert folded.tolist() == [0, 0, 1, 1, 1, 0] and folded.dtype == labels.dtype
