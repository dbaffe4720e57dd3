import sys

from ds_jax.cli import main

sys.exit(main())
