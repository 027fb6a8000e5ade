"""The one time base of the whole pipeline: 25 fps video, 16 kHz mono audio.

Frame ``k`` is shown at ``k / FPS`` seconds and owns audio samples
``[SAMPLES_PER_FRAME * k, SAMPLES_PER_FRAME * (k + 1))``: decoding, audio features, training,
rendering and evaluation all count frames and samples this way.
"""

FPS = 25
"""Video frame rate (frames per second) of every subject, render and feature track."""
SAMPLE_RATE = 16000
"""Audio sample rate (Hz) every decoder output and feature extractor uses."""
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
"""Audio samples per video frame (640)."""
