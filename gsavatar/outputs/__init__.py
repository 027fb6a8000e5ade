"""Ways out of the system: video files with muxed audio (more to come: camera paths, PLY)."""
