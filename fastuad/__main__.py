import sys

from fastuad.cli import main

sys.exit(main())
