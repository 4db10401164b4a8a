"""Recipes: shipped files load, typed overrides take effect, bad keys and values are refused."""

from __future__ import annotations

import pytest

from ros2_sab3r.train.losses import FULL_RECIPE
from ros2_sab3r.train.recipe import (
    RecipeError,
    apply_overrides,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    shipped_recipes,
)

pytestmark = pytest.mark.train


def test_every_shipped_recipe_loads_and_round_trips():
    import yaml

    assert set(shipped_recipes()) >= {'sab3r_official', 'robot_heads', 'robot_finetune',
                                      'toy_cpu'}
    for name in shipped_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_official_recipe_holds_the_spec_values():
    r = load_recipe('sab3r_official')
    assert r.loss == FULL_RECIPE  # alpha 1, matching 0.75, clip 20, dino 4, T 0.05
    assert r.model.trainable == 'all' and r.model.architecture == 'sab3r_cd'
    assert (r.optim.name, r.optim.lr, r.optim.betas, r.optim.weight_decay) == (
        'adamw', 1e-4, (0.9, 0.95), 0.05)
    assert (r.optim.warmup_steps, r.optim.schedule, r.optim.grad_clip) == (4000, 'constant', 1.0)
    assert (r.batch.micro_batch, r.batch.accumulation) == (1, 8)
    assert (r.precision, r.run.seed, r.data.correspondences) == ('fp32', 8, 8192)
    assert r.teachers.clip.kind == 'maskclip' and r.teachers.dino.kind == 'dinov2'


def test_robot_recipes_train_the_parts_they_say():
    assert load_recipe('robot_heads').model.trainable == 'heads'
    assert load_recipe('robot_finetune').model.trainable == 'decoder_heads'


def test_overrides_are_typed_by_the_field():
    r = load_recipe('toy_cpu', ['run.steps=7', 'data.resolution=32,64',
                                'data.sources.0.frames=5', 'optim.betas=[0.8, 0.9]',
                                'model.init=1e-4', 'precision=bf16',
                                'model.activation_checkpointing=true', 'optim.lr=2e-3'])
    assert r.run.steps == 7 and r.data.resolution == (32, 64)
    assert r.data.sources[0].frames == 5 and r.optim.betas == (0.8, 0.9)
    assert r.model.init == '1e-4'  # a string field keeps the text as written
    assert r.precision == 'bf16' and r.model.activation_checkpointing is True
    assert r.optim.lr == 2e-3


def test_override_creates_an_optional_section():
    r = load_recipe('toy_cpu', ['teachers.clip.weights=w.pt', 'teachers.clip.upsampler=none'])
    assert r.teachers.clip.kind == 'maskclip' and r.teachers.clip.weights == 'w.pt'


@pytest.mark.parametrize('override, words', [
    ('run.stepz=3', "no key 'stepz'"),
    ('run.steps=three', 'run.steps: expected an integer'),
    ('run.steps=0', 'run.steps: must be >= 1'),
    ('optim.lr=-1', 'optim.lr: must be > 0'),
    ('data.resolution=30,64', 'multiples of 16'),
    ('data.sources.3.seed=1', 'not an index below 1'),
    ('model.trainable=encoder', "'encoder' is not one of"),
    ('loss.clip=2', 'no clip teacher is configured'),
    ('loss.alpha=-1', 'loss weight alpha'),
    ('precision=fp16', "'fp16' is not one of"),
    ('steps', 'expected key=value'),
])
def test_bad_overrides_name_the_key(override, words):
    base = load_recipe('toy_cpu')
    with pytest.raises(RecipeError, match=words.replace('(', r'\(').replace('[', r'\[')):
        apply_overrides(base, [override])


def test_reproduction_only_teacher_input_is_accepted_and_off_by_default():
    recipe = load_recipe('toy_cpu', ['teachers.clip.weights=w', 'teachers.clip.upsampler=none',
                                     'teachers.clip.uncropped_input=true'])
    assert recipe.teachers.clip.uncropped_input is True
    plain = load_recipe('toy_cpu', ['teachers.clip.weights=w', 'teachers.clip.upsampler=none'])
    assert plain.teachers.clip.uncropped_input is False


def test_unknown_keys_and_wrong_types_in_a_file_are_refused(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('name: x\nrun:\n  steps: 3\n  chekpoint_every: 2\n')
    with pytest.raises(RecipeError, match=r"unknown recipe keys \['run.chekpoint_every'\]"):
        load_recipe(bad)
    bad.write_text('name: x\nmodell: {}\n')
    with pytest.raises(RecipeError, match=r"\['modell'\]"):
        load_recipe(bad)
    bad.write_text('name: x\nrun:\n  log_every: true\n')
    with pytest.raises(RecipeError, match='run.log_every: expected an integer'):
        load_recipe(bad)
    bad.write_text('name: x\ndata:\n  sources:\n    - kind: bag\n')
    with pytest.raises(RecipeError, match='data.sources.0.path: a bag source needs a path'):
        load_recipe(bad)
    bad.write_text('name: [unclosed\n')
    with pytest.raises(RecipeError, match='not valid YAML'):
        load_recipe(bad)
    with pytest.raises(RecipeError, match='toy_cpu'):
        load_recipe(tmp_path / 'missing.yaml')


def test_yaml_tags_are_not_evaluated(tmp_path):
    bad = tmp_path / 'tag.yaml'
    bad.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RecipeError, match='not valid YAML'):
        load_recipe(bad)


def test_evaluation_settings_are_checked_at_load():
    r = load_recipe('toy_cpu', ['run.eval_args=[--group-sizes, "2", --param, model.device=cpu]',
                                'run.best_metric=eval/cos_clip', 'run.best_mode=min'])
    assert r.run.eval_args == ('--group-sizes', '2', '--param', 'model.device=cpu')
    assert (r.run.best_metric, r.run.best_mode) == ('eval/cos_clip', 'min')
    with pytest.raises(RecipeError, match='run.eval_args: sab3r-eval refuses.*--bogus'):
        load_recipe('toy_cpu', ['run.eval_args=[--bogus, "2"]'])
    with pytest.raises(RecipeError, match='run.eval_args.*drop them'):
        load_recipe('toy_cpu', ['run.eval_args=[--out, /tmp/x]'])
    with pytest.raises(RecipeError, match="run.best_metric.*'eval/' prefix"):
        load_recipe('toy_cpu', ['run.best_metric=cos_clip'])
    with pytest.raises(RecipeError, match='run.best_mode'):
        load_recipe('toy_cpu', ['run.best_mode=largest'])
