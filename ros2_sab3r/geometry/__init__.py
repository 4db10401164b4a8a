"""geometry stage of ros2_sab3r: intrinsics, matching, registration, refinement, boxes."""
