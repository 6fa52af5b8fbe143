"""`python -m trl_unlearn.cli ...` = `trl-unlearn ...`; also `accelerate launch -m trl_unlearn.cli simnpo ...`."""

import sys

from . import main

sys.exit(main())
