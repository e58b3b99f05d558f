import sys

from kilnproxy.cli.main import main

sys.exit(main())
