"""TransformBuffer: tf2-like lookups through a tree, interpolated over time."""

import threading

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ros2_sab3r.geometry.tf_buffer import TransformBuffer, TransformLookupError

pytestmark = pytest.mark.unit

S = 1_000_000_000


def T_of(yaw_deg=0.0, t=(0.0, 0.0, 0.0)):
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler('z', yaw_deg, degrees=True).as_matrix()
    T[:3, 3] = t
    return T


@pytest.fixture
def buf():
    b = TransformBuffer()
    b.set_transform('map', 'odom', 0, T_of(0, (1, 0, 0)), static=True)
    b.set_transform('odom', 'base', 1 * S, T_of(0, (0, 0, 0)))
    b.set_transform('odom', 'base', 3 * S, T_of(90, (2, 0, 0)))
    b.set_transform('base', 'camera', 0, T_of(0, (0, 0, 1)), static=True)
    return b


def test_chain_and_interpolation(buf):
    T = buf.lookup('map', 'camera', 2 * S)  # halfway: yaw 45 deg, x = 1 + 1
    np.testing.assert_allclose(T[:3, 3], [2, 0, 1], atol=1e-12)
    yaw = Rotation.from_matrix(T[:3, :3]).as_euler('xyz', degrees=True)[2]
    assert yaw == pytest.approx(45.0)


def test_inverse_direction_and_siblings(buf):
    buf.set_transform('base', 'arm', 0, T_of(0, (0.5, 0, 0)), static=True)
    T_cam_arm = buf.lookup('camera', 'arm', 1 * S)
    np.testing.assert_allclose(T_cam_arm[:3, 3], [0.5, 0, -1], atol=1e-12)
    np.testing.assert_allclose(buf.lookup('camera', 'map', 3 * S) @ buf.lookup(
        'map', 'camera', 3 * S), np.eye(4), atol=1e-12)


def test_latest(buf):
    np.testing.assert_allclose(buf.lookup('map', 'camera', None)[:3, 3], [3, 0, 1], atol=1e-12)


def test_errors_name_the_problem(buf):
    with pytest.raises(TransformLookupError, match='future'):
        buf.lookup('map', 'camera', 4 * S)
    with pytest.raises(TransformLookupError, match='past'):
        buf.lookup('map', 'camera', 0)
    with pytest.raises(TransformLookupError, match=r"unknown frame\(s\) \['nowhere'\]"):
        buf.lookup('map', 'nowhere', 2 * S)
    buf.set_transform('world', 'other', 0, np.eye(4), static=True)
    with pytest.raises(TransformLookupError, match='not connected'):
        buf.lookup('map', 'other', 2 * S)
    with pytest.raises(ValueError, match='finite'):
        buf.set_transform('a', 'b', 0, np.full((4, 4), np.nan))


def test_tolerance_and_cache_bound():
    b = TransformBuffer(cache_ns=2 * S, tolerance_ns=S // 10)
    for k in range(10):
        b.set_transform('odom', 'base', k * S, T_of(0, (k, 0, 0)))
    np.testing.assert_allclose(b.lookup('odom', 'base', 9 * S + S // 20)[0, 3], 9.0)
    with pytest.raises(TransformLookupError):
        b.lookup('odom', 'base', 5 * S)  # evicted (older than the cache)
    assert len(b._edges['base'].stamps) == 3


def test_concurrent_writers_and_readers():
    b = TransformBuffer()
    b.set_transform('odom', 'base', 0, np.eye(4))
    errors = []

    def write():
        for k in range(1, 300):
            b.set_transform('odom', 'base', k * 1000, T_of(0, (k, 0, 0)))

    def read():
        for _ in range(300):
            try:
                b.lookup('odom', 'base', 500)
            except Exception as err:  # noqa: BLE001
                errors.append(err)

    threads = [threading.Thread(target=write), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
