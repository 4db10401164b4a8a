"""mapping stage of ros2_sab3r: bounded semantic voxel map, snapshots, persistence."""
