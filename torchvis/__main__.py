import sys

from torchvis.apps.cli import main

sys.exit(main())
