import sys

from bmssl.cli import main

sys.exit(main())
