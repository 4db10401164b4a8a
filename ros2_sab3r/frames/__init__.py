"""frames stage of ros2_sab3r: frame buffer, keyframe selection, keyframe window."""
