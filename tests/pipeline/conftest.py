"""Session fixtures for the pipeline tests: one rendered scene, one run per mode (cached)."""

from __future__ import annotations

import numpy as np
import pytest

from ros2_sab3r.config import config_from_flat
from ros2_sab3r.pipeline import Pipeline
from ros2_sab3r.sim.groundtruth_backend import GroundTruthBackend
from ros2_sab3r.sim.synthetic import make_scene
from tests.doubles import HashTextEncoderDouble

# 256x192 keeps the suite fast; the feature stride of 4 px matches SAB3R-like 8 px at 512x384.
WIDTH, HEIGHT, STRIDE = 256, 192, 4


@pytest.fixture(scope='session')
def scene():
    return make_scene(seed=0)


@pytest.fixture(scope='session')
def frames(scene):
    return scene.sequence(60, WIDTH, HEIGHT)


@pytest.fixture(scope='session')
def text_encoder():
    return HashTextEncoderDouble(512)


def make_backend(scene, frames, text_encoder, **kw):
    return GroundTruthBackend(frames, text_encoder, feature_stride=STRIDE,
                              scene_center=np.array(scene.room_size) / 2, **kw)


def make_pipeline(backend, text_encoder, posed: bool, **overrides):
    flat = {'frames.pose_source': 'tf' if posed else 'none', **overrides}
    return Pipeline(config_from_flat(flat), backend, text_encoder)


def run(pipeline, frames, posed: bool):
    return [pipeline.step(f.camera_frame(posed=posed)) for f in frames]


@pytest.fixture(scope='session')
def unposed_run(scene, frames, text_encoder):
    pipeline = make_pipeline(make_backend(scene, frames, text_encoder), text_encoder, False)
    return pipeline, run(pipeline, frames, False)


@pytest.fixture(scope='session')
def posed_run(scene, frames, text_encoder):
    pipeline = make_pipeline(make_backend(scene, frames, text_encoder), text_encoder, True)
    return pipeline, run(pipeline, frames, True)
