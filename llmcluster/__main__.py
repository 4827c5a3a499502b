import sys

from llmcluster.cli import main

sys.exit(main())
