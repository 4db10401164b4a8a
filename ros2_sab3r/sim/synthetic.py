"""Procedural indoor scenes with exact ground truth, for testing the pipeline without a network.

A scene is a box-shaped room (floor, ceiling, four walls) furnished with boxes and vertical
cylinders carrying NYU40 labels. Frames are rendered by numpy ray casting (analytic ray/box and
ray/cylinder intersections, vectorised over pixels), so a 512x384 frame takes tens of milliseconds
on one core. Every surface carries a procedural 3D texture (value noise fixed to the world, so
it is consistent between views) and Lambertian shading, so images are not flat.

World frame: z up, floor at z = 0. Cameras follow OpenCV (x right, y down, z forward). ``T_WC``
maps camera points into the world. Depth is the camera z of the first hit.

Everything is deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ros2_sab3r.types import CameraFrame, OrientedBox

# NYU40 class names, id = index + 1 (0 is 'unlabelled').
NYU40 = (
    'wall', 'floor', 'cabinet', 'bed', 'chair', 'sofa', 'table', 'door', 'window', 'bookshelf',
    'picture', 'counter', 'blinds', 'desk', 'shelves', 'curtain', 'dresser', 'pillow', 'mirror',
    'floor mat', 'clothes', 'ceiling', 'books', 'refrigerator', 'television', 'paper', 'towel',
    'shower curtain', 'box', 'whiteboard', 'person', 'night stand', 'toilet', 'sink', 'lamp',
    'bathtub', 'bag', 'otherstructure', 'otherfurniture', 'otherprop',
)
NYU40_ID = {name: i + 1 for i, name in enumerate(NYU40)}

_EPS = 1e-6
LOOP_RADIUS = 0.12  # camera loop half-axes as a fraction of the room size


@dataclass(frozen=True)
class Primitive:
    """One solid: an upright box (yaw only) or an upright cylinder, resting at height z0."""

    instance_id: int
    label: str
    shape: str  # 'box' or 'cylinder'
    center_xy: tuple[float, float]
    z0: float
    size: tuple[float, float, float]  # box: (sx, sy, sz); cylinder: (2r, 2r, height)
    yaw: float = 0.0  # rotation about world z, radians
    color: tuple[float, float, float] = (0.5, 0.5, 0.5)  # base albedo in [0, 1]

    def box(self) -> OrientedBox:
        """Ground-truth oriented box in the world frame (a cylinder's bounding box)."""
        c, s = np.cos(self.yaw / 2), np.sin(self.yaw / 2)
        center = np.array([self.center_xy[0], self.center_xy[1], self.z0 + self.size[2] / 2])
        return OrientedBox(center=center, quat_xyzw=np.array([0.0, 0.0, s, c]),
                           size=np.array(self.size, dtype=np.float64))


@dataclass(frozen=True)
class ObjectTruth:
    instance_id: int
    label: str
    centroid: np.ndarray  # (3,) centre of the object's box, metres
    box: OrientedBox


@dataclass(frozen=True)
class SyntheticFrame:
    """One rendered view with its ground truth."""

    stamp_ns: int
    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 camera z, metres
    semantic: np.ndarray  # (H, W) uint8 NYU40 id
    instance: np.ndarray  # (H, W) int32 instance id (see SyntheticScene.instance_labels)
    K: np.ndarray  # (3, 3) float64
    T_WC: np.ndarray  # (4, 4) float64

    def camera_frame(self, posed: bool = False, with_K: bool = True,
                     frame_id: str = 'camera_optical_frame') -> CameraFrame:
        """The frame as a camera driver would deliver it (pose only in posed mode)."""
        return CameraFrame(stamp_ns=self.stamp_ns, frame_id=frame_id, image=self.rgb,
                           K=self.K.copy() if with_K else None,
                           T_WC=self.T_WC.copy() if posed else None)

    def points_world(self) -> np.ndarray:
        """(H, W, 3) float32 world points of every pixel."""
        return backproject(self.depth, self.K, self.T_WC)


def intrinsics(width: int, height: int, hfov_deg: float = 70.0) -> np.ndarray:
    """Pinhole K with the principal point at (W/2, H/2) (the pointmap convention of spec §8)."""
    f = width / 2 / np.tan(np.radians(hfov_deg) / 2)
    return np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=np.float64)


