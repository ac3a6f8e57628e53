import sys

from iomni.cli.main import main

sys.exit(main())
