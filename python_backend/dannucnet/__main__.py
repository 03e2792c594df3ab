import sys

from dannucnet.cli import main

sys.exit(main())
