import sys

from nsvd_lm.cli import main

sys.exit(main())
