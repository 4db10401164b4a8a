"""Keyframe selection policy and the sliding keyframe window."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from ros2_sab3r.config import KeyframeConfig
from ros2_sab3r.geometry.transforms import pose_distance
from ros2_sab3r.types import PosedKeyframe


@dataclass(frozen=True)
class WindowKeyframe:
    """A keyframe in the window: its posed data and the encoder output, reused for every pair."""

    keyframe: PosedKeyframe
    tokens: Any  # backend handle from encode(); the encoder runs once per keyframe
    metric: bool = True  # False while the scale of keyframe.X is not fixed yet (posed bootstrap)


class KeyframeWindow:
    """The last `size` keyframes; inserting beyond that evicts the oldest."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f'keyframe window size must be >= 1, got {size}')
        self._items: deque[WindowKeyframe] = deque()
        self._size = size
        self.total = 0  # keyframes inserted since the last clear

    def insert(self, item: WindowKeyframe) -> WindowKeyframe | None:
        """Add a keyframe; return the evicted one, if any."""
        self._items.append(item)
        self.total += 1
        return self._items.popleft() if len(self._items) > self._size else None

    def replace_latest(self, item: WindowKeyframe) -> None:
        """Swap the newest entry (e.g. once its metric scale is known)."""
        self._items[-1] = item

    def latest(self) -> WindowKeyframe | None:
        return self._items[-1] if self._items else None

    def recent(self, n: int) -> list[WindowKeyframe]:
        """The n most recent keyframes, newest first."""
        return list(self._items)[::-1][:n]

    def clear(self) -> None:
        self._items.clear()
        self.total = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(list(self._items))


def needs_keyframe_by_overlap(overlap: float, cfg: KeyframeConfig) -> bool:
    """Unposed mode: a new keyframe when the share of reciprocal matches drops below the limit."""
    return overlap < cfg.min_overlap


def needs_keyframe_by_pose(T_WC: np.ndarray, T_WC_latest: np.ndarray, cfg: KeyframeConfig
                           ) -> tuple[bool, str]:
    """Posed mode: a new keyframe after enough translation or rotation since the latest one."""
    dist_m, angle_deg = pose_distance(T_WC_latest, T_WC)
    if dist_m >= cfg.min_translation_m:
        return True, f'moved {dist_m:.2f} m'
    if angle_deg >= cfg.min_rotation_deg:
        return True, f'turned {angle_deg:.1f} deg'
    return False, ''
