import sys

from ktfast.cli import main

sys.exit(main())
