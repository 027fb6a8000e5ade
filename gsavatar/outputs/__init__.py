"""Ways out of the system: mp4 video with muxed audio (``render_video``, ``video_writer``) and
standard 3D Gaussian Splatting PLY files (``ply``)."""
