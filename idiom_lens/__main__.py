import sys

from idiom_lens.cli import main

sys.exit(main())
