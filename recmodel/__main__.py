import sys

from recmodel.cli import main

sys.exit(main())
