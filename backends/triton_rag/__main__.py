import sys

from triton_rag.cli import main

sys.exit(main())
