import sys

from odm_megatron.cli import main

sys.exit(main())
