"""Example scripts for the viewer's Python API, installed as the package ``gsavatar.viewer_examples``."""
