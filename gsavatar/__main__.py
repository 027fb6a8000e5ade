import sys

from gsavatar.cli import main

sys.exit(main())
