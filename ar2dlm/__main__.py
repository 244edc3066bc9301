import sys

from ar2dlm.cli import main

sys.exit(main())
