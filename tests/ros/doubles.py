"""Test doubles loaded by the node under test through ``model.backend: 'module:Class'``."""

from __future__ import annotations

import os
import time

from ros2_sab3r.sim.standin import HashTextEncoderStandIn, SyntheticSceneBackend


class SlowBackendDouble(SyntheticSceneBackend):
    """The synthetic-scene stand-in made deliberately slow, like a network on a weak CPU.

    Each decode sleeps ``SAB3R_TEST_DECODE_DELAY_S`` seconds (default 0.25), so frames arrive
    far faster than they are processed and the node must drop them instead of queueing.
    """

    name = 'slow stand-in (test double)'

    def decode(self, a, b):
        time.sleep(float(os.environ.get('SAB3R_TEST_DECODE_DELAY_S', '0.25')))
        return super().decode(a, b)


class FaultyTextEncoderDouble(HashTextEncoderStandIn):
    """The hash stand-in, except that the query 'inject-fault' raises an error no check of the
    node foresees (deterministic fault injection for the last-resort handlers)."""

    def encode(self, texts):
        if 'inject-fault' in texts:
            raise RuntimeError('fault injected by FaultyTextEncoderDouble')
        return super().encode(texts)


class FaultInjectionBackendDouble(SyntheticSceneBackend):
    """The synthetic-scene stand-in with :class:`FaultyTextEncoderDouble` as its text tower."""

    name = 'fault-injection stand-in (test double)'

    @classmethod
    def from_config(cls, model):
        backend = super().from_config(model)
        backend._text = backend.text_encoder = FaultyTextEncoderDouble()
        return backend
