"""query stage of ros2_sab3r: text queries -> relevancy -> instances -> ranked objects."""
