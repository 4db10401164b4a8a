"""Which feature cell each fused pixel takes (mapping.fusion)."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.mapping.fusion import edge_filtered_cells, feature_cells, resample_cells

pytestmark = pytest.mark.unit


def test_resample_cells_picks_the_covering_cell():
    S = np.arange(4 * 6, dtype=np.float32).reshape(4, 6, 1)
    np.testing.assert_array_equal(resample_cells(S.repeat(2, 0).repeat(2, 1), (4, 6)), S)


def test_feature_cells_cover_the_fused_pixels():
    cells = feature_cells((8, 12), (4, 6), 2)  # every 2nd pixel of an 8x12 grid on 4x6 cells
    np.testing.assert_array_equal(cells, np.arange(24))
    assert feature_cells((8, 12), (4, 6), 1)[:4].tolist() == [0, 0, 1, 1]
    assert not cells.flags.writeable  # cached: shared between calls


def test_edge_filtered_cells_drop_pixels_behind_a_depth_edge():
    Z = np.full((4, 4), 2.0)
    Z[:, 1] = 4.0  # a wall behind the object in column 0 of the left cells
    cells = feature_cells((4, 4), (2, 2), 1)
    out = edge_filtered_cells(Z, cells, (2, 2), 0.1, 1)
    # cell centres at pixel (1, 1), (1, 3), ...: column 1 is at the centre's depth (4 m), the
    # pixels of column 0 at 2 m are the other surface and lose the feature
    expected = np.where(np.tile([True, False, False, False], 4), -1, cells)
    np.testing.assert_array_equal(out, expected)
