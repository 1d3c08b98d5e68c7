import sys

from ef21.__main__ import worker_main

sys.exit(worker_main())
