"""The kernel sources, installed as the package ``gsavatar.kernel_sources``; :mod:`gsavatar.kernels` builds them."""

# With the repository root on sys.path (python -m run from there) this folder is importable as a
# top-level `cuda` too: extending __path__ keeps another distribution's `cuda` package reachable.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)
