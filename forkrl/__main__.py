import sys

from forkrl.cli import main

sys.exit(main())
