"""Distillation acceptance at toy scale: a tiny student distilled from a random teacher reaches
a held-out cosine of 0.85 on unseen views of its scenes and 0.8 on a scene it never saw.

What it took (measured on this 2-core machine, tiny_cd, 48x64 crops, the test double teacher of
test_engine, figures = held-out cosine on its scene / on another scene):

- Not the head's capacity: the clip head ends in an 8 -> 16 projection, but the best rank-8
  subspace of the teacher's maps keeps a cosine of 0.98.
- One green scene (seed 0), lr 2e-3, loss.clip 1, 300 steps: 0.81 / 0.78 on the reddish scene 1,
  whose colours the student never saw (the teacher is a non-linear function of colour; with a
  patch-level teacher the scene itself reaches 0.92 and scene 1 stays at 0.79). Brightness,
  contrast and saturation jitter do not move hues: 0.79 / 0.74 after 300 steps.
- Three scenes (seeds 0, 2, 3), 12 frames each: the other scene came close to the own ones
  (0.82 / 0.80 after 400 steps at lr 2e-3, loss.clip 20): the gap was the colours, what
  remained was the learning rate. (The 300/400-step figures above and here are on held-out
  pairs of the training scenes; the test below uses new camera paths.)
- lr 5e-3 with warm-up and a cosine decay, clipping kept (the gradient norm is 8-20, clipped
  to 1; without clipping 0.83 / 0.81): 0.875 / 0.848 after 400 steps with the official CLIP
  weight 20 against the 3D term's 1, 0.884 / 0.862 with 100 (the toy trunk learns geometry from
  scratch too, so the feature term is weighted up). Here, against new camera paths of the three
  scenes and 8 pairs of scene 1: 0.08 / 0.14 untrained, 0.877 / 0.820 trained (105-130 s at a
  load average of 3-5).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from ros2_sab3r.train.engine import Trainer
from ros2_sab3r.train.evaluation import evaluate_batches, source_batches
from ros2_sab3r.train.recipe import DataSource
from tests.train.test_engine import RandomTeacherDouble, distil

pytestmark = [pytest.mark.train, pytest.mark.slow, pytest.mark.usefixtures('one_thread')]

TRAINED_SCENES = (0, 2, 3)
OTHER_SCENE = 1



def test_a_student_distils_a_random_teacher_onto_unseen_views_and_scenes(tmp_path):
    recipe = distil('run.steps=400', 'run.checkpoint_every=400', 'run.log_every=100',
                    'loss.clip=100', 'loss.matching=0', 'optim.lr=5e-3', 'optim.warmup_steps=10',
                    'optim.schedule=cosine', 'optim.min_lr=1e-4', 'batch.accumulation=1',
                    'batch.micro_batch=2', 'data.held_out=0')
    source = recipe.data.sources[0]
    recipe = replace(recipe, data=replace(recipe.data, sources=tuple(
        replace(source, seed=s, frames=12) for s in TRAINED_SCENES)))
    # Unseen views: the same scenes seen from another camera path; another scene: seed 1.
    unseen = source_batches([replace(source, seed=s, frames=12, trajectory='robot')
                             for s in TRAINED_SCENES], recipe, max_pairs=4)
    other = source_batches([DataSource(seed=OTHER_SCENE, frames=12,
                                       render_size=source.render_size)], recipe, max_pairs=8)
    assert len(unseen) >= 9 and len(other) >= 6
    trainer = Trainer(recipe, tmp_path, teachers={'clip': RandomTeacherDouble(16)},
                      progress=False)
    before = (evaluate_batches(trainer.net, trainer.teachers, unseen)['cos_clip'],
              evaluate_batches(trainer.net, trainer.teachers, other)['cos_clip'])
    trainer.fit()
    after = (evaluate_batches(trainer.net, trainer.teachers, unseen)['cos_clip'],
             evaluate_batches(trainer.net, trainer.teachers, other)['cos_clip'])
    assert max(before) < 0.2, before
    assert after[0] >= 0.85 and after[1] >= 0.8, (before, after)
