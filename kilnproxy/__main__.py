import sys

from kilnproxy.cli import main

sys.exit(main())
