import sys

from funnel.tools.cli import main

sys.exit(main())
