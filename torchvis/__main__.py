import sys

from torchvis.cli import main

sys.exit(main())
