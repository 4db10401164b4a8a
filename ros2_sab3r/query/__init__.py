"""query stage of ros2_sab3r (see ARCHITECTURE.md)."""
