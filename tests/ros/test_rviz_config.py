"""config/perception.rviz shows what the node publishes, with the QoS it publishes with."""

from pathlib import Path
import re

import pytest
import yaml

from ros2_sab3r.config import PerceptionConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
NODE = ROOT / 'ros2_sab3r' / 'ros' / 'perception_node.py'


def _published_topics() -> dict[str, str]:
    """'~/name' -> QoS constant name, read from the node's create_publisher calls."""
    source = NODE.read_text(encoding='utf-8')
    return dict(re.findall(r"create_publisher\(\s*\w+,\s*'~/(\w+)',\s*qos\.(\w+)", source))


def _displays():
    layout = yaml.safe_load((ROOT / 'config' / 'perception.rviz').read_text(encoding='utf-8'))
    return layout, layout['Visualization Manager']['Displays']


def test_every_node_output_is_shown_with_matching_qos():
    published = _published_topics()
    assert {'semantic_map', 'relevancy', 'located_objects', 'keyframe_poses',
            'trajectory'} <= set(published), published
    _, displays = _displays()
    shown = {}
    for d in displays:
        topic = d.get('Topic', {}).get('Value')
        if topic:
            assert topic.startswith('/perception_node/'), topic
            shown[topic.rsplit('/', 1)[1]] = d
    for name in ('semantic_map', 'relevancy', 'located_objects', 'keyframe_poses',
                 'trajectory'):
        assert name in shown, f'~/{name} has no display'
        assert published[name] == 'LATCHED'
        # a volatile subscriber would miss the latched message published before it joined
        assert shown[name]['Topic']['Durability Policy'] == 'Transient Local'
        assert shown[name]['Topic']['Reliability Policy'] == 'Reliable'
    assert shown['semantic_map']['Color Transformer'] == 'RGB8'
    assert any(d['Class'] == 'rviz_default_plugins/TF' for d in displays)


def test_fixed_frame_is_the_default_map_frame():
    layout, _ = _displays()
    fixed = layout['Visualization Manager']['Global Options']['Fixed Frame']
    assert fixed == PerceptionConfig().frames.map_frame
