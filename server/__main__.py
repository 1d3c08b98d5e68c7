import sys

from ef21.__main__ import master_main

sys.exit(master_main())
