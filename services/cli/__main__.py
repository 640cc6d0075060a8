import sys

from tpi_cli.main import main

sys.exit(main())