def backproject(depth: np.ndarray, K: np.ndarray, T_WC: np.ndarray | None = None) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) float32 points in the camera frame, or the world with T_WC."""
    H, W = depth.shape
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    X = np.stack([(x - K[0, 2]) / K[0, 0] * depth, (y - K[1, 2]) / K[1, 1] * depth, depth], -1)
    if T_WC is not None:
        X = X @ T_WC[:3, :3].T.astype(np.float32) + T_WC[:3, 3].astype(np.float32)
    return X.astype(np.float32)


def look_at(position: np.ndarray, forward: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """T_WC of an OpenCV camera at `position` looking along `forward` (world z up)."""
    f = forward / np.linalg.norm(forward)
    right = np.cross(f, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(f, right)
    cr, sr = np.cos(roll), np.sin(roll)
    right, down = cr * right + sr * down, -sr * right + cr * down
    T = np.eye(4)
    T[:3, :3] = np.stack([right, down, f], axis=1)
    T[:3, 3] = position
    return T


def _hash_noise(cells: np.ndarray, salt: int) -> np.ndarray:
    """(N, 3) int64 cells -> (N,) float32 in [0, 1), a fixed pseudo-random value per cell."""
    h = (cells[:, 0] * 73856093) ^ (cells[:, 1] * 19349663) ^ (cells[:, 2] * 83492791) ^ salt
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF).astype(np.float32) / 65536.0


@dataclass
class SyntheticScene:
    """A furnished room. Build one with :func:`make_scene`."""

    room_size: tuple[float, float, float]  # (Lx, Ly, Lz) metres, room spans [0, L]
    primitives: list[Primitive]
    seed: int = 0
    instance_labels: dict[int, str] = field(default_factory=dict)  # every instance, walls too

    @property
    def objects(self) -> list[ObjectTruth]:
        """Ground truth of the furniture (not walls, floor, ceiling)."""
        return [ObjectTruth(p.instance_id, p.label, p.box().center, p.box())
                for p in self.primitives]

    @property
    def labels(self) -> list[str]:
        """Distinct furniture labels in the scene."""
        return sorted({p.label for p in self.primitives})

    # ----------------------------------------------------------------------------- rendering
    def render(self, T_WC: np.ndarray, K: np.ndarray, width: int, height: int,
               stamp_ns: int = 0) -> SyntheticFrame:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        d_cam = np.stack([(x - K[0, 2]) / K[0, 0], (y - K[1, 2]) / K[1, 1],
                          np.ones_like(x)], -1).reshape(-1, 3)  # (N, 3), z = 1: t is the depth
        R = T_WC[:3, :3].astype(np.float32)
        d = d_cam @ R.T  # (N, 3) world directions
        o = T_WC[:3, 3].astype(np.float32)
        t_best, inst, normal = self._room_hit(o, d)
        for prim in self.primitives:
            t, nrm = (_box_hit if prim.shape == 'box' else _cylinder_hit)(prim, o, d)
            closer = t < t_best
            t_best = np.where(closer, t, t_best)
            inst = np.where(closer, prim.instance_id, inst)
            normal[closer] = nrm[closer]
        P = o + d * t_best[:, None]  # (N, 3) world hit points
        albedo = self._albedo_table()[inst]  # (N, 3)
        cells = np.floor(P / 0.04).astype(np.int64)
        fine = np.floor(P / 0.011).astype(np.int64)
        tex = 0.55 + 0.3 * _hash_noise(cells, self.seed) + 0.15 * _hash_noise(fine, self.seed + 7)
        stripes = 0.9 + 0.1 * np.sin(P @ np.array([7.0, 11.0, 5.0], dtype=np.float32))
        light = np.array([0.3, 0.5, 0.81], dtype=np.float32)
        shade = 0.55 + 0.45 * np.abs(normal @ light)
        rgb = np.clip(albedo * (tex * stripes * shade)[:, None] * 255.0, 0, 255).astype(np.uint8)
        sem_table = np.zeros(max(self.instance_labels) + 1, dtype=np.uint8)
        for iid, label in self.instance_labels.items():
            sem_table[iid] = NYU40_ID[label]
        return SyntheticFrame(
            stamp_ns=stamp_ns, rgb=rgb.reshape(height, width, 3),
            depth=t_best.reshape(height, width).astype(np.float32),
            semantic=sem_table[inst].reshape(height, width),
            instance=inst.reshape(height, width).astype(np.int32), K=K.copy(),
            T_WC=T_WC.copy())

    def _albedo_table(self) -> np.ndarray:
        table = np.zeros((max(self.instance_labels) + 1, 3), dtype=np.float32)
        rng = np.random.default_rng(self.seed + 1000)
        for iid in self.instance_labels:
            table[iid] = 0.45 + 0.5 * rng.random(3)
        for p in self.primitives:
            table[p.instance_id] = p.color
        return table

    def _room_hit(self, o: np.ndarray, d: np.ndarray):
        """Exit point of rays from inside the room: instance 1-4 walls, 5 floor, 6 ceiling."""
        L = np.array(self.room_size, dtype=np.float32)
        with np.errstate(divide='ignore', invalid='ignore'):
            t_far = np.where(d > 0, (L - o) / d, np.where(d < 0, -o / d, np.inf))  # (N, 3)
        axis = np.argmin(t_far, axis=1)
        t = t_far[np.arange(len(d)), axis]
        positive = d[np.arange(len(d)), axis] > 0
        # walls: x=0 -> 1, x=L -> 2, y=0 -> 3, y=L -> 4; floor 5; ceiling 6
        inst = np.where(axis == 0, np.where(positive, 2, 1),
                        np.where(axis == 1, np.where(positive, 4, 3), np.where(positive, 6, 5)))
        normal = np.zeros_like(d)
        normal[np.arange(len(d)), axis] = 1.0
        return t.astype(np.float32), inst.astype(np.int32), normal

    # ------------------------------------------------------------------------- trajectories
    def trajectory(self, n_frames: int, kind: str = 'handheld', turns: float = 1.0
                   ) -> list[np.ndarray]:
        """Camera poses T_WC around the room centre.

        'handheld': 1.45 m high, looking outwards while walking a loop, with sway and turning;
        'robot': 0.7 m high, smooth, level; 'rotation': a fixed position turning on the spot (the
        degenerate case for scale). `turns` is the fraction of a full loop covered.
        """
        Lx, Ly, _ = self.room_size
        rng = np.random.default_rng(self.seed + 17)
        phase = rng.uniform(0, 2 * np.pi, 6)
        centre = np.array([Lx / 2, Ly / 2])
        poses = []
        for i in range(n_frames):
            s = i / max(n_frames, 1)
            a = 2 * np.pi * turns * s + phase[0]
            if kind == 'rotation':
                pos = np.array([centre[0], centre[1], 1.4])
                yaw, pitch, roll = a, -0.3, 0.0
            else:
                height = 1.45 if kind == 'handheld' else 0.7
                sway = 0.03 if kind == 'handheld' else 0.0
                radius = LOOP_RADIUS * np.array([Lx, Ly])
                pos = np.array([
                    centre[0] + radius[0] * np.cos(a) + sway * np.sin(7 * a + phase[1]),
                    centre[1] + radius[1] * np.sin(a) + sway * np.sin(5 * a + phase[2]),
                    height + sway * np.sin(11 * a + phase[3])])
                turn = 0.25 * np.sin(3 * a + phase[4]) if kind == 'handheld' else 0.0
                yaw = a + turn
                pitch = -0.38 if kind == 'handheld' else -0.1
                roll = 0.04 * np.sin(9 * a + phase[5]) if kind == 'handheld' else 0.0
            forward = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch),
                                np.sin(pitch)])
            poses.append(look_at(pos, forward, roll))
        return poses

    def sequence(self, n_frames: int, width: int = 512, height: int = 384,
                 kind: str = 'handheld', turns: float = 1.0, fps: float = 10.0,
                 hfov_deg: float = 70.0) -> list[SyntheticFrame]:
        """Render a trajectory; stamps start at 1 s and advance at `fps`."""
        K = intrinsics(width, height, hfov_deg)
        return [self.render(T, K, width, height, stamp_ns=int(1e9 + i * 1e9 / fps))
                for i, T in enumerate(self.trajectory(n_frames, kind, turns))]


def _box_hit(prim: Primitive, o: np.ndarray, d: np.ndarray):
    """Ray/oriented-box entry distance (inf when missed) and world normals, (N,), (N, 3)."""
    c, s = np.cos(prim.yaw), np.sin(prim.yaw)
    R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32)  # box -> world
    centre = np.array([*prim.center_xy, prim.z0 + prim.size[2] / 2], dtype=np.float32)
    half = np.array(prim.size, dtype=np.float32) / 2
    ob = (o - centre) @ R  # origin in the box frame
    db = d @ R  # (N, 3)
    # Slab by slab on (N,) columns: numpy runs (N, 3) arrays in inner loops of 3, several times
    # slower (the same float32 operations, so the same results).
    tn, tf = [], []
    for k in range(3):
        with np.errstate(divide='ignore', invalid='ignore'):
            inv = 1.0 / db[:, k]
            t1 = (-half[k] - ob[k]) * inv
            t2 = (half[k] - ob[k]) * inv
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        tn.append(np.where(np.isnan(lo), -np.inf, lo))
        tf.append(np.where(np.isnan(hi), np.inf, hi))
    # the entry axis is the first of the largest, as np.argmax gives it
    axis = (tn[1] > tn[0]).astype(np.intp)
    t_enter = np.maximum(tn[0], tn[1])
    axis[tn[2] > t_enter] = 2
    t_enter = np.maximum(t_enter, tn[2])
    t_exit = np.minimum(np.minimum(tf[0], tf[1]), tf[2])
    hit = (t_enter <= t_exit) & (t_enter > _EPS)
    # the entry face's normal: column `axis` of R (box -> world)
    return np.where(hit, t_enter, np.inf).astype(np.float32), np.take(R.T, axis, axis=0)


def _cylinder_hit(prim: Primitive, o: np.ndarray, d: np.ndarray):
    """Ray/upright-cylinder entry distance (side or top cap) and world normals."""
    r = prim.size[0] / 2
    cx, cy = prim.center_xy
    z0, z1 = prim.z0, prim.z0 + prim.size[2]
    px, py = o[0] - cx, o[1] - cy
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = 2 * (px * d[:, 0] + py * d[:, 1])
    c = px * px + py * py - r * r
    disc = b * b - 4 * a * c
    with np.errstate(divide='ignore', invalid='ignore'):
        t_side = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
        z_side = o[2] + t_side * d[:, 2]
        side_ok = (disc >= 0) & (t_side > _EPS) & (z_side >= z0) & (z_side <= z1)
        t_cap = (z1 - o[2]) / d[:, 2]
    hx = px + t_cap * d[:, 0]
    hy = py + t_cap * d[:, 1]
    cap_ok = (t_cap > _EPS) & (hx * hx + hy * hy <= r * r)
    t_side = np.where(side_ok, t_side, np.inf)
    t_cap = np.where(cap_ok, t_cap, np.inf)
    use_cap = t_cap < t_side
    t = np.minimum(t_side, t_cap)
    normal = np.zeros_like(d)
    with np.errstate(invalid='ignore'):  # inf * 0 where the side is missed; zeroed below
        normal[:, 0] = (px + t_side * d[:, 0]) / r
        normal[:, 1] = (py + t_side * d[:, 1]) / r
    normal[use_cap] = (0.0, 0.0, 1.0)
    normal = np.nan_to_num(normal, nan=0.0, posinf=0.0, neginf=0.0)
    return t.astype(np.float32), normal


# Furniture catalogue: label -> (shape, size (sx, sy, sz) in metres, albedo). Heights stay below
# the hand-held camera so that tops are seen and boxes can be measured from the map.
CATALOGUE: dict[str, tuple[str, tuple[float, float, float], tuple[float, float, float]]] = {
    'bed': ('box', (2.0, 1.5, 0.55), (0.85, 0.8, 0.7)),
    'sofa': ('box', (1.8, 0.85, 0.8), (0.35, 0.45, 0.75)),
    'chair': ('box', (0.5, 0.5, 0.9), (0.75, 0.45, 0.25)),
    'table': ('cylinder', (0.9, 0.9, 0.75), (0.6, 0.4, 0.25)),
    'dresser': ('box', (1.0, 0.5, 0.85), (0.55, 0.35, 0.2)),
    'bookshelf': ('box', (0.9, 0.4, 1.05), (0.7, 0.6, 0.45)),
    'television': ('box', (0.9, 0.35, 0.55), (0.12, 0.12, 0.15)),
    'lamp': ('cylinder', (0.35, 0.35, 1.2), (0.95, 0.9, 0.6)),
    'night stand': ('box', (0.45, 0.45, 0.55), (0.5, 0.3, 0.2)),
    'toilet': ('cylinder', (0.45, 0.45, 0.45), (0.95, 0.95, 0.95)),
    'door': ('box', (0.9, 0.05, 2.05), (0.6, 0.45, 0.3)),
}

DEFAULT_LABELS = ('bed', 'sofa', 'chair', 'table', 'dresser', 'bookshelf', 'television', 'lamp')


def make_scene(seed: int = 0, labels: tuple[str, ...] = DEFAULT_LABELS,
               room_size: tuple[float, float, float] = (7.0, 6.0, 2.6),
               max_tries: int = 2000) -> SyntheticScene:
    """A room with one object per label, placed along the walls without overlaps.

    Objects stand between the camera loop (around the room centre) and the walls, turned to face
    the centre. A 'door' is set into a wall; it is only a few centimetres deep, so only its front
    is ever seen (keep that in mind when comparing its box).
    """
    rng = np.random.default_rng(seed)
    Lx, Ly, Lz = room_size
    instance_labels = {1: 'wall', 2: 'wall', 3: 'wall', 4: 'wall', 5: 'floor', 6: 'ceiling'}
    placed: list[Primitive] = []
    footprints: list[tuple[float, float, float]] = []  # (x, y, radius)
    next_id = 7
    for label in labels:
        if label not in CATALOGUE:
            raise ValueError(f'no synthetic model for {label!r}; known: {", ".join(CATALOGUE)}')
        shape, size, color = CATALOGUE[label]
        radius = 0.5 * float(np.hypot(size[0], size[1]))
        for _ in range(max_tries):
            side = int(rng.integers(4))
            if label == 'door':
                gap, along_half = size[1] / 2, size[0] / 2
            else:
                gap = radius + rng.uniform(0.05, 0.25)
                along_half = radius
            length = Lx if side in (0, 1) else Ly
            if length - 2 * along_half - 0.2 <= 0:
                continue
            u = rng.uniform(along_half + 0.1, length - along_half - 0.1)
            if side == 0:
                x, y, yaw = u, gap, 0.0
            elif side == 1:
                x, y, yaw = u, Ly - gap, np.pi
            elif side == 2:
                x, y, yaw = gap, u, np.pi / 2
            else:
                x, y, yaw = Lx - gap, u, -np.pi / 2
            if label != 'door':
                yaw += rng.uniform(-0.3, 0.3)
            if any(np.hypot(x - fx, y - fy) < radius + fr + 0.1 for fx, fy, fr in footprints):
                continue
            # keep clear of the camera loop so that objects are seen from a distance
            ex = (x - Lx / 2) / (LOOP_RADIUS * Lx + radius + 0.6)
            ey = (y - Ly / 2) / (LOOP_RADIUS * Ly + radius + 0.6)
            if np.hypot(ex, ey) < 1.0:
                continue
            break
        else:
            raise ValueError(f'could not place {label!r} in a {Lx}x{Ly} m room; use fewer labels')
        footprints.append((x, y, radius))
        jitter = 1.0 + 0.1 * (rng.random(3) - 0.5)
        if shape == 'cylinder':
            jitter[1] = jitter[0]  # stays round
        size_j = tuple(float(v) for v in np.array(size) * (jitter if label != 'door' else 1.0))
        placed.append(Primitive(next_id, label, shape, (float(x), float(y)), 0.0, size_j,
                                float(yaw), color))
        instance_labels[next_id] = label
        next_id += 1
    return SyntheticScene(room_size=room_size, primitives=placed, seed=seed,
                          instance_labels=instance_labels)


def observed_centroids(frames: list[SyntheticFrame], voxel_size: float,
                       min_pixels: int = 50) -> dict[int, np.ndarray]:
    """Centroid of the voxelised surface of each instance that the frames saw.

    The fair reference for a map's object centroid: a map can only contain surfaces that were
    observed, so the ground truth is voxelised the same way (mean point per voxel, then mean of
    voxels).
    """
    keys_all, pts_all, inst_all = [], [], []
    for f in frames:
        P = f.points_world().reshape(-1, 3)
        inst = f.instance.reshape(-1)
        keys_all.append(np.floor(P / voxel_size).astype(np.int64))
        pts_all.append(P)
        inst_all.append(inst)
    keys = np.concatenate(keys_all)
    P = np.concatenate(pts_all).astype(np.float64)
    inst = np.concatenate(inst_all)
    out = {}
    for iid in np.unique(inst):
        sel = inst == iid
        if sel.sum() < min_pixels:
            continue
        _, inv = np.unique(keys[sel], axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        counts = np.bincount(inv)
        centres = np.stack([np.bincount(inv, P[sel, k]) for k in range(3)], 1) / counts[:, None]
        out[int(iid)] = centres.mean(axis=0)
    return out
