"""Show a trained avatar in the browser from Python: the viewer's API in a few lines.

    python viewer/view_run.py runs/talk --port 8080                     # from a checkout
    python -m gsavatar.viewer_examples.view_run runs/talk --port 8080    # from any install

:func:`gsavatar.viewer.start_viewer` starts the server in background threads and returns at once
with a handle; this script prints the handle's ``url`` and calls its ``stop()`` on Ctrl-C or after
``--seconds``. Needs the ``viewer`` extra (viser). The ``gsavatar view`` command does the same.
"""

from __future__ import annotations

import argparse
import time

from gsavatar.viewer import start_viewer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a trained avatar (a gsavatar run folder) to a browser.")
    parser.add_argument("run_dir", help="the run folder written by `gsavatar train -o RUN_DIR`")
    parser.add_argument("--audio", default=None, help="speech to play (default: the subject's own audio)")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on (0: any free port)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this many seconds (default: at Ctrl-C)")
    args = parser.parse_args(argv)

    viewer = start_viewer(args.run_dir, args.audio, port=args.port)
    print(f"open {viewer.url} in a browser (Ctrl-C stops it)", flush=True)
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        viewer.stop()


if __name__ == "__main__":
    main()
