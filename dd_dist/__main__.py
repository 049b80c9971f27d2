import sys

from dd_dist.cli import main

sys.exit(main())
